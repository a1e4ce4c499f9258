"""TimeMAE model: patch embedding, decoupled encoder/regressor, momentum target, tokenizer.

``from timemae_dist.model import TimeMAE, TimeMAEConfig``; see :mod:`timemae_dist.model.timemae`.
"""

from timemae_dist.model.config import EncoderConfig, ModelConfig, TimeMAEConfig
from timemae_dist.model.objectives import (
    codeword_ndcg,
    codeword_top1,
    mcc_loss,
    mrr_loss,
    representation_spread,
    timemae_loss,
)
from timemae_dist.model.timemae import TimeMAE, build_model, draw_codewords, gumbel_noise, random_masks

__all__ = [
    "TimeMAE",
    "TimeMAEConfig",
    "ModelConfig",
    "EncoderConfig",
    "build_model",
    "random_masks",
    "draw_codewords",
    "gumbel_noise",
    "mrr_loss",
    "mcc_loss",
    "timemae_loss",
    "codeword_top1",
    "codeword_ndcg",
    "representation_spread",
]
