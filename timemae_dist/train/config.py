"""The pretraining config: data + model + trainer + deepspeed + run sections.

Mirrors ``configs/pretrain/*.yaml``. Load with :func:`load_pretrain_config` (YAML + dotted
``key=value`` overrides); ``model.in_channels`` / ``model.seq_len`` left null are taken from the
store's manifest. The DeepSpeed JSON is generated from this config by
:func:`timemae_dist.train.ds_config.build_ds_config`, never written by hand.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from data_pipeline.typedconfig import ConfigError, apply_overrides, from_dict, option, read_yaml, to_dict
from timemae_dist.model.config import TimeMAEConfig

__all__ = [
    "DataSection",
    "TrainerSection",
    "DeepSpeedSection",
    "RunSection",
    "PretrainConfig",
    "load_pretrain_config",
]


@dataclass
class DataSection:
    """Which store and split feed pretraining, and how the loader reads it."""

    store: str = option("stores/hapt_har", "store directory written by `timemae data prepare`")
    split: str = option("train", "split of the store to pretrain on")
    normalize: bool = option(True, "apply the store's train-split per-channel normalisation")
    loader_workers: int = option(0, "background reader processes per training worker (0 = inline)")
    shuffle: bool = option(True, "shuffle windows each epoch (a pure function of seed and epoch)")
    remainder: Literal["drop", "wrap"] = option(
        "drop", "the last incomplete batch of an epoch: drop it or wrap around to fill it"
    )
    labelled_only: bool = option(
        False, "pretrain on labelled windows only (ablation; default uses unlabelled ones too)"
    )

    def validate(self) -> None:
        if not self.store:
            raise ConfigError("store", "set data.store=PATH to a store directory")
        if self.loader_workers < 0:
            raise ConfigError("loader_workers", "must be >= 0")


@dataclass
class TrainerSection:
    """How many workers, how big the batches, how long to train."""

    num_workers: int = option(1, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = option(False, "one GPU per worker (NCCL); false = CPU workers with gloo")
    cpus_per_worker: int = option(1, "CPUs reserved per worker; also torch threads on CPU")
    micro_batch_size: int = option(128, "windows per worker per forward/backward")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    global_batch_size: Optional[int] = option(
        None, "optional check: must equal micro_batch_size x grad_accum x num_workers"
    )
    max_steps: int = option(0, "optimizer steps to run; 0 = `epochs` full passes over the split")
    epochs: int = option(1, "passes over the split when max_steps is 0")
    stop_after: Optional[int] = option(
        None, "stop this invocation at this step (schedule still spans max_steps); re-run to continue"
    )
    seed: int = option(0, "seed of weights, masking, dropout and data order")
    mkl_avx512: Literal["auto", "on", "off"] = option(
        "auto",
        "CPU workers on AMD CPUs with AVX-512: run oneMKL's AVX-512 GEMM kernels (about 2x faster fp32 GEMM; "
        "see timemae_dist/mkl_avx512.py); auto = where it applies, on = error where it cannot",
    )
    cpu_dropout: Literal["auto", "on", "off"] = option(
        "auto",
        "CPU dropout masks from a one-pass C kernel (about 8x cheaper than torch's; see "
        "timemae_dist/kernels/cpu_dropout.py); auto = where it builds, on = error where it cannot, "
        "off = torch's eager ops; $TIMEMAE_CPU_DROPOUT, where set, wins",
    )
    cpu_fused: Literal["auto", "on", "off"] = option(
        "auto",
        "fused CPU kernels: the attention core (scores, softmax, dropout, weighted sum), the post-LN "
        "residual (dropout, scale, add, LayerNorm) and GELU, forward and backward, one C pass each (AVX-512; "
        "see timemae_dist/kernels/cpu_fused.py for the shapes they take); auto = where they build and "
        "apply, on = error where they cannot build, off = torch's eager ops; $TIMEMAE_CPU_FUSED, where "
        "set, wins",
    )

    flat_params: bool = option(
        True,
        "ZeRO-0 fp32 and --single-process: the parameters as views of one buffer, so the optimizer, the "
        "gradient clip and the EMA each run as one kernel instead of one per tensor (see "
        "timemae_dist/train/flat.py); a checkpoint resumes only with the setting it was written with",
    )

    def validate(self) -> None:
        for name in ("num_workers", "cpus_per_worker", "micro_batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ConfigError("max_steps", "must be >= 0 (0 = train for `epochs`)")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError("stop_after", "must be >= 1 (or null = run to the end)")
        if self.global_batch_size is not None:
            per_step = self.micro_batch_size * self.num_workers
            if self.global_batch_size % per_step != 0:
                raise ConfigError(
                    "global_batch_size",
                    f"{self.global_batch_size} is not divisible by micro_batch_size x num_workers "
                    f"= {self.micro_batch_size} x {self.num_workers} = {per_step}; pick a multiple "
                    "or leave it null",
                )
            accum = self.global_batch_size // per_step
            if self.grad_accum not in (1, accum):
                raise ConfigError(
                    "global_batch_size",
                    f"{self.global_batch_size} != micro_batch_size x grad_accum x num_workers "
                    f"= {per_step * self.grad_accum}; set only one of grad_accum / global_batch_size",
                )
            self.grad_accum = accum

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_workers


@dataclass
class DeepSpeedSection:
    """The DeepSpeed engine: ZeRO stage, offload, precision, optimizer and LR schedule."""

    zero_stage: int = option(0, "ZeRO stage 0 (plain DDP), 1 (optimizer), 2 (+grads), 3 (+params)")
    offload_optimizer: bool = option(False, "keep optimizer state in CPU memory (ZeRO >= 1)")
    offload_params: bool = option(False, "keep parameters in CPU memory (ZeRO 3 only)")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "compute precision; fp16 uses dynamic loss scaling; loss math stays float32"
    )
    clip: float = option(1.0, "gradient clipping max global norm (0 = off)")
    lr: float = option(1e-3, "peak learning rate of AdamW")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    warmup_steps: int = option(100, "linear warm-up optimizer steps before cosine decay (>= 1)")
    min_lr_ratio: float = option(0.01, "final LR of the cosine decay as a fraction of lr")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(
                "zero_stage", f"got {self.zero_stage}; ZeRO stages are 0, 1, 2 or 3"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params", "parameter offload needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", "optimizer offload needs deepspeed.zero_stage>=1")
        if self.clip < 0:
            raise ConfigError("clip", "must be >= 0 (0 = off)")
        if self.lr <= 0:
            raise ConfigError("lr", "must be > 0")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", "must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"need two values in [0, 1), got {self.betas}")
        if self.warmup_steps < 1:
            raise ConfigError("warmup_steps", "must be >= 1 (DeepSpeed's WarmupCosineLR needs it)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", "must be in [0, 1]")


@dataclass
class RunSection:
    """Where the run lives, how often it logs and checkpoints, how it survives failures."""

    storage_path: str = option("runs", "directory holding every run (TensorBoard: --logdir this)")
    name: Optional[str] = option(
        None, "run name; re-using a name resumes that run; null = a fresh timestamped name"
    )
    checkpoint_every: int = option(500, "optimizer steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = option(3, "checkpoints kept on disk (the newest)")
    log_every: int = option(50, "optimizer steps between log lines / TensorBoard points")
    max_failures: int = option(1, "worker-group restarts from the last checkpoint before giving up")
    eval_every: int = option(
        0,
        "optimizer steps between linear probes on the validation split (rank 0 logs "
        "eval/linear_val_acc; also at the end of the run); 0 = off",
    )
    console: bool = option(True, "print one line per log step on rank 0")
    trace_data: bool = option(
        False, "debugging: each rank appends the window indices of every batch to <run>/trace/"
    )

    def validate(self) -> None:
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every", "must be >= 0 (0 = only at the end)")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints", "must be >= 1")
        if self.log_every < 1:
            raise ConfigError("log_every", "must be >= 1")
        if self.eval_every < 0:
            raise ConfigError("eval_every", "must be >= 0 (0 = no linear probe during pretraining)")
        if self.max_failures < -1:
            raise ConfigError("max_failures", "must be >= 0 (or -1 = retry forever)")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError("name", f"{self.name!r} must be a non-empty name without '/'")

    @property
    def run_dir(self) -> Path:
        assert self.name is not None, "resolve run.name first"
        return Path(self.storage_path).expanduser().resolve() / self.name


@dataclass
class PretrainConfig:
    """Everything `timemae pretrain` needs."""

    data: DataSection = option(DataSection, "the store and how it is read")
    model: TimeMAEConfig = option(TimeMAEConfig, "the TimeMAE model (in_channels/seq_len from the store when null)")
    trainer: TrainerSection = option(TrainerSection, "workers, batches, steps")
    deepspeed: DeepSpeedSection = option(DeepSpeedSection, "DeepSpeed engine settings")
    run: RunSection = option(RunSection, "storage, logging, checkpoints, failures")

    def validate(self) -> None:
        if self.deepspeed.precision == "fp16" and not self.trainer.use_gpu:
            raise ConfigError(
                "deepspeed.precision",
                "fp16 needs GPUs (trainer.use_gpu=true); on CPU use bf16 or fp32",
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_pretrain_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PretrainConfig:
    """YAML + dotted overrides -> a validated :class:`PretrainConfig` (run.name filled in).

    ``model.in_channels`` / ``model.seq_len`` may stay null here; :func:`preflight.resolve`
    fills them from the store before anything is built.
    """
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides, PretrainConfig)
    cfg = from_dict(PretrainConfig, raw)
    if cfg.run.name is None:
        cfg.run.name = "pretrain-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cfg
