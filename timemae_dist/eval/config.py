"""Typed config of evaluation: linear probe, fine-tuning, label-scarce protocol, t-SNE map.

Mirrors ``configs/eval/linear.yaml`` and ``configs/eval/finetune.yaml`` (one schema for both;
each file sets what its command uses). Load with :func:`load_eval_config` (YAML + dotted
``key=value`` overrides); the CLI flags ``--label-fraction``, ``--seeds``, ``--baselines`` and
``--out`` are shorthands for ``label_fractions``, ``num_seeds``, ``baselines`` and ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from data_pipeline.typedconfig import ConfigError, load_config, option

MULTI_CLASS = ("ovr", "multinomial")  # the linear probe's multi-class schemes (timemae_dist.eval.linear)
HEAD_INIT = ("random", "probe")  # how fine-tuning starts its classification head (timemae_dist.eval.finetune)

__all__ = ["MULTI_CLASS", "HEAD_INIT", "LinearProbeConfig", "FinetuneConfig", "EmbedConfig", "EvalConfig", "load_eval_config"]


@dataclass
class LinearProbeConfig:
    """Frozen encoder -> mean-pooled features -> StandardScaler + LogisticRegression."""

    C_grid: list[float] = option(
        [0.001, 0.01, 0.1, 1.0, 10.0, 100.0],
        "inverse regularisation strengths tried; the one with the best val accuracy is kept "
        "(ties: the first in the list)",
    )
    multi_class: list[str] = option(
        ["ovr", "multinomial"],
        "multi-class schemes tried, each with the C grid, the best val accuracy kept (ties: the first "
        "listed): ovr = one binary LogisticRegression per class (the official TimeMAE probe), "
        "multinomial = one softmax",
    )
    max_iter: int = option(2000, "LBFGS iterations of LogisticRegression")
    extend_edges: int = option(
        4,
        "when val picks the largest (smallest) C of the grid, try up to this many more, each 10x "
        "larger (smaller), while val accuracy improves; 0 (or a grid of one C) = the grid as given",
    )

    def validate(self) -> None:
        if self.extend_edges < 0:
            raise ConfigError("extend_edges", f"must be >= 0, got {self.extend_edges}")
        if not self.C_grid:
            raise ConfigError("C_grid", "list at least one value of C")
        if any(c <= 0 for c in self.C_grid):
            raise ConfigError("C_grid", f"every C must be > 0, got {self.C_grid}")
        if self.max_iter < 1:
            raise ConfigError("max_iter", f"must be >= 1, got {self.max_iter}")
        bad = [m for m in self.multi_class if m not in MULTI_CLASS]
        if bad or not self.multi_class or len(set(self.multi_class)) != len(self.multi_class):
            raise ConfigError(
                "multi_class", f"list ovr and/or multinomial, each once (got {self.multi_class})"
            )


@dataclass
class FinetuneConfig:
    """Encoder + linear head trained end to end with Adam; early stopping on val."""

    lr: float = option(1e-3, "Adam learning rate (official TimeMAE: 1e-3)")
    lr_grid: list[float] = option(
        [], "learning rates to try instead of lr, each a full run; the best val accuracy is kept "
        "(ties: lower val loss, then the first listed); [] = lr alone"
    )
    weight_decay: float = option(0.0, "Adam L2 weight decay")
    epochs: int = option(100, "maximum number of epochs over the (label-fraction) train windows")
    batch_size: int = option(128, "training batch size (official TimeMAE: 128)")
    patience: int = option(
        10, "stop after this many epochs without a better val accuracy; 0 = never stop early"
    )
    min_steps_per_epoch: int = option(
        1, "repeat a tiny label-fraction train set so an epoch has at least this many steps"
    )
    head_init: list[str] = option(
        ["random"],
        "how a pretrained encoder's head starts, each listed one a full run, the best val accuracy kept "
        "(ties: lower val loss, then the first listed): random = fresh seeded init (the official code), "
        "probe = the multinomial linear probe fit on the frozen encoder's train representations, C chosen "
        "on val (LP-FT, linear probing then fine-tuning); supervised-from-scratch always starts random",
    )

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if any(lr <= 0 for lr in self.lr_grid) or len(set(self.lr_grid)) != len(self.lr_grid):
            raise ConfigError("lr_grid", f"list distinct learning rates > 0 (or [] for lr alone), got {self.lr_grid}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("epochs", "batch_size", "min_steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ConfigError("patience", f"must be >= 0, got {self.patience}")
        bad = [h for h in self.head_init if h not in HEAD_INIT]
        if bad or not self.head_init or len(set(self.head_init)) != len(self.head_init):
            raise ConfigError("head_init", f"list random and/or probe, each once (got {self.head_init})")

    @property
    def lrs(self) -> list[float]:
        """The learning rates a fine-tuning run tries."""
        return list(self.lr_grid) or [self.lr]


@dataclass
class EmbedConfig:
    """2-D t-SNE of test representations (pretrained vs random init), seeded."""

    max_points: int = option(2000, "stratified seeded subsample of labelled test windows plotted")
    perplexity: float = option(30.0, "t-SNE perplexity (lowered automatically for tiny sets)")

    def validate(self) -> None:
        if self.max_points < 2:
            raise ConfigError("max_points", f"must be >= 2, got {self.max_points}")
        if self.perplexity <= 0:
            raise ConfigError("perplexity", f"must be > 0, got {self.perplexity}")


@dataclass
class EvalConfig:
    """How a pretrained encoder is evaluated on a labelled store (train / val / test)."""

    normalize: bool = option(True, "apply the store's train-split per-channel normalisation (as pretraining)")
    batch_size: int = option(256, "windows per forward pass when encoding a split")
    label_fractions: list[float] = option(
        [1.0], "stratified fractions of the labelled train windows (data_pipeline.splits)"
    )
    num_seeds: int = option(1, "seeds per label fraction (subset, head init, shuffling); mean +- std")
    seed: int = option(0, "first seed; seed i is seed + i")
    baselines: bool = option(
        False, "also evaluate a random-init encoder (same protocol) and supervised-from-scratch"
    )
    scratch_baseline: bool = option(
        True, "with baselines: include supervised-from-scratch (the slow one; false = random init only)"
    )
    train_split: str = option("train", "split the classifier is trained on")
    val_split: str = option("val", "split used for every model-selection decision")
    test_split: str = option("test", "split reported once, at the end")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available")
    out: Optional[str] = option(None, "output directory for results.json / results.md / plots; null = none")
    linear: LinearProbeConfig = option(LinearProbeConfig, "linear probe")
    finetune: FinetuneConfig = option(FinetuneConfig, "fine-tuning and supervised-from-scratch")
    embed: EmbedConfig = option(EmbedConfig, "t-SNE map")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not self.label_fractions:
            raise ConfigError("label_fractions", "list at least one fraction, e.g. [1.0]")
        for f in self.label_fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError("label_fractions", f"each fraction must be in (0, 1], got {f}")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise ConfigError("label_fractions", f"fractions repeat: {self.label_fractions}")
        if self.num_seeds < 1:
            raise ConfigError("num_seeds", f"must be >= 1, got {self.num_seeds}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")
        if self.test_split in (self.train_split, self.val_split):
            raise ConfigError(
                "test_split", f"{self.test_split!r} is also used for training/selection; use a held-out split"
            )
        if self.val_split == self.train_split:
            raise ConfigError("val_split", f"{self.val_split!r} is the train split; select on a held-out split")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_seeds)]


def load_eval_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    """YAML file (optional) + dotted overrides -> validated :class:`EvalConfig`."""
    return load_config(EvalConfig, path, overrides)
