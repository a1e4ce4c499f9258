"""Pretraining throughput (windows/s) on the HAPT-HAR store, official TimeMAE size, fp32, CPU.

Rows: one Ray Train worker with 2 torch threads; two workers x 1 thread (ZeRO-2, gloo).
Each row is a real `timemae pretrain` run (Ray Train + DeepSpeed, on the embedded local Ray that
`timemae pretrain` starts: ``timemae_dist.train.driver.connect_ray``); windows/s is the run's
steady-state figure (the mean of the logged `throughput/windows_per_s` after the first
log window, i.e. excluding start-up/warm-up); data wait is the mean logged
`time/data_wait_fraction` over the same log windows.

--zero-memory adds a second table: per-rank bytes of parameters + gradients + optimizer state
that a real DeepSpeed engine holds at 2 ranks (2 spawned processes, gloo) for a larger model
(d_model 512, 12 encoder layers, 8 heads; fp32), ZeRO stages 0-3, counted at the step's peak
(after backward, before the optimizer step, optimizer state already created). Every tensor
storage reachable from the engine is counted once (views of a flat buffer share its storage):
module parameters (under ZeRO-3 their ``ds_tensor`` partitions), the ZeRO optimizer's gradient
buffers/partitions and ``.grad`` tensors, the inner optimizer's state (Adam moments) and its
flat fp32 master partitions. The momentum target encoder lives outside the engine (replicated,
identical at every stage) and is not counted.

    python benchmarks/bench_pretrain.py [--steps 60] [--repeat 1] [--store stores/hapt_har] [--zero-memory]
        [--mkl-avx512 auto|on|off] [--cpu-dropout auto|on|off] [--cpu-fused auto|on|off] [--json]

``--repeat N`` runs the two rows N times, alternating (one worker, two workers, one worker, ...) on
the same embedded Ray, and reports each row's median with every run's figure: on a shared VM whose
speed drifts by 20-40 % within minutes, one run per row says little.

The workers run with ``trainer.mkl_avx512`` (default auto: oneMKL's AVX-512 GEMM kernels on an
AMD CPU with AVX-512, see timemae_dist/mkl_avx512.py); ``--mkl-avx512 off`` measures MKL's
default dispatch (its AVX2 kernels on AMD). ``--cpu-dropout`` sets ``trainer.cpu_dropout``
(default auto: dropout masks from the C kernel of timemae_dist/kernels/cpu_dropout.py; off =
torch's eager ops). ``--cpu-fused`` sets ``trainer.cpu_fused`` (default auto: the attention core and
the post-LN residual from the fused C kernels of timemae_dist/kernels/cpu_fused.py; off = eager).

The last line with --json: {"one_worker": windows_per_s, "two_workers": windows_per_s (medians over
the --repeat runs), "runs": {"one_worker": [...], "two_workers": [...]}, "ratio": ... (median of each
round's two / one), "mkl_avx512": mode, "cpu_dropout": mode, "cpu_fused": mode, "cpu": {...} (timemae_dist.hostinfo.cpu_info), "data_wait_fraction": {"one_worker": ..., "two_workers": ...}} plus, with
--zero-memory, "zero_memory_mb": {"0": MB, "1": MB, "2": MB, "3": MB} (MB = 2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _steady(tb_dir: Path, tag: str) -> float:
    """Mean of a logged scalar over the log windows after the first (start-up excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    vals = [e.value for e in acc.Scalars(tag)]
    steady = vals[1:] if len(vals) > 1 else vals
    return sum(steady) / len(steady)


def _run(store: str, storage: str, name: str, steps: int, *extra: str) -> dict:
    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.driver import run_distributed

    cfg = load_pretrain_config(
        REPO / "configs" / "pretrain" / "har.yaml",
        [f"data.store={store}", f"run.storage_path={storage}", f"run.name={name}",
         f"trainer.max_steps={steps}", f"run.log_every={max(steps // 6, 1)}", "run.checkpoint_every=0",
         "run.max_failures=0", "run.console=false", "run.eval_every=0", *extra],
    )
    summary = run_distributed(cfg)
    tb = Path(storage) / name / "tb"
    summary["steady_windows_per_s"] = _steady(tb, "throughput/windows_per_s")
    summary["data_wait_fraction"] = _steady(tb, "time/data_wait_fraction")
    return summary


# ------------------------------------------------------------------------------------------
# ZeRO memory: real engines in 2 processes


def _held_bytes(engine) -> dict[str, int]:
    """Bytes of the distinct tensor storages the engine holds: params / grads / optimizer state."""
    import torch

    seen: set[int] = set()
    out = {"params": 0, "grads": 0, "optimizer_state": 0, "other": 0}

    def add(t, cat: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in seen:
            return
        seen.add(st.data_ptr())
        out[cat] += st.nbytes()

    def walk(obj, cat: str, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            add(obj, cat)
            if obj.grad is not None:
                add(obj.grad, "grads")
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, cat, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for v in obj.values():
                walk(v, cat, depth + 1)

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wrappers hold the torch optimizer
    for state in inner.state.values():  # Adam moments (and step counters)
        walk(state, "optimizer_state")
    params = list(engine.module.parameters())
    for p in params:  # gradients first, so a flat grad buffer is not mistaken for params
        if p.grad is not None:
            add(p.grad, "grads")
    for name, value in vars(opt).items():
        if "grad" in name:
            walk(value, "grads")
    for p in params:  # module parameters: full tensors (ZeRO-3: persistent small ones) + partitions
        add(p, "params")
        add(getattr(p, "ds_tensor", None), "params")
    for group in inner.param_groups:  # flat fp32 master partitions (ZeRO >= 1)
        walk(group["params"], "params")
    if opt is not inner:
        for name, value in vars(opt).items():
            if "fp32" in name or "bit16" in name or "fp16" in name:
                walk(value, "params")
            elif "grad" not in name:
                walk(value, "other")
    return out


def _zero_memory_worker(rank: int, world: int, port: int, stages: list[int], out_dir: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from timemae_dist.model import TimeMAE
    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.ds_config import build_ds_config
    from timemae_dist.train.worker import build_engine

    results = {}
    for stage in stages:
        cfg = load_pretrain_config(
            REPO / "configs" / "pretrain" / "har.yaml",
            ["model.d_model=512", "model.num_layers=12", "model.num_heads=8", "model.in_channels=9",
             "model.seq_len=128", "trainer.micro_batch_size=4", f"deepspeed.zero_stage={stage}",
             f"trainer.num_workers={world}", "run.name=zero-memory"],
        )
        torch.manual_seed(0)
        model = TimeMAE(cfg.model)
        target = model.detach_target_encoder()
        engine = build_engine(cfg, model, world, 10)
        assert build_ds_config(cfg, world, 10)["zero_optimization"]["stage"] == stage
        x = torch.randn(cfg.trainer.micro_batch_size, 9, 128)
        for i in range(2):  # step 1 creates the optimizer state; measure at step 2's peak
            out = engine(x, target_encoder=target)
            engine.backward(out["loss"])
            if i == 1:
                held = _held_bytes(engine)
            engine.step()
        results[str(stage)] = held
        del engine, model, out
        import gc

        gc.collect()
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def zero_memory(stages: tuple[int, ...] = (0, 1, 2, 3), world: int = 2) -> dict[str, dict[str, int]]:
    """Per-rank held bytes per ZeRO stage (rank 0's; ranks differ by at most alignment padding)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-zero-mem-") as out_dir:
        mp.spawn(_zero_memory_worker, args=(world, port, list(stages), out_dir), nprocs=world, join=True)
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    # the per-rank figure is the largest rank's (partitions may differ by padding)
    return {st: max((pr[st] for pr in per_rank), key=lambda d: sum(d.values())) for st in per_rank[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "stores" / "hapt_har"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeat", type=int, default=1, help="runs of each row, alternated; rows report the median")
    p.add_argument("--json", action="store_true")
    p.add_argument("--zero-memory", action="store_true", help="also measure per-rank ZeRO memory (stages 0-3)")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput runs")
    p.add_argument("--mkl-avx512", choices=("auto", "on", "off"), default="auto",
                   help="trainer.mkl_avx512 of the runs: oneMKL's AVX-512 kernels on AMD CPUs (default auto)")
    p.add_argument("--cpu-dropout", choices=("auto", "on", "off"), default="auto",
                   help="trainer.cpu_dropout of the runs: dropout masks from the C kernel (default auto)")
    p.add_argument("--cpu-fused", choices=("auto", "on", "off"), default="auto",
                   help="trainer.cpu_fused of the runs: fused attention + residual C kernels (default auto)")
    args = p.parse_args(argv)
    from timemae_dist.hostinfo import cpu_info, describe_cpu

    print(f"CPU: {describe_cpu()}")
    result: dict = {"cpu": cpu_info()}
    if not args.no_throughput:
        result.update(_throughput(args))
    if args.zero_memory:
        mem = zero_memory()
        mb = {st: sum(v[k] for k in ("params", "grads", "optimizer_state")) / 2**20 for st, v in mem.items()}
        print(f"\nZeRO memory per rank, 2 ranks, d_model 512 x 12 layers, fp32 AdamW (MB = 2**20 bytes)")
        print(f"{'stage':<8}{'params':>10}{'grads':>10}{'optim':>10}{'total':>10}{'vs stage 0':>12}{'(other)':>10}")
        for st, v in mem.items():
            print(f"{'ZeRO-' + st:<8}{v['params'] / 2**20:>10.1f}{v['grads'] / 2**20:>10.1f}"
                  f"{v['optimizer_state'] / 2**20:>10.1f}{mb[st]:>10.1f}{mb[st] / mb['0']:>11.0%}"
                  f"{v['other'] / 2**20:>10.1f}")
        result["zero_memory_mb"] = {st: round(v, 1) for st, v in mb.items()}
    if args.json:
        print(json.dumps(result))
    return 0


def summarize(one: list[dict], two: list[dict]) -> dict:
    """Medians over the repeated runs of each row (``steady_windows_per_s``, data wait) and the
    median over rounds of the paired ratio two workers / one worker."""
    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {
        "one_worker": med(one, "steady_windows_per_s"),
        "two_workers": med(two, "steady_windows_per_s"),
        "runs": {"one_worker": [r["steady_windows_per_s"] for r in one],
                 "two_workers": [r["steady_windows_per_s"] for r in two]},
        "ratio": statistics.median(t["steady_windows_per_s"] / o["steady_windows_per_s"] for o, t in zip(one, two)),
        "data_wait_fraction": {"one_worker": med(one, "data_wait_fraction"),
                               "two_workers": med(two, "data_wait_fraction")},
    }


def _throughput(args) -> dict:
    if args.repeat < 1:
        raise SystemExit(f"bench_pretrain: --repeat must be >= 1 (got {args.repeat})")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    import ray

    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.driver import connect_ray

    # the embedded local Ray that `timemae pretrain` starts (its processes share the 2 CPUs with the run)
    print(connect_ray(load_pretrain_config(REPO / "configs" / "pretrain" / "har.yaml", [f"data.store={args.store}"])))
    from timemae_dist.mkl_avx512 import worker_env

    gemm = worker_env(args.mkl_avx512)[1]
    mkl = f"trainer.mkl_avx512={args.mkl_avx512}"
    drop = f"trainer.cpu_dropout={args.cpu_dropout}"
    fused = f"trainer.cpu_fused={args.cpu_fused}"
    one: list[dict] = []
    two: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as storage:
        for r in range(args.repeat):
            one.append(_run(args.store, storage, f"one-{r}", args.steps, "trainer.num_workers=1",
                            "trainer.cpus_per_worker=2", "deepspeed.zero_stage=0", mkl, drop, fused))
            two.append(_run(args.store, storage, f"two-{r}", args.steps, "trainer.num_workers=2",
                            "trainer.cpus_per_worker=1", "deepspeed.zero_stage=2", mkl, drop, fused))
    ray.shutdown()
    res = summarize(one, two)
    rows = [("1 worker x 2 threads (ZeRO-0)", one, "one_worker"), ("2 workers x 1 thread (ZeRO-2)", two, "two_workers")]
    many = args.repeat > 1
    print(f"{'setup':<32}{'windows/s (steady)':>20}{'windows/s (whole run)':>24}{'data wait':>12}"
          + ("  runs (steady)" if many else ""))
    for label, runs, key in rows:
        whole = statistics.median(s["windows_per_s"] for s in runs)
        line = f"{label:<32}{res[key]:>20,.0f}{whole:>24,.0f}{res['data_wait_fraction'][key]:>12.1%}"
        if many:
            line += "  " + " / ".join(f"{v:,.0f}" for v in res["runs"][key])
        print(line)
    print(f"2 workers / 1 worker = {res['ratio']:.2f} (d_model 64, 8 layers, batch 128 per worker, fp32, {args.steps} steps"
          + (f"; medians of {args.repeat} alternated runs)" if many else ")"))
    print(f"workers' {gemm} [--mkl-avx512 {args.mkl_avx512}]; dropout masks [--cpu-dropout {args.cpu_dropout}]; "
          f"fused kernels [--cpu-fused {args.cpu_fused}]")
    return {"mkl_avx512": args.mkl_avx512, "cpu_dropout": args.cpu_dropout, "cpu_fused": args.cpu_fused, **res}


if __name__ == "__main__":
    sys.exit(main())
