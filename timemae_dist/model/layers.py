"""Native TimeMAE building blocks: attention, feed-forward, post-LN residual, encoder, regressor.

Same equations as the official TimeMAE ``model/layers.py``:

* attention: separate q/k/v/out Linear layers, softmax(q k^T / sqrt(d_head)) v with dropout on
  the attention probabilities;
* feed-forward: ``dropout(linear2(gelu(linear1(x))))``;
* residual: post-LayerNorm ``norm(x + dropout(a * f(x)))`` with a learnable scalar ``a``
  initialised to 1e-8 (``enable_res_parameter``) or the constant 1;
* encoder block: self-attention residual then feed-forward residual;
* regressor block: the queries (mask token + position) attend to the visible representations
  only (no self-attention among the queries, as the official ``CrossAttnTRMBlock``), then a
  feed-forward residual on the queries.

CPU speed (same math, same parameters and state-dict keys; see benchmarks/bench_pretrain.py):

* dropout compares 15-bit uniform integers with ``keep * 2**15``: one 64-bit draw of the
  generator gives four of them, about 2x cheaper on CPU than ``rand < keep`` (itself about 3x
  cheaper than ``F.dropout``'s ``bernoulli_``). The keep probability is thereby quantised to
  1/32768 (|error| <= 1.5e-5: 0.8 -> 0.79999) and the mask is scaled by the inverse of the
  quantised value, so ``E[mask] = 1`` exactly, as inverted dropout requires. On CPU, float32
  masks come from a C kernel (:mod:`timemae_dist.kernels.cpu_dropout`: the same 15-bit
  comparison on SplitMix64 outputs, one pass, ~8x cheaper than the eager ops; seeded from
  torch's generator, so ``manual_seed`` and checkpointed RNG states still determine them);
* the feed-forward's output dropout and the residual dropout that follows it are two
  independent Bernoulli(keep) masks, so they are drawn as one Bernoulli(keep1 * keep2) mask
  scaled by ``1 / (keep1 * keep2)`` (identical distribution);
* ``norm(x + dropout(a * y))`` is one ``addcmul(x, y, a * mask)`` then the LayerNorm;
* self-attention projects q, k and v with one matmul (weights concatenated on the fly; the
  cross-attention fuses k and v); attention scores are built transposed, ``(B, H, K, Q)``, so
  the softmax runs over a non-innermost dimension: CPU softmax over a tiny innermost dimension
  (K = 7..16 windows here) is ~8x slower than over an outer one;
* on CPUs with AVX-512, float32 attention over at most 16 keys (TimeMAE's 7-16 windows) runs its
  core (scores, softmax, dropout of the probabilities, weighted sum, and the backward of all
  four) in one C kernel reading the heads straight from the projections, and the post-LN
  residual ``norm(x + dropout(a * y))`` in another, and the feed-forward's GELU in a third
  (:mod:`timemae_dist.kernels.cpu_fused`; same equations; the residual draws the same dropout
  masks as the C dropout kernel, the attention its own; ``trainer.cpu_fused``); there each whole
  block also runs as one autograd node with its backward written out and three of its biases
  folded into those kernels (:mod:`timemae_dist.kernels.cpu_block`; not under ZeRO-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from timemae_dist.kernels import cpu_block, cpu_dropout, cpu_fused

__all__ = [
    "MultiHeadAttention",
    "FeedForward",
    "ResidualNorm",
    "TransformerBlock",
    "CrossAttentionBlock",
    "TransformerEncoder",
    "Regressor",
    "init_linear_official",
]


def init_linear_official(module: nn.Module) -> None:
    """Official init, applied with ``module.apply``: xavier-normal Linear weights, bias 0.1."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0.1)


_UNIFORM_BITS = 15  # bits of each uniform integer a dropout mask compares (4 per 64-bit draw)


