"""``timemae pretrain CONFIG [key=value ...]`` / ``python -m launch.pretrain ...``: parse, build, run.

Distributed (Ray Train + DeepSpeed) by default; ``--single-process`` runs the plain PyTorch loop.
The last line printed is a JSON summary: steps, windows_per_s, final_loss, checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from launch.errors import run_reporting_user_errors

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="timemae pretrain",
        description="Pretrain TimeMAE on a store (Ray Train + DeepSpeed, or --single-process).",
        epilog="Overrides are dotted key=value pairs, e.g. trainer.num_workers=2 deepspeed.zero_stage=2 "
        "run.name=my-run (re-using a run name resumes it).",
    )
    p.add_argument("config", help="YAML config, e.g. configs/pretrain/har.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--single-process", action="store_true", help="plain PyTorch loop in this process, no Ray/DeepSpeed")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, its type and help) as YAML and exit; nothing runs")
    return p


def main(argv: Optional[list[str]] = None, *, own_process: Optional[bool] = None) -> int:
    """``own_process``: this call is the process's command (default: ``argv is None``), so
    ``--single-process`` may re-execute it to follow ``trainer.mkl_avx512``."""
    args = build_parser().parse_intermixed_args(argv)  # options may follow key=value overrides
    own = argv is None if own_process is None else own_process
    return run_reporting_user_errors(lambda: _run(args, own))


def _run(args: argparse.Namespace, own_process: bool = False) -> int:
    from timemae_dist.train.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        from data_pipeline.typedconfig import render_config

        print(render_config(cfg))
        return 0
    try:
        if args.single_process:
            from timemae_dist.train.single import run_single

            if own_process:  # this process trains: its GEMM path follows trainer.mkl_avx512
                from timemae_dist.mkl_avx512 import reexec_to_match

                reexec_to_match(cfg.trainer.mkl_avx512)

            summary = run_single(cfg)
        else:
            from timemae_dist.train.driver import run_distributed

            summary = run_distributed(cfg, address=args.address)
    except Exception as e:  # Ray's TrainingFailedError & co: keep the cause, drop the deep traceback
        name = type(e).__name__
        if name in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            print(f"timemae pretrain: training failed ({name}): {e}", file=sys.stderr)
            return 1
        raise
    sys.stderr.flush()
    print(json.dumps({k: summary.get(k) for k in ("steps", "windows_per_s", "final_loss", "checkpoint")} | summary),
          flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
