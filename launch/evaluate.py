"""`timemae evaluate`: linear probe, fine-tuning and t-SNE map of a pretrained encoder.

    timemae evaluate linear   CHECKPOINT_OR_EXPORT --store STORE [--label-fraction F ...] [--seeds N]
                              [--baselines] [--out DIR] [--plot] [--json] [--config YAML] [key=value ...]
    timemae evaluate finetune CHECKPOINT_OR_EXPORT --store STORE [same options]
    timemae evaluate embed    CHECKPOINT_OR_EXPORT --store STORE --plot OUT.png [--seed S] [--json]
    timemae evaluate select   RUN_DIR|CHECKPOINT ... --store STORE [--out DIR] [--json]

CHECKPOINT_OR_EXPORT is a folder written by `timemae export` (config.json + model.safetensors)
or a training checkpoint folder. Selection (probe C, fine-tuning epoch) uses the val split;
test is reported once. `select` chooses a pretraining checkpoint (every checkpoint of a run
folder, or those named) by the val accuracy of its linear probe and never reads test;
`linear`/`finetune` with --select-checkpoint do that first on a run folder, then evaluate the
chosen checkpoint. With --json the last stdout line is one JSON object (accuracy, macro_f1,
split="test", selected_on="val", ..., and a `results` list with every run). key=value
overrides set fields of configs/eval/<command>.yaml (e.g. finetune.epochs=20 device=cpu).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.typedconfig import ConfigError
from launch.errors import run_reporting_user_errors

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "linear": "frozen encoder + StandardScaler/LogisticRegression probe (C selected on val)",
    "finetune": "encoder + head trained end to end (Adam), early stopping and selection on val",
    "embed": "t-SNE map of test representations, pretrained vs random init",
    "select": "choose a run's pretraining checkpoint by its linear probe's val accuracy (test never read)",
}
DEFAULT_CONFIGS = {
    "linear": REPO_ROOT / "configs/eval/linear.yaml",
    "finetune": REPO_ROOT / "configs/eval/finetune.yaml",
    "embed": REPO_ROOT / "configs/eval/linear.yaml",
    "select": REPO_ROOT / "configs/eval/linear.yaml",
}


def _command_parser(command: str) -> argparse.ArgumentParser:
    sp = argparse.ArgumentParser(prog=f"timemae evaluate {command}", description=COMMANDS[command])
    if command == "select":
        sp.add_argument("checkpoint", nargs="+",
                        help="run folder (all its checkpoints), checkpoint folders or export folders; "
                             "key=value overrides may follow")
    else:
        sp.add_argument("checkpoint", help="export folder (config.json + model.safetensors) or training checkpoint")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides of the eval config")
    sp.add_argument("--store", default=None, help="store written by `timemae data prepare` (train/val/test); required")
    sp.add_argument("--config", default=None, help="eval YAML (default configs/eval/<command>.yaml)")
    sp.add_argument("--print-config", action="store_true",
                    help="print the resolved eval config (every key, its type and help) as YAML and exit")
    sp.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    if command == "select":
        sp.add_argument("--out", default=None, metavar="DIR", help="write selection.json")
        return sp
    if command == "embed":
        sp.add_argument("--plot", default=None, metavar="OUT.png", help="where to write the figure; required")
        sp.add_argument("--seed", type=int, default=None, help="subsample, t-SNE and random-init seed")
        return sp
    sp.add_argument("--label-fraction", nargs="+", default=None, metavar="F",
                    help="fractions of labelled train windows, e.g. 0.01 0.05 0.1 1.0")
    sp.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds per fraction (mean +- std)")
    sp.add_argument("--baselines", action="store_true", help="add random-init and supervised-from-scratch")
    sp.add_argument("--out", default=None, metavar="DIR", help="write results.json, results.md (and plots)")
    sp.add_argument("--plot", action="store_true", help="confusion matrix + label-fraction curve PNGs in --out")
    sp.add_argument("--select-checkpoint", action="store_true",
                    help="CHECKPOINT is a run folder: evaluate the checkpoint whose linear probe is best on val "
                         "(`timemae evaluate select`), not the newest")
    return sp


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``COMMAND ...`` -> namespace (options and key=value overrides may be intermixed)."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top = argparse.ArgumentParser(prog="timemae evaluate", description=__doc__.split("\n")[0],
                                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
        top.add_argument("command", choices=list(COMMANDS))
        top.parse_args(argv[:1])  # prints help / "invalid choice" and exits
    sp = _command_parser(argv[0])
    args = sp.parse_intermixed_args(argv[1:])
    args.command = argv[0]
    if not args.print_config:  # required unless only the config is printed
        missing = [flag for flag, value in (("--store", args.store), ("--plot", getattr(args, "plot", "")))
                   if value is None]
        if missing:
            sp.error(f"the following arguments are required: {', '.join(missing)}")
    if args.command == "select":  # nargs="+" takes the key=value overrides too
        args.overrides = [a for a in args.checkpoint if "=" in a and not Path(a).exists()]
        args.checkpoint = [a for a in args.checkpoint if a not in args.overrides]
        if not args.checkpoint:
            sp.error("name at least one run, checkpoint or export folder")
    if getattr(args, "label_fraction", None):  # nargs="+" also swallows key=value after it
        args.overrides += [a for a in args.label_fraction if "=" in a]
        try:
            args.label_fraction = [float(a) for a in args.label_fraction if "=" not in a]
        except ValueError as e:
            sp.error(f"argument --label-fraction: {e}")
    return args


def _config(args: argparse.Namespace):
    from timemae_dist.eval.config import load_eval_config

    overrides = list(args.overrides)
    if getattr(args, "label_fraction", None):
        overrides.append(f"label_fractions={json.dumps(args.label_fraction)}")
    if getattr(args, "seeds", None) is not None:
        overrides.append(f"num_seeds={args.seeds}")
    if getattr(args, "baselines", False):
        overrides.append("baselines=true")
    if getattr(args, "out", None):
        overrides.append(f"out={json.dumps(args.out)}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    path = args.config or DEFAULT_CONFIGS[args.command]
    if args.config is None and not Path(path).is_file():
        path = None  # installed without the configs/ folder: defaults
    return load_eval_config(path, overrides)


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.print_config:
        from data_pipeline.typedconfig import render_config

        print(render_config(cfg))
        return 0
    if args.command == "embed":
        from timemae_dist.eval.embed import run_embed

        info = run_embed(args.checkpoint, args.store, args.plot, cfg)
        print(f"wrote {info['plot']} ({info['num_points']} {info['split']} windows, seed {info['seed']})")
        if args.json:
            print(json.dumps(info))
        return 0

    if args.command == "select":
        from timemae_dist.eval.select import select_checkpoint, selection_table, write_selection

        sel = select_checkpoint(args.checkpoint, args.store, cfg)
        print(selection_table(sel), end="")
        print(f"selected {sel['checkpoint']} (step {sel['step']}): val accuracy {sel['val_accuracy']:.4f} "
              f"(C {sel['C']:g}, {sel['multi_class']}) of {len(sel['candidates'])} candidate(s); test not read")
        if cfg.out:
            print(f"wrote {write_selection(sel, cfg.out)}")
        if args.json:
            print(json.dumps(sel, separators=(",", ":")))
        return 0

    from timemae_dist.eval.protocol import run_evaluation
    from timemae_dist.eval.report import markdown_table, write_results

    if args.plot and not cfg.out:
        raise ConfigError("out", "--plot writes PNGs into the output folder; pass --out DIR (or out=DIR)")
    checkpoint, selection = args.checkpoint, None
    if args.select_checkpoint:
        from timemae_dist.eval.select import select_checkpoint

        selection = select_checkpoint([args.checkpoint], args.store, cfg)
        checkpoint = selection["checkpoint"]
        print(f"checkpoint selected on val: {checkpoint} (step {selection['step']}, val accuracy "
              f"{selection['val_accuracy']:.4f} of {len(selection['candidates'])} candidates)")
    results = run_evaluation(args.command, checkpoint, args.store, cfg)
    if selection is not None:
        results["checkpoint_selection"] = selection
    if cfg.out:
        paths = write_results(results, cfg.out, plot=args.plot)
        results["outputs"] = paths
    print(markdown_table(results), end="")
    print(
        f"headline ({results['protocol']}, pretrained, fraction {results['label_fraction']:g}, "
        f"{results['num_seeds']} seed(s)): test accuracy {results['accuracy']:.4f}, macro-F1 "
        f"{results['macro_f1']:.4f}, selected on val (val accuracy {results['val_accuracy']:.4f})"
    )
    if cfg.out:
        print(f"wrote {', '.join(results['outputs'].values())}")
    if args.json:
        print(json.dumps(results, separators=(",", ":")))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return run_reporting_user_errors(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
