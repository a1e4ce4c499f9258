"""``timemae export CHECKPOINT OUT_DIR`` / ``python -m launch.export``: consolidated float32 encoder.

Writes ``model.safetensors`` + ``config.json`` loadable with ``TimeMAE.from_pretrained(OUT_DIR)``
(no Ray or DeepSpeed needed to load). CHECKPOINT may be a run directory (its newest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from launch.errors import run_reporting_user_errors

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="timemae export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="<storage_path>/<run>/checkpoint_<step> or <storage_path>/<run>")
    p.add_argument("out_dir", help="output folder (model.safetensors + config.json)")
    args = p.parse_args(argv)

    def run() -> int:
        from timemae_dist.train.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out_dir)
        print(json.dumps({"out_dir": str(out), "weights": str(out / "model.safetensors")}))
        return 0

    return run_reporting_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
