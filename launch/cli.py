"""The `timemae` command line: parse, build, run.

    timemae data prepare CONFIG [key=value ...]   recordings -> sharded store
    timemae data inspect STORE [--json]           what a store holds
    timemae data verify STORE                     check every shard checksum
    timemae pretrain CONFIG [key=value ...]        distributed pretraining (Ray Train + DeepSpeed)
    timemae export CHECKPOINT OUT_DIR              consolidated float32 encoder
    timemae evaluate linear|finetune|embed ...     linear probe, fine-tuning, t-SNE
    timemae demo                                   prepare HAPT-HAR and print its summary

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
    """The README's demo: prepare the HAPT-HAR store from the PyPI package and summarise it."""
    from data_pipeline.config import load_data_config
    from data_pipeline.prepare import prepare, summary_table

    cfg = load_data_config(REPO_ROOT / "configs/data/hapt_har.yaml", args.overrides)
    print(f"[demo] preparing {cfg.output.path} from source.kind={cfg.source.kind}", flush=True)
    result = prepare(cfg, command=_command_line(argv), progress=True)
    print(summary_table(result.manifest, None if result.up_to_date else result.seconds, result.path))
    return 0


def _delegate(module: str):
    def run(args: argparse.Namespace, argv: list[str]) -> int:
        import importlib

        return int(importlib.import_module(module).main(args.rest) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timemae", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare, inspect and verify data stores")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser("prepare", help="recordings -> windows -> sharded store")
    prep.add_argument("config", help="YAML data config (e.g. configs/data/hapt_har.yaml)")
    prep.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_data_prepare)
    ins = dsub.add_parser("inspect", help="summarise a store")
    ins.add_argument("store")
    ins.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ins.set_defaults(func=_data_inspect)
    ver = dsub.add_parser("verify", help="check every file checksum of a store")
    ver.add_argument("store")
    ver.set_defaults(func=_data_verify)

    demo = sub.add_parser("demo", help="prepare HAPT-HAR and print its summary")
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides of the data config")
    demo.set_defaults(func=_demo)

    for name, module, help_ in (
        ("pretrain", "launch.pretrain", "pretrain TimeMAE (Ray Train + DeepSpeed)"),
        ("export", "launch.export", "export a checkpoint's encoder"),
        ("evaluate", "launch.evaluate", "linear probe / fine-tune / t-SNE of an encoder"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_delegate(module))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_reporting_user_errors(lambda: args.func(args, argv))


if __name__ == "__main__":
    sys.exit(main())
