"""Generate DeepSpeed's JSON config from the typed :class:`PretrainConfig` (never hand-edited)."""

from __future__ import annotations

from typing import Any

from timemae_dist.train.config import PretrainConfig

__all__ = ["build_ds_config", "clips_in_hook", "uses_flat_params"]


def clips_in_hook(cfg: PretrainConfig) -> bool:
    """ZeRO-0 fp32: DeepSpeed hands the step to the plain torch optimizer, clips with a Python loop
    over the parameters (a norm and a multiply each, plus an all-reduce of the total) and reports
    no gradient norm, so the engine gets ``gradient_clipping: 0`` and the optimizer a pre-step hook
    that computes the norm (two foreach calls), clips by it and reports it
    (:func:`timemae_dist.train.worker.install_grad_norm_hook`)."""
    return cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"


def uses_flat_params(cfg: PretrainConfig, engine: str) -> bool:
    """Whether the ``engine`` (``"plain"`` or ``"deepspeed"``) steps one flat parameter buffer
    (:mod:`timemae_dist.train.flat`): ``trainer.flat_params`` where the optimizer sees the module's
    own parameters, i.e. the single-process engine and ZeRO-0 fp32."""
    return cfg.trainer.flat_params and (engine == "plain" or clips_in_hook(cfg))


def build_ds_config(cfg: PretrainConfig, world_size: int, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``world_size`` ranks training ``total_steps`` optimizer steps.

    AdamW (torch's fused implementation unless the optimizer is offloaded, where DeepSpeed's CPU Adam
    is the supported one) + ``WarmupCosineLR`` stepped once per optimizer step by the engine.
    """
    ds, tr = cfg.deepspeed, cfg.trainer
    adam: dict[str, Any] = {
        "lr": ds.lr,
        "betas": list(ds.betas),
        "eps": ds.eps,
        "weight_decay": ds.weight_decay,
    }
    if not ds.offload_optimizer:
        adam["torch_adam"] = True
        adam["fused"] = True  # torch's fused AdamW kernel: one call over all tensors (CPU and CUDA)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=False,
            reduce_scatter=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tr.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": tr.use_gpu}
    if ds.zero_stage == 3:
        # Gather a 16-bit copy on save is not needed: export consolidates with zero_to_fp32.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * world_size,
        "gradient_clipping": 0.0 if clips_in_hook(cfg) else ds.clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(int(total_steps), ds.warmup_steps + 1),
                "warmup_min_ratio": 0.0,
                "warmup_num_steps": ds.warmup_steps,
                "warmup_type": "linear",
                "cos_min_ratio": ds.min_lr_ratio,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.offload_optimizer and not tr.use_gpu:
        config["zero_force_ds_cpu_optimizer"] = False
    return config
