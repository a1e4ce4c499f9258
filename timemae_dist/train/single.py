"""``timemae pretrain --single-process``: the same loop in one process, plain PyTorch, no Ray/DeepSpeed."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from timemae_dist.train.build import build_loader, build_model, kernel_env, rank_seed, seed_all
from timemae_dist.train.checkpoint import (
    check_resumable, checkpoint_name, find_latest_checkpoint, load_checkpoint, save_checkpoint,
)
from timemae_dist.train.config import PretrainConfig
from timemae_dist.train.metrics import MetricsWriter
from timemae_dist.train.preflight import resolve
from timemae_dist.train.trainer import PlainEngine, Trainer, total_steps

__all__ = ["run_single"]


def _prune(run_dir: Path, keep: int) -> None:
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def run_single(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain in this process; returns the summary (steps, windows_per_s, final_loss, checkpoint)."""
    # trainer.cpu_dropout / cpu_fused apply for this run only: their variables are restored afterwards
    from timemae_dist.kernels.ckernel import env_restored

    with env_restored():
        return _run_single(cfg)


def _run_single(cfg: PretrainConfig) -> dict[str, Any]:
    if cfg.trainer.num_workers != 1:
        print(f"single-process: ignoring trainer.num_workers={cfg.trainer.num_workers} (one process)")
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, num_workers=1, global_batch_size=None))
    cfg, plan = resolve(cfg)
    run_dir = cfg.run.run_dir
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:  # another architecture / engine fails here, before anything is built
        check_resumable(cfg, latest, engine="plain", world_size=1)
    print(
        f"run {cfg.run.name}: "
        + (f"resuming from {latest}" if latest else f"starting fresh in {run_dir}")
        + " (single process, plain PyTorch)",
        flush=True,
    )
    torch.set_num_threads(cfg.trainer.cpus_per_worker)
    device = torch.device("cpu")
    from timemae_dist.mkl_avx512 import describe

    print(describe(), flush=True)  # which fp32 GEMM path this process runs
    from timemae_dist.kernels import cpu_dropout, cpu_fused

    os.environ.update(kernel_env(cfg))
    print(cpu_dropout.describe(), flush=True)  # which dropout-mask path
    print(cpu_fused.describe(cfg.model), flush=True)  # which fused-kernel path (and what this model fits)
    model = build_model(cfg)
    target = model.detach_target_encoder()
    loader = build_loader(cfg, 0, 1)
    num_steps = total_steps(cfg, loader.num_batches)
    engine = PlainEngine(model, cfg, num_steps)
    seed_all(rank_seed(cfg.trainer.seed, 0))
    print(
        f"global batch {cfg.trainer.global_batch} = micro {cfg.trainer.micro_batch_size} x accum "
        f"{cfg.trainer.grad_accum} x 1 worker; {num_steps} steps; "
        f"{plan.describe(cfg.data.split)} ({loader.num_batches} batches/epoch)",
        flush=True,
    )
    writer = MetricsWriter(run_dir / "tb", total_steps=num_steps, console=cfg.run.console, hparams=cfg.to_dict())

    def save(trainer: Trainer, metrics: dict[str, float]) -> str:
        final = run_dir / checkpoint_name(trainer.state.step)
        tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(trainer, tmp, metrics)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(run_dir, cfg.run.keep_checkpoints)
        return str(final)

    trace = None
    if cfg.run.trace_data:
        (run_dir / "trace").mkdir(parents=True, exist_ok=True)
        trace = run_dir / "trace" / "rank_00000.jsonl"
    trainer = Trainer(
        cfg, engine, target, loader, rank=0, world_size=1, device=device, num_steps=num_steps,
        writer=writer, save_checkpoint=save, trace_path=trace,
    )
    if latest is not None:
        trainer.resumed(str(latest), load_checkpoint(trainer, latest))
    try:
        summary = trainer.train()
    finally:
        writer.close()
    writer.summary(
        f"done: {summary['steps']} steps, {summary['windows_per_s']:,.0f} windows/s, "
        f"final loss {summary['final_loss']:.4f}; checkpoint {summary['checkpoint']}"
    )
    return summary
