"""The driver side of distributed pretraining: preflight, Ray, ``TorchTrainer.fit()``, summary."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from timemae_dist.train.checkpoint import check_resumable, find_latest_checkpoint
from timemae_dist.train.config import PretrainConfig
from timemae_dist.train.errors import PretrainError
from timemae_dist.train.preflight import check_cluster, resolve

__all__ = ["run_distributed", "connect_ray"]


LEAN_ENV = "TIMEMAE_LEAN_LOCAL_RAY"


def connect_ray(cfg: PretrainConfig, address: Optional[str] = None) -> str:
    """Join the cluster at ``address`` / ``$RAY_ADDRESS``, else start an embedded local Ray.

    The embedded Ray is lean unless ``$TIMEMAE_LEAN_LOCAL_RAY=0``: its processes share the training's
    CPUs, so no idle worker processes are kept (``num_workers_soft_limit`` 0) and Ray Train's
    preemption watcher is off (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` unless set). A joined cluster
    is left as it is."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise PretrainError(
                f"--address: cannot join the Ray cluster at {address!r} ({e}); start it with "
                "`ray start --head` or drop --address / RAY_ADDRESS to run locally"
            ) from None
        return f"cluster {address}"
    num_cpus = max(os.cpu_count() or 1, 1)
    lean = os.environ.get(LEAN_ENV, "1")
    if lean not in ("0", "1"):
        raise PretrainError(f"${LEAN_ENV}={lean!r}: use 1 (default: a lean embedded Ray) or 0 (Ray's defaults)")
    system_config = None
    if lean == "1":
        # Ray's own processes share the training's CPUs here (benchmarks/bench_step_ab.py --ab raybg):
        # no idle worker processes kept warm (Ray Train's controller and, on CPU, its workers carry a
        # runtime env, so they do not reuse them) and no preemption watcher (it polls for node draining, which a local Ray never does)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        system_config = {"num_workers_soft_limit": 0}
    # the dashboard serves the state API that Ray Train's placement-group cleaner polls (without it,
    # it logs "State API may be temporarily unavailable" every few seconds)
    ray.init(num_cpus=num_cpus, num_gpus=None if cfg.trainer.use_gpu else 0, include_dashboard=True,
             _system_config=system_config)
    return f"embedded local Ray ({num_cpus} CPUs)"


def run_distributed(cfg: PretrainConfig, address: Optional[str] = None) -> dict[str, Any]:
    """Pretrain with Ray Train + DeepSpeed; returns the summary dict the CLI prints as JSON.

    A Ray connection made here (embedded local Ray or a joined cluster) is closed before
    returning, so the caller's JSON line is the last thing printed; a Ray the caller had
    already initialised is left alone.
    """
    cfg, plan = resolve(cfg)  # bad store / shapes / batch sizes fail here, before Ray starts
    from timemae_dist.train.build import kernel_env

    kernels = kernel_env(cfg)  # trainer.cpu_dropout / cpu_fused=on that cannot apply fails here
    run_dir = cfg.run.run_dir
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:  # another architecture / engine / world size fails here, before Ray starts
        check_resumable(cfg, latest, engine="deepspeed", world_size=cfg.trainer.num_workers)
    print(
        f"run {cfg.run.name}: "
        + (f"resuming from {latest}" if latest else f"starting fresh in {run_dir}"),
        flush=True,
    )
    where = connect_ray(cfg, address)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_cluster(cfg, ray.cluster_resources(), ray.nodes())
    tr = cfg.trainer
    num_batches = plan.batches_per_epoch
    steps = tr.max_steps or max(1, tr.epochs * num_batches // tr.grad_accum)
    print(
        f"{where}: {tr.num_workers} worker(s) x {tr.cpus_per_worker} CPU{'+1 GPU' if tr.use_gpu else ''}, "
        f"ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}; global batch {tr.global_batch} = micro "
        f"{tr.micro_batch_size} x accum {tr.grad_accum} x {tr.num_workers} workers; {steps} steps; "
        f"{plan.describe(cfg.data.split)} ({num_batches} batches/epoch per worker)",
        flush=True,
    )
    from timemae_dist.train.worker import train_loop_per_worker

    worker_env: dict[str, str] = {}
    if not tr.use_gpu:
        from timemae_dist.mkl_avx512 import MklAvx512Error, worker_env as mkl_env

        try:
            worker_env, note = mkl_env(tr.mkl_avx512)
        except MklAvx512Error as e:
            raise PretrainError(f"trainer.mkl_avx512: {e}") from None
        from timemae_dist.mkl_avx512 import preload_without_shim, shim_loaded

        if "LD_PRELOAD" not in worker_env and shim_loaded():
            # mkl_avx512=off (or not applicable) while this driver runs with the shim (`timemae`
            # preloads it): workers of an embedded Ray would inherit it, so pass LD_PRELOAD without it
            worker_env = {"LD_PRELOAD": preload_without_shim()}
        print(f"workers: {note}", flush=True)
        worker_env = {**worker_env, **kernels}

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=tr.num_workers,
            use_gpu=tr.use_gpu,
            resources_per_worker={"CPU": tr.cpus_per_worker, **({"GPU": 1} if tr.use_gpu else {})},
        ),
        run_config=RunConfig(
            storage_path=cfg.run.storage_path,
            name=cfg.run.name,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            # new worker processes start with these (LD_PRELOAD must be set before a process starts)
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
    )
    summary_file = run_dir / "summary.json"
    summary_file.unlink(missing_ok=True)
    try:
        result = trainer.fit()
    finally:
        if where != "existing":
            # Disconnect now (stops the embedded Ray; only detaches from a joined cluster) so that
            # no worker log Ray forwards can be printed after the caller's final JSON line.
            ray.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    done = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {
        "run": cfg.run.name,
        "steps": int(done.get("steps", 0)),
        "windows_per_s": float(done.get("windows_per_s", float("nan"))),
        "final_loss": float(done.get("final_loss", float("nan"))),
        "checkpoint": ckpt,
        "tensorboard": str(run_dir / "tb"),
    }
