"""Builders shared by the Ray worker loop and the single-process loop."""

from __future__ import annotations

import os

import random

import numpy as np
import torch

from timemae_dist.model import TimeMAE
from timemae_dist.train.config import PretrainConfig

__all__ = ["seed_all", "rank_seed", "build_model", "build_loader"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's masking/dropout RNG stream (distinct per rank, fixed per run)."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**63


def build_model(cfg: PretrainConfig) -> TimeMAE:
    """The model with identical weights on every rank (seeded by ``trainer.seed``).

    The momentum target encoder is still attached; the caller detaches it.
    """
    seed_all(cfg.trainer.seed)
    return TimeMAE(cfg.model)


def build_loader(cfg: PretrainConfig, rank: int, world_size: int):
    from data_pipeline.loader import open_loader

    d = cfg.data
    return open_loader(
        d.store,
        d.split,
        cfg.trainer.micro_batch_size,
        seed=cfg.trainer.seed,
        epoch=0,
        rank=rank,
        world_size=world_size,
        num_workers=d.loader_workers,
        shuffle=d.shuffle,
        remainder=d.remainder,
        labelled_only=d.labelled_only,
        normalize=d.normalize,
    )


def kernel_env(cfg: PretrainConfig) -> dict[str, str]:
    """The CPU kernels' switches for a run, ``{env var: mode}``: ``$TIMEMAE_CPU_DROPOUT`` /
    ``$TIMEMAE_CPU_FUSED`` where set, else ``trainer.cpu_dropout`` / ``trainer.cpu_fused``.
    ``on`` where a kernel cannot be built or run here fails now, before anything starts (Ray
    workers on other nodes that cannot build or run it fail in their first forward with the same
    message)."""
    from timemae_dist.kernels import cpu_dropout, cpu_fused
    from timemae_dist.train.errors import PretrainError

    env = {}
    for key, module in (("cpu_dropout", cpu_dropout), ("cpu_fused", cpu_fused)):
        kernel = module.KERNEL
        try:
            mode = kernel.effective_mode(getattr(cfg.trainer, key), f"trainer.{key}")
            if mode == "on" and not cfg.trainer.use_gpu:
                kernel.available("on")  # raises where it cannot be built
        except kernel.error as e:
            if os.environ.get(kernel.env, "").strip():  # the variable, which wins over the config, is the culprit
                raise PretrainError(f"${kernel.env}: {e}; set {kernel.env}=auto (eager fallback) or off, or unset it "
                                    f"to use trainer.{key}") from None
            raise PretrainError(f"trainer.{key}: {e}; set trainer.{key}=auto (eager fallback) or off") from None
        env[kernel.env] = mode
    return env