def keep_threshold(p: float) -> int:
    """``round((1 - p) * 2**15)`` (at least 1): a mask keeps an element when its 15-bit uniform is below it."""
    return max(1, round((1.0 - p) * (1 << _UNIFORM_BITS)))


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout mask ``Bernoulli(k) / k`` shaped and typed like ``like`` (no grad), ``k ~= 1 - p``.

    ``k = keep_threshold(p) / 2**15`` (within 1.5e-5 of ``1 - p``). ``random_()`` on int64 draws
    uniform integers in ``[0, 2**63)``; each of their four 16-bit pieces, with its top bit
    cleared, is a uniform 15-bit integer (the draw's top bit, always 0, is one of those cleared).
    """
    thr = keep_threshold(p)
    if like.device.type == "cpu" and like.dtype == torch.float32:
        mask = cpu_dropout.keep_mask_f32(like, thr, (1 << _UNIFORM_BITS) / thr)
        if mask is not None:
            return mask
    n = like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_()
    u = bits.view(torch.int16)[:n].view(like.shape)
    return u.bitwise_and_((1 << _UNIFORM_BITS) - 1).lt_(thr).to(like.dtype).mul_((1 << _UNIFORM_BITS) / thr)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` in distribution, cheaper on CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    return x * keep_mask(x, p)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _project(self, q_BQD: torch.Tensor, kv_BKD: torch.Tensor):
        """``(q, k, v)`` as ``(B, H, N, Dh)``: one matmul for q|k|v (self) or k|v (cross)."""
        B, Q, D = q_BQD.shape
        K = kv_BKD.shape[1]
        H, Dh = self.num_heads, self.head_dim
        if q_BQD is kv_BKD:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            qkv_3BHND = F.linear(q_BQD, w, b).view(B, Q, 3, H, Dh).permute(2, 0, 3, 1, 4)
            return qkv_3BHND[0], qkv_3BHND[1], qkv_3BHND[2]
        w = torch.cat([self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.k_proj.bias, self.v_proj.bias])
        kv_2BHKD = F.linear(kv_BKD, w, b).view(B, K, 2, H, Dh).permute(2, 0, 3, 1, 4)
        q_BHQD = self.q_proj(q_BQD).view(B, Q, H, Dh).transpose(1, 2)
        return q_BHQD, kv_2BHKD[0], kv_2BHKD[1]

    def _fused_core(self, q_BQD: torch.Tensor, kv_BKD: torch.Tensor) -> torch.Tensor:
        """The attention output before ``out_proj``, ``(B, Q, D)``, from the fused CPU kernel, which
        reads the heads straight from the q|k|v (or q and k|v) projections."""
        p, training = self.dropout, self.training
        if q_BQD is kv_BKD:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            return cpu_fused.attention_core(F.linear(q_BQD, w, b), None, self.num_heads, p, training)
        w = torch.cat([self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.k_proj.bias, self.v_proj.bias])
        return cpu_fused.attention_core(self.q_proj(q_BQD), F.linear(kv_BKD, w, b), self.num_heads, p, training)

    def forward(self, q_BQD: torch.Tensor, kv_BKD: torch.Tensor) -> torch.Tensor:
        if cpu_fused.applies(q_BQD, kv_BKD.shape[1], self.head_dim):
            return self.out_proj(self._fused_core(q_BQD, kv_BKD))
        q, k, v = self._project(q_BQD, kv_BKD)
        # Scores transposed, (B, H, K, Q): the softmax over keys is then over dim -2 (fast on CPU).
        s_BHKQ = torch.matmul(k, q.transpose(-2, -1)).mul_(self.head_dim**-0.5)
        p_BHKQ = dropout(torch.softmax(s_BHKQ, dim=-2), self.dropout, self.training)
        o_BHQD = torch.matmul(p_BHKQ.transpose(-2, -1), v)
        B, H, Q, Dh = o_BHQD.shape
        return self.out_proj(o_BHQD.transpose(1, 2).reshape(B, Q, H * Dh))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout = nn.Dropout(dropout)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """``linear2(gelu(linear1(x)))``: the feed-forward before its output dropout."""
        h = self.linear1(x)
        return self.linear2(cpu_fused.gelu(h) if cpu_fused.applies_gelu(h) else F.gelu(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.inner(x), self.dropout.p, self.training)


class ResidualNorm(nn.Module):
    """``norm(x + dropout(a * y))``; ``a`` learnable (init 1e-8) or the constant 1."""

    def __init__(self, d_model: int, enable_res_parameter: bool, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        # shape (1,), not 0-dim: DeepSpeed broadcasts parameters as uint8 views, which 0-dim refuses
        self.a = nn.Parameter(torch.full((1,), 1e-8)) if enable_res_parameter else None

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_dropout: float = 0.0) -> torch.Tensor:
        """``y_dropout``: a dropout ``y`` still owes (applied first); merged with this one's mask."""
        keep = (1.0 - y_dropout) * (1.0 - self.dropout.p) if self.training else 1.0
        if cpu_fused.applies_residual(x, y):
            return cpu_fused.residual_norm(x, y, self.a, self.norm, 1.0 - keep)
        if keep < 1.0:
            scale = keep_mask(y, 1.0 - keep)
            scale = scale if self.a is None else scale * self.a
        elif self.a is not None:
            scale = self.a
        else:
            return self.norm(x + y)
        return self.norm(torch.addcmul(x, y, scale))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ffn: int, enable_res_parameter: bool, dropout: float):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ffn = FeedForward(d_model, d_ffn, dropout)
        self.res1 = ResidualNorm(d_model, enable_res_parameter, dropout)
        self.res2 = ResidualNorm(d_model, enable_res_parameter, dropout)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        if cpu_block.applies(self, x_BND):
            return cpu_block.block_forward(self, x_BND)
        x_BND = self.res1(x_BND, self.attn(x_BND, x_BND))
        return self.res2(x_BND, self.ffn.inner(x_BND), y_dropout=self.ffn.dropout.p)


class CrossAttentionBlock(TransformerBlock):
    """Queries attend to keys/values only (no query self-attention), then a feed-forward.

    Same parameters as :class:`TransformerBlock`; only the attention inputs differ.
    """

    def forward(self, q_BMD: torch.Tensor, kv_BVD: torch.Tensor) -> torch.Tensor:
        if cpu_block.applies(self, q_BMD, kv_BVD):
            return cpu_block.block_forward(self, q_BMD, kv_BVD)
        q_BMD = self.res1(q_BMD, self.attn(q_BMD, kv_BVD))
        return self.res2(q_BMD, self.ffn.inner(q_BMD), y_dropout=self.ffn.dropout.p)


class TransformerEncoder(nn.Module):
    """Stack of post-LN blocks. ``positions`` is accepted (and ignored) for API parity with the
    BERT backend: native inputs already carry their position embedding."""

    def __init__(
        self, d_model: int, num_layers: int, num_heads: int, d_ffn: int, enable_res_parameter: bool, dropout: float
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ffn, enable_res_parameter, dropout) for _ in range(num_layers)
        )

    def forward(self, x_BND: torch.Tensor, positions_BN: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x_BND = layer(x_BND)
        return x_BND


class Regressor(nn.Module):
    """Decoupled regressor: masked-window queries read the visible representations."""

    def __init__(
        self, d_model: int, num_layers: int, num_heads: int, d_ffn: int, enable_res_parameter: bool, dropout: float
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            CrossAttentionBlock(d_model, num_heads, d_ffn, enable_res_parameter, dropout) for _ in range(num_layers)
        )

    def forward(self, queries_BMD: torch.Tensor, visible_BVD: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries_BMD = layer(queries_BMD, visible_BVD)
        return queries_BMD
