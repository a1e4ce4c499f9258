"""Pretraining throughput (windows/s) on the HAPT-HAR store, official TimeMAE size, fp32, CPU.

Rows: one Ray Train worker with 2 torch threads; two workers x 1 thread (ZeRO-2, gloo).
Each row is a real `timemae pretrain` run (Ray Train + DeepSpeed); windows/s is the run's
steady-state figure (the mean of the logged `throughput/windows_per_s` after the first
log window, i.e. excluding start-up/warm-up).

    python benchmarks/bench_pretrain.py [--steps 60] [--store stores/hapt_har] [--json]

The last line with --json: {"one_worker": windows_per_s, "two_workers": windows_per_s}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _steady_windows_per_s(tb_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    vals = [e.value for e in acc.Scalars("throughput/windows_per_s")]
    steady = vals[1:] if len(vals) > 1 else vals
    return sum(steady) / len(steady)


def _run(store: str, storage: str, name: str, steps: int, *extra: str) -> dict:
    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.driver import run_distributed

    cfg = load_pretrain_config(
        REPO / "configs" / "pretrain" / "har.yaml",
        [f"data.store={store}", f"run.storage_path={storage}", f"run.name={name}",
         f"trainer.max_steps={steps}", f"run.log_every={max(steps // 6, 1)}", "run.checkpoint_every=0",
         "run.max_failures=0", "run.console=false", *extra],
    )
    summary = run_distributed(cfg)
    summary["steady_windows_per_s"] = _steady_windows_per_s(Path(storage) / name / "tb")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "stores" / "hapt_har"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as storage:
        one = _run(args.store, storage, "one", args.steps, "trainer.num_workers=1", "trainer.cpus_per_worker=2",
                   "deepspeed.zero_stage=0")
        two = _run(args.store, storage, "two", args.steps, "trainer.num_workers=2", "trainer.cpus_per_worker=1",
                   "deepspeed.zero_stage=2")
    ray.shutdown()
    rows = [("1 worker x 2 threads (ZeRO-0)", one), ("2 workers x 1 thread (ZeRO-2)", two)]
    print(f"{'setup':<32}{'windows/s (steady)':>20}{'windows/s (whole run)':>24}")
    for label, s in rows:
        print(f"{label:<32}{s['steady_windows_per_s']:>20,.0f}{s['windows_per_s']:>24,.0f}")
    ratio = two["steady_windows_per_s"] / one["steady_windows_per_s"]
    print(f"2 workers / 1 worker = {ratio:.2f} (d_model 64, 8 layers, batch 128 per worker, fp32, {args.steps} steps)")
    if args.json:
        print(json.dumps({"one_worker": one["steady_windows_per_s"], "two_workers": two["steady_windows_per_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
