"""TimeMAE objectives and codeword metrics.

* MRR (masked representation regression): ``MSE(pred, target)`` averaged over every element of
  the masked windows' representations (official ``Align``: ``nn.MSELoss(reduction='mean')``).
* MCC (masked codeword classification): cross-entropy with label smoothing (0.2) of the
  tokenizer logits of the predicted representations against the codewords of the masked
  windows, averaged over windows (official ``Reconstruct``).
* Metrics: top-1 accuracy and NDCG@10 of the codeword logits, vectorised (the official
  ``recalls_and_ndcgs_for_ks`` loops over rows on the host). With one relevant codeword per window
  the ideal DCG is 1, so NDCG@k = 1 / log2(rank + 2) when the codeword is in the top k, else 0.

Losses are computed in float32 whatever the input dtype, with autocast disabled. Every function
returns tensors; nothing here syncs with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mrr_loss", "mcc_loss", "timemae_loss", "codeword_top1", "codeword_ndcg", "representation_spread"]


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def mrr_loss(pred_BMD: torch.Tensor, target_BMD: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (the target carries no gradient)."""
    with _no_autocast(pred_BMD):
        return F.mse_loss(pred_BMD.float(), target_BMD.detach().float())


def mcc_loss(logits_BMK: torch.Tensor, codewords_BM: torch.Tensor, label_smoothing: float = 0.2) -> torch.Tensor:
    """Label-smoothed cross-entropy in float32, mean over all masked windows."""
    with _no_autocast(logits_BMK):
        K = logits_BMK.shape[-1]
        return F.cross_entropy(
            logits_BMK.float().reshape(-1, K), codewords_BM.reshape(-1), label_smoothing=label_smoothing
        )


def timemae_loss(
    pred_BMD: torch.Tensor,
    target_BMD: torch.Tensor,
    logits_BMK: torch.Tensor,
    codewords_BM: torch.Tensor,
    alpha: float = 5.0,
    beta: float = 1.0,
    label_smoothing: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha * MRR + beta * MCC, MRR, MCC)``, all float32 scalars."""
    l_mrr = mrr_loss(pred_BMD, target_BMD)
    l_mcc = mcc_loss(logits_BMK, codewords_BM, label_smoothing)
    return alpha * l_mrr + beta * l_mcc, l_mrr, l_mcc


@torch.no_grad()
def codeword_top1(logits_BMK: torch.Tensor, codewords_BM: torch.Tensor) -> torch.Tensor:
    """Fraction of masked windows whose highest logit is their codeword (0-dim float32 tensor)."""
    return (logits_BMK.argmax(-1) == codewords_BM).float().mean()


@torch.no_grad()
def codeword_ndcg(logits_BMK: torch.Tensor, codewords_BM: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Mean NDCG@k of the codeword among the logits (0-dim float32 tensor).

    Ranks follow ``topk`` order (ties broken by the sort, as the official ``argsort``).
    """
    K = logits_BMK.shape[-1]
    k = min(k, K)
    scores_NK = logits_BMK.reshape(-1, K).float()
    top_Nk = scores_NK.topk(k, dim=-1).indices
    hits_Nk = (top_Nk == codewords_BM.reshape(-1, 1)).float()
    weights_k = 1.0 / torch.log2(torch.arange(2, k + 2, device=scores_NK.device, dtype=torch.float32))
    return (hits_Nk * weights_k).sum(-1).mean()


@torch.no_grad()
def representation_spread(rep_BND: torch.Tensor) -> torch.Tensor:
    """How far apart the windows' mean-pooled representations are (0-dim float32 tensor).

    ``h_B = mean_N rep_BN``: RMS distance of the ``h_B`` from their centre over the centre's norm.
    About 1 for a healthy encoder (native TimeMAE at init 1.0, after 100 epochs 0.7); near 0 when
    the encoder has collapsed to one output for every window (the regression task alone is
    minimised by a constant encoder and its momentum copy).
    """
    h_BD = rep_BND.float().mean(dim=1)
    centre_D = h_BD.mean(dim=0)
    rms = (h_BD - centre_D).pow(2).sum(dim=-1).mean().sqrt()
    return rms / centre_D.norm().clamp_min(torch.finfo(torch.float32).tiny)
