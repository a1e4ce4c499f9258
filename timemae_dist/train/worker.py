"""The Ray Train worker loop: one DeepSpeed engine per worker, checkpoints reported to Ray.

``train_loop_per_worker`` runs in every Ray Train worker. Ray gives it the rank, the world size
and the torch process group (gloo on CPU, NCCL on GPU); DeepSpeed reuses that group.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from data_pipeline.typedconfig import from_dict
from timemae_dist.train.build import build_loader, build_model, rank_seed, seed_all
from timemae_dist.train.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from timemae_dist.train.config import PretrainConfig
from timemae_dist.train.ds_config import build_ds_config, clips_in_hook, uses_flat_params
from timemae_dist.train.flat import FlatParameters
from timemae_dist.train.metrics import MetricsWriter, console
from timemae_dist.train.trainer import Trainer, clip_flat_grad_, clip_grad_norm, total_steps

__all__ = ["train_loop_per_worker", "build_engine", "install_grad_norm_hook"]


def build_engine(cfg: PretrainConfig, model: torch.nn.Module, world_size: int, num_steps: int):
    """``deepspeed.initialize`` with the generated config, on the process group already set up."""
    import deepspeed

    ds_config = build_ds_config(cfg, world_size, num_steps)
    if cfg.deepspeed.zero_stage == 3:
        # The attention projects q|k|v with one matmul over its Linear children's weights, so
        # ZeRO-3 must gather all of an attention module's parameters when it enters it.
        from deepspeed.utils import set_z3_leaf_modules

        from timemae_dist.model.layers import MultiHeadAttention

        set_z3_leaf_modules(model, [MultiHeadAttention], raise_if_not_found=False)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = None
    if uses_flat_params(cfg, "deepspeed"):
        # The engine's optimizer steps one buffer the module's parameters are views of
        # (timemae_dist/train/flat.py). Move first: DeepSpeed's own module.to(device) is then a no-op
        # and keeps the views.
        if cfg.trainer.use_gpu:
            model.to(torch.device("cuda", torch.cuda.current_device()))
        flat = FlatParameters(params)
        params = [flat.param]
    engine, _opt, _loader, _sched = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds_config,
        dist_init_required=False,  # Ray Train already initialised torch.distributed
    )
    if flat is not None and not flat.is_intact():
        raise RuntimeError("deepspeed.initialize re-allocated the flat parameters' views; set trainer.flat_params=false")
    if world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # One rank: the gradient all-reduce (flatten, all-reduce, copy back) is the identity.
        engine.enable_backward_allreduce = False
    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "fp32" and not cfg.deepspeed.offload_optimizer:
        share_zero3_master_weights(engine.optimizer)
    if clips_in_hook(cfg):
        install_grad_norm_hook(engine.optimizer, cfg.deepspeed.clip, flat)
    return engine


def install_grad_norm_hook(optimizer: torch.optim.Optimizer, clip: float, flat: FlatParameters | None = None) -> None:
    """Before each step: the gradients' 2-norm, clipped by it when ``clip > 0``
    (:func:`timemae_dist.train.trainer.clip_grad_norm`, as the single-process engine does; with
    ``flat``, the optimizer's one flat parameter, first the module's gradients gathered into its
    flat gradient, which a post-step hook drops again), and the
    norm left in ``optimizer._global_grad_norm``, where DeepSpeed's engine reads it after the step
    (``engine.get_global_grad_norm()``). For ZeRO-0 fp32
    (:func:`timemae_dist.train.ds_config.clips_in_hook`), where the gradients the optimizer sees are
    already all-reduced, so the norm is the global one on every rank."""

    def pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if flat is not None:
            opt._global_grad_norm = clip_flat_grad_(flat.gather_grads(), clip)
            return
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if params:
            opt._global_grad_norm = clip_grad_norm(params, clip)

    optimizer.register_step_pre_hook(pre_step)
    if flat is not None:
        optimizer.register_step_post_hook(lambda opt, args, kwargs: flat.release_grad())


def share_zero3_master_weights(zero3_optimizer: Any) -> int:
    """fp32 ZeRO-3: let the fp32 master partition share the parameter partition's storage.

    DeepSpeed (0.19) means to skip the master copy when the partitioned parameters are already
    fp32 on the optimizer's device, but its check compares ``tensor.device`` with the string
    ``"cpu"``/``"cuda:0"``, which is False under recent torch, so it keeps a second identical
    partition (+25% of ZeRO-3's per-rank parameter/gradient/optimizer bytes). Its optimizer step
    then copies master -> parameters, a no-op once they alias. Returns the bytes freed.
    """
    lp = getattr(zero3_optimizer, "fp16_partitioned_groups_flat", None)
    hp = getattr(zero3_optimizer, "fp32_partitioned_groups_flat", None)
    if not lp or not hp or len(lp) != len(hp):
        return 0
    freed = 0
    for low, master in zip(lp, hp):
        if (
            low.dtype == master.dtype
            and low.device == master.device
            and low.shape == master.shape
            and low.data_ptr() != master.data_ptr()
            and torch.equal(low, master)
        ):
            master.data = low.data
            freed += low.numel() * low.element_size()
    return freed


def write_pid(run_dir: Path, rank: int) -> None:
    """``<run>/pids/rank_<r>.pid``: lets tests (and operators) find a worker process."""
    d = run_dir / "pids"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank_{rank}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, d / f"rank_{rank}.pid")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``<run>/summary.json`` (rank 0, at the end): what the driver prints as its last line."""
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / "summary.json")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    cfg = from_dict(PretrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = cfg.run.run_dir
    write_pid(run_dir, rank)
    if cfg.trainer.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.trainer.cpus_per_worker)
        from timemae_dist.mkl_avx512 import describe, status

        st = status()
        # rank 0 says which GEMM path it runs; every rank warns if its node lacks the shim it should have
        if rank == 0 or (cfg.trainer.mkl_avx512 != "off" and st["applies"] and not st["loaded"]):
            console(f"rank {rank}: {describe(st)}")
        from timemae_dist.kernels import cpu_dropout, cpu_fused

        if rank == 0:
            console(f"rank {rank}: {cpu_dropout.describe()}")
            console(f"rank {rank}: {cpu_fused.describe(cfg.model)}")
    if not dist.is_initialized():  # Ray sets the group up for world_size > 1 only in some versions
        dist.init_process_group("nccl" if cfg.trainer.use_gpu else "gloo", rank=rank, world_size=world)

    model = build_model(cfg)
    target = model.detach_target_encoder().to(device)
    loader = build_loader(cfg, rank, world)
    num_steps = total_steps(cfg, loader.num_batches)
    engine = build_engine(cfg, model, world, num_steps)
    seed_all(rank_seed(cfg.trainer.seed, rank))
    writer = MetricsWriter(
        run_dir / "tb", total_steps=num_steps, enabled=rank == 0, console=cfg.run.console, hparams=cfg.to_dict()
    )

    def save(trainer: Trainer, metrics: dict[str, float]) -> str:
        step = trainer.state.step
        local = Path(tempfile.mkdtemp(prefix=f"timemae-ckpt-r{rank}-"))
        try:
            save_checkpoint(trainer, local, metrics)
            ray.train.report(
                {**metrics, "step": step},
                checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                checkpoint_dir_name=checkpoint_name(step),
            )
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return str(run_dir / checkpoint_name(step))

    trace = None
    if cfg.run.trace_data:
        (run_dir / "trace").mkdir(parents=True, exist_ok=True)
        trace = run_dir / "trace" / f"rank_{rank:05d}.jsonl"
    trainer = Trainer(
        cfg, engine, target, loader, rank=rank, world_size=world, device=device, num_steps=num_steps,
        writer=writer, save_checkpoint=save, zero3=cfg.deepspeed.zero_stage == 3, trace_path=trace,
    )
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = load_checkpoint(trainer, d)
        trainer.resumed(ckpt.path, meta)
        if rank == 0:
            console(f"worker group resumed from {ckpt.path} at step {meta['step']}")
    elif rank == 0:
        console(f"worker group starting at step 0 ({num_steps} steps)")
    try:
        summary = trainer.train()
    finally:
        writer.close()
    if rank == 0:
        writer.summary(
            f"done: {summary['steps']} steps, {summary['windows_per_s']:,.0f} windows/s, "
            f"final loss {summary['final_loss']:.4f}"
        )
        write_summary(run_dir, summary)
