"""MRR / MCC losses and the vectorised codeword metrics against plain loop references."""

from __future__ import annotations

import math

import pytest
import torch

from timemae_dist.model.objectives import codeword_ndcg, codeword_top1, mcc_loss, mrr_loss, timemae_loss


def _ndcg_loop(scores_NK: torch.Tensor, answers_N: torch.Tensor, k: int) -> float:
    """The official recalls_and_ndcgs_for_ks, row by row (one relevant item per row)."""
    total = 0.0
    for s, a in zip(scores_NK.tolist(), answers_N.tolist()):
        order = sorted(range(len(s)), key=lambda j: -s[j])[:k]
        dcg = sum(1.0 / math.log2(r + 2) for r, j in enumerate(order) if j == a)
        total += dcg / 1.0  # ideal DCG with one relevant item = 1 / log2(2) = 1
    return total / len(scores_NK)


def test_mrr_is_mean_squared_error():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    torch.testing.assert_close(mrr_loss(pred, target), ((pred - target) ** 2).mean())


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_mcc_is_label_smoothed_cross_entropy(eps):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    total = 0.0
    for row, label in zip(logits.reshape(-1, 7).tolist(), y.reshape(-1).tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        logp = [v - lse for v in row]
        total += (1 - eps) * -logp[label] + eps * -sum(logp) / 7
    torch.testing.assert_close(mcc_loss(logits, y, eps), torch.tensor(total / 10), rtol=1e-6, atol=1e-6)


def test_total_loss_and_gradients():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 4, generator=g)
    logits = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 6, (2, 3), generator=g)
    loss, l_mrr, l_mcc = timemae_loss(pred, target, logits, y, alpha=5.0, beta=1.0, label_smoothing=0.2)
    torch.testing.assert_close(loss, 5.0 * l_mrr + l_mcc)
    loss.backward()
    assert pred.grad is not None and logits.grad is not None


def test_losses_are_float32_for_bf16_inputs_under_autocast():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 3, 4, generator=g).bfloat16()
    target = torch.randn(2, 3, 4, generator=g).bfloat16()
    logits = torch.randn(2, 3, 6, generator=g).bfloat16()
    y = torch.randint(0, 6, (2, 3), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, l_mrr, l_mcc = timemae_loss(pred, target, logits, y)
    assert loss.dtype == l_mrr.dtype == l_mcc.dtype == torch.float32
    torch.testing.assert_close(l_mrr, ((pred.float() - target.float()) ** 2).mean())


@pytest.mark.parametrize("K, k", [(192, 10), (12, 10), (5, 10), (30, 1)])
def test_metrics_match_loop_reference(K, k):
    g = torch.Generator().manual_seed(K)
    logits = torch.randn(4, 9, K, generator=g)
    y = torch.randint(0, K, (4, 9), generator=g)
    y[0, :3] = logits[0, :3].argmax(-1)  # make sure some top-1 hits exist
    top1 = sum(int(r.argmax()) == a for r, a in zip(logits.reshape(-1, K), y.reshape(-1).tolist())) / 36
    assert codeword_top1(logits, y).item() == pytest.approx(top1)
    assert codeword_ndcg(logits, y, k).item() == pytest.approx(_ndcg_loop(logits.reshape(-1, K), y.reshape(-1), k))
    if k == 1:
        assert codeword_ndcg(logits, y, 1).item() == pytest.approx(top1)


def test_metrics_extremes():
    logits = torch.eye(6).unsqueeze(0)  # row i ranks codeword i first
    assert codeword_top1(logits, torch.arange(6).unsqueeze(0)).item() == 1.0
    assert codeword_ndcg(logits, torch.arange(6).unsqueeze(0)).item() == 1.0
    worst = torch.arange(12.0).expand(1, 3, 12)  # codeword 0 is ranked last (12th) -> outside top 10
    assert codeword_ndcg(worst, torch.zeros(1, 3, dtype=torch.long)).item() == 0.0
