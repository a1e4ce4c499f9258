"""Baselines that show what pretraining adds, built with the checkpoint's own architecture.

* **random_init**: the same encoder architecture with fresh weights, evaluated with exactly the
  protocol of the pretrained one (linear probe or fine-tuning).
* **scratch**: supervised training from scratch -- a random-init encoder + head trained end to
  end with the fine-tuning loop (:func:`timemae_dist.eval.finetune.finetune`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from timemae_dist.eval.finetune import build_classifier

__all__ = ["random_init_encoder", "scratch_classifier", "BASELINE_NAMES"]

BASELINE_NAMES = ("random_init", "scratch")


def random_init_encoder(model_config, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """A TimeMAE of the same config with weights drawn from ``seed`` (global RNG untouched), eval mode."""
    from timemae_dist.model import TimeMAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TimeMAE(copy.deepcopy(model_config))
    return model.to(device).eval()


def scratch_classifier(model_config, num_classes: int, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """Same architecture + a ``num_classes`` head, every weight random (seeded): supervised from scratch."""
    return build_classifier(model_config, num_classes, pretrained=None, seed=seed).to(device)
