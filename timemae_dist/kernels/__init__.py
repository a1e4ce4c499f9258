"""Fused kernels (Triton) with eager PyTorch references.

``fused_mask_gather(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM, backend=None)``
builds TimeMAE's visible inputs, target-encoder inputs and regressor queries in one pass
without (B, L, D) copies of positions or mask tokens; see
:mod:`timemae_dist.kernels.mask_gather` (backends, gradients, TRITON_INTERPRET on CPU).

Loss fusion (MRR squared error + MCC label-smoothed CE, gradients computed in the same pass,
Triton kernel + eager reference) was built, passed its parity tests, and was measured with
``benchmarks/bench_kernels.py`` against ``F.mse_loss`` + ``F.cross_entropy(label_smoothing=0.2)``
(fwd+bwd, float32, CPU reference path, 2 cores): HAR (N=1152, D=64, K=192) 0.21-0.23 ms eager
vs 0.35-0.40 ms fused (0.5-0.65x), peak 2.8 vs 2.3 MB; large (N=314368, D=768, K=192) 802 ms
vs 1618 ms (0.50x), peak 2072 vs 2305 MB. No gain, so it is not kept (no GPU was available
to time the Triton version; the losses are a small fraction of a pretraining step anyway).
"""

from timemae_dist.kernels.mask_gather import fused_mask_gather, mask_gather_reference, triton_available

__all__ = ["fused_mask_gather", "mask_gather_reference", "triton_available"]
