"""Prepare time and peak memory: HAPT-HAR, and a generated input of >= 2 GB.

    python benchmarks/bench_prepare.py [--generated-gb 2.0] [--format zarr|arrow] [--skip-hapt] [--json]

Each prepare runs as `timemae data prepare` in a child process; its peak RSS is the child's
``ru_maxrss``. The generated input is Parquet recordings of 6 float32 channels + a label
column (random walks: incompressible, the worst case for the store). Peak RSS must stay
bounded (about a shard per split plus one recording), whatever the input size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


def run_prepare(config: Path, overrides: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one `timemae data prepare` child process."""
    cmd = [sys.executable, "-m", "launch.cli", "data", "prepare", str(config), *overrides, "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"prepare failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak < before:  # pragma: no cover - ru_maxrss is a running max over children
        peak = before
    return seconds, peak / 1024.0


def generate(root: Path, gigabytes: float, samples_per_file: int = 2_000_000) -> tuple[int, int]:
    """Write Parquet recordings holding ``gigabytes`` of float32 channel data; (files, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bytes_per_file = samples_per_file * len(CHANNELS) * 4
    num_files = max(1, int(np.ceil(gigabytes * 1e9 / bytes_per_file)))
    for i in range(num_files):
        walk = np.cumsum(rng.normal(scale=0.05, size=(samples_per_file, len(CHANNELS))), axis=0)
        cols = {c: walk[:, j].astype(np.float32) for j, c in enumerate(CHANNELS)}
        label = np.repeat(rng.integers(-1, 6, size=samples_per_file // 500 + 1), 500)[:samples_per_file]
        table = pa.table({**cols, "label": label.astype(np.int8)}).replace_schema_metadata(
            {"subject": str(i % 40 + 1), "session": str(i // 40), "sample_rate_hz": "50"}
        )
        pq.write_table(table, root / f"subject{i % 40 + 1:02d}_session{i // 40}.parquet", compression="none")
    return num_files, num_files * bytes_per_file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generated-gb", type=float, default=2.0, help="size of the generated input (0 = skip)")
    p.add_argument("--format", choices=["zarr", "arrow"], default="zarr")
    p.add_argument("--skip-hapt", action="store_true")
    p.add_argument("--workdir", default=None, help="where to write inputs/stores (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    rows = []
    result: dict[str, dict] = {}
    try:
        if not args.skip_hapt:
            secs, rss = run_prepare(
                REPO / "configs/data/hapt_har.yaml",
                [f"output.path={work / 'hapt_har'}", f"output.format={args.format}"],
            )
            rows.append(("HAPT-HAR (hapt_package)", "1,122,772 samples", secs, rss))
            result["hapt_har"] = {"seconds": round(secs, 2), "peak_rss_mb": round(rss, 1)}
        if args.generated_gb > 0:
            files, nbytes = generate(work / "generated", args.generated_gb)
            cfg = work / "generated.yaml"
            cfg.write_text(
                "name: generated\nsource: {kind: recordings}\nwindow: {length: 128, stride: 64, label_policy: majority}\n"
                "split: {method: subject, test_fraction: 0.2, val_fraction: 0.1}\n"
                "output: {chunk_windows: 256, shard_windows: 4096}\n"
            )
            secs, rss = run_prepare(
                cfg,
                [f"source.path={work / 'generated'}", f"output.path={work / 'generated_store'}",
                 f"output.format={args.format}"],
            )
            rows.append((f"generated ({files} files)", f"{nbytes / 1e9:.2f} GB", secs, rss))
            result["generated"] = {
                "input_gb": round(nbytes / 1e9, 2),
                "seconds": round(secs, 2),
                "peak_rss_mb": round(rss, 1),
                "input_mb_per_s": round(nbytes / 1e6 / secs, 1),
            }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"prepare benchmark, format={args.format}, {os.cpu_count()} CPUs")
    print(f"{'input':<28} {'size':>18} {'seconds':>9} {'peak RSS MiB':>13}")
    for name, size, secs, rss in rows:
        print(f"{name:<28} {size:>18} {secs:>9.1f} {rss:>13.0f}")
    if args.json:
        print(json.dumps({"format": args.format, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
