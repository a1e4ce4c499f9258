"""Typed config of the TimeMAE model (defaults = the official TimeMAE code, ``args.py``).

Mirrors the ``model:`` section of ``configs/pretrain/*.yaml``. ``in_channels`` and ``seq_len``
may stay null in YAML: the trainer fills them from the data store's manifest with
:meth:`TimeMAEConfig.with_data_shape` before building the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

from data_pipeline.typedconfig import ConfigError, option

__all__ = ["EncoderConfig", "TimeMAEConfig", "ModelConfig"]


@dataclass
class EncoderConfig:
    """Which transformer encodes the windows (online encoder and its momentum copy)."""

    type: Literal["native", "bert"] = option(
        "native",
        "native: the official post-LN blocks; bert: a Hugging Face BertModel fed inputs_embeds "
        "+ position_ids of the windows",
    )
    pretrained: Optional[str] = option(
        None,
        "local Hugging Face BERT folder (config.json + model.safetensors/pytorch_model.bin) to "
        "initialise from, offline; d_model and num_layers are taken from it (needs type: bert)",
    )

    def validate(self) -> None:
        if self.pretrained is not None:
            if self.type != "bert":
                raise ConfigError(
                    "pretrained", "a pretrained checkpoint needs encoder.type=bert (or drop encoder.pretrained)"
                )
            if not str(self.pretrained).strip():
                raise ConfigError("pretrained", "is empty; give a folder path or null")


@dataclass
class TimeMAEConfig:
    """TimeMAE: patch embedding, decoupled encoder/regressor, momentum target, tokenizer, losses."""

    in_channels: Optional[int] = option(
        None, "number of input channels C of a (C, T) window; null = taken from the data store"
    )
    seq_len: Optional[int] = option(
        None, "window length T in samples; null = taken from the data store"
    )
    wave_length: int = option(
        8, "samples per patch (Conv1d kernel = stride); T is zero-padded at the end to a multiple"
    )
    d_model: int = option(64, "hidden size (replaced by the checkpoint's hidden_size for a pretrained BERT)")
    num_layers: int = option(8, "online/target encoder layers (taken from a pretrained BERT)")
    num_heads: int = option(4, "attention heads of the encoder (native/bert from scratch) and of the regressor")
    reg_layers: int = option(4, "cross-attention layers of the regressor")
    ffn_mult: int = option(4, "feed-forward width = ffn_mult * d_model")
    dropout: float = option(0.2, "dropout of the encoder blocks (official args.py default 0.2)")
    reg_dropout: float = option(
        0.1, "dropout of the regressor blocks (the official code leaves them at 0.1)"
    )
    enable_res_parameter: bool = option(
        True, "post-LN residual norm(x + dropout(a * f(x))) with learnable scalar a init 1e-8; false: a = 1"
    )
    mask_ratio: float = option(0.6, "fraction of windows masked; num_masked = int(mask_ratio * L)")
    masking: Literal["per_sample", "per_batch"] = option(
        "per_sample",
        "per_sample: every window of the batch gets its own random mask; per_batch: one "
        "permutation for the whole batch (official code)",
    )
    momentum: float = option(0.99, "EMA factor of the target encoder: t = m * t + (1 - m) * online")
    vocab_size: int = option(192, "number of codewords of the tokenizer")
    alpha: float = option(5.0, "weight of the masked representation regression loss (MSE)")
    beta: float = option(1.0, "weight of the masked codeword classification loss (cross-entropy)")
    label_smoothing: float = option(0.2, "label smoothing of the codeword cross-entropy")
    encoder: EncoderConfig = option(EncoderConfig, "encoder backend")
    kernel_backend: Literal["auto", "torch", "triton", "eager"] = option(
        "auto",
        "masking gather: auto = timemae_dist.kernels picks by device; torch/triton force one; "
        "eager = plain indexing without the kernel module",
    )
    num_classes: Optional[int] = option(
        None, "classes of the fine-tuning head on the mean-pooled encoder output; null = no head"
    )

    # ----------------------------------------------------------------------------------------
    @property
    def num_windows(self) -> int:
        """L: number of patches per window after zero-padding T to a multiple of wave_length."""
        if self.seq_len is None:
            raise ConfigError("seq_len", "is not set; set model.seq_len or let the trainer fill it from the data store")
        return math.ceil(self.seq_len / self.wave_length)

    @property
    def num_masked(self) -> int:
        return int(self.mask_ratio * self.num_windows)

    @property
    def num_visible(self) -> int:
        return self.num_windows - self.num_masked

    def with_data_shape(self, in_channels: int, seq_len: int) -> "TimeMAEConfig":
        """A validated copy with the data shape filled in (values already set must agree)."""
        for name, value in (("in_channels", in_channels), ("seq_len", seq_len)):
            mine = getattr(self, name)
            if mine is not None and mine != value:
                raise ConfigError(name, f"is {mine} but the data has {value}; set it to {value} or null")
        cfg = dataclasses.replace(self, in_channels=in_channels, seq_len=seq_len)
        cfg.validate()
        return cfg

    def require_data_shape(self) -> None:
        """Raise ConfigError unless in_channels and seq_len are set (needed to build the model)."""
        for name in ("in_channels", "seq_len"):
            if getattr(self, name) is None:
                raise ConfigError(
                    name, "is not set; set it in the model config or build via cfg.with_data_shape(C, T)"
                )

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")

        for name in ("wave_length", "d_model", "num_layers", "num_heads", "reg_layers", "ffn_mult", "vocab_size"):
            positive(name)
        for name in ("in_channels", "seq_len", "num_classes"):
            if getattr(self, name) is not None:
                positive(name)
        if self.encoder.pretrained is None and self.d_model % self.num_heads:
            raise ConfigError(
                "num_heads", f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        for name in ("dropout", "reg_dropout", "label_smoothing"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {v}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError("mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError("momentum", f"must be in [0, 1], got {self.momentum}")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ConfigError("alpha", f"alpha={self.alpha} and beta={self.beta} must be >= 0 and not both 0")
        if self.seq_len is not None:
            num_windows, num_masked = self.num_windows, self.num_masked
            if num_masked == 0 or num_masked == num_windows:
                raise ConfigError(
                    "mask_ratio",
                    f"{self.mask_ratio} masks {num_masked} of L={num_windows} windows "
                    f"(seq_len={self.seq_len} / wave_length={self.wave_length}); TimeMAE needs at least "
                    "one visible and one masked window: change mask_ratio, seq_len or wave_length",
                )
        try:
            self.encoder.validate()
        except ConfigError as e:
            raise e.prefixed("encoder") from None


ModelConfig = TimeMAEConfig
