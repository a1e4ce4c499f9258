"""Native TimeMAE building blocks: attention, feed-forward, post-LN residual, encoder, regressor.

Same equations as the official TimeMAE ``model/layers.py``:

* attention: separate q/k/v/out Linear layers, softmax(q k^T / sqrt(d_head)) v with dropout on
  the attention probabilities (here via ``F.scaled_dot_product_attention``);
* feed-forward: ``dropout(linear2(gelu(linear1(x))))``;
* residual: post-LayerNorm ``norm(x + dropout(a * f(x)))`` with a learnable scalar ``a``
  initialised to 1e-8 (``enable_res_parameter``) or the constant 1;
* encoder block: self-attention residual then feed-forward residual;
* regressor block: the queries (mask token + position) attend to the visible representations
  only (no self-attention among the queries, as the official ``CrossAttnTRMBlock``), then a
  feed-forward residual on the queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    def _heads(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, _ = x_BND.shape
        return x_BND.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, q_BQD: torch.Tensor, kv_BKD: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(q_BQD))
        k = self._heads(self.k_proj(kv_BKD))
        v = self._heads(self.v_proj(kv_BKD))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        B, H, Q, Dh = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, Q, H * Dh))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(F.gelu(self.linear1(x))))


class ResidualNorm(nn.Module):
    """``norm(x + dropout(a * y))``; ``a`` learnable (init 1e-8) or the constant 1."""

    def __init__(self, d_model: int, enable_res_parameter: bool, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        # shape (1,), not 0-dim: DeepSpeed broadcasts parameters as uint8 views, which 0-dim refuses
        self.a = nn.Parameter(torch.full((1,), 1e-8)) if enable_res_parameter else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.a is not None:
            y = self.a * y
        return self.norm(x + self.dropout(y))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ffn: int, enable_res_parameter: bool, dropout: float):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ffn = FeedForward(d_model, d_ffn, dropout)
        self.res1 = ResidualNorm(d_model, enable_res_parameter, dropout)
        self.res2 = ResidualNorm(d_model, enable_res_parameter, dropout)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = self.res1(x_BND, self.attn(x_BND, x_BND))
        return self.res2(x_BND, self.ffn(x_BND))


class CrossAttentionBlock(TransformerBlock):
    """Queries attend to keys/values only (no query self-attention), then a feed-forward.

    Same parameters as :class:`TransformerBlock`; only the attention inputs differ.
    """

    def forward(self, q_BMD: torch.Tensor, kv_BVD: torch.Tensor) -> torch.Tensor:
        q_BMD = self.res1(q_BMD, self.attn(q_BMD, kv_BVD))
        return self.res2(q_BMD, self.ffn(q_BMD))


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
