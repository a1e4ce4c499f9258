"""Windows/s read through the streaming loader, per store format, shuffled, 0 and 2 workers.

    python benchmarks/bench_loader.py STORE [STORE2] [--batch-size 128] [--both] [--json]
    python benchmarks/bench_loader.py --synthetic 50000 [--json]

STORE is a prepared store (zarr or arrow). ``--both`` also measures the other format, from a
copy written into a temporary directory (or from STORE2 when given). ``--synthetic N`` writes
N random windows (9 x 128 float32, the UCI-HAR shape) in both formats to a temporary directory
and measures those. Each measurement iterates whole shuffled epochs (new epoch each time, so
worker start-up is included, except in the "persistent" rows, whose workers live across
epochs as in a long training run) for at least ``--min-seconds``. Prints one table; with ``--json``
the last line is ``{"zarr": windows_per_s, "arrow": windows_per_s}`` (num_workers=0 figures,
formats present).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.loader import open_loader  # noqa: E402
from data_pipeline.store import COLUMNS, StoreWriter, open_store  # noqa: E402

_WRITER_KEYS = {"schema_version", "format", "dtype", "chunk_windows", "shard_windows", "window", "files"}


def write_synthetic(path: Path, fmt: str, n: int, channels: int = 9, window: int = 128, seed: int = 0) -> Path:
    """N random windows in the train split (plus tiny val/test), written in fixed-size appends."""
    rng = np.random.default_rng(seed)
    names = [f"ch{i}" for i in range(channels)]
    step = 8192
    with StoreWriter(path, fmt, names, window) as w:
        for a in range(0, n, step):
            m = min(step, n - a)
            x = rng.standard_normal((m, channels, window), dtype=np.float32)
            w.append("train", x, rng.integers(-1, 6, m), a // 1000, a // 500, np.arange(a, a + m) * 64)
        w.append("val", rng.standard_normal((10, channels, window), dtype=np.float32), 0, 0, 0, 0)
        norm = {"split": "train", "mean": [0.0] * channels, "std": [1.0] * channels}
        w.finalize({"name": f"synthetic-{n}", "normalization": norm})
    return path


def convert(src: Path, dst: Path, fmt: str) -> Path:
    """Copy a store into another format (chunk by chunk, memory bounded)."""
    store = open_store(src)
    m = store.manifest
    with StoreWriter(dst, fmt, store.channels, store.window, dtype=store.dtype,
                     chunk_windows=store.chunk_windows, shard_windows=store.shard_windows) as w:
        for split in store.splits:
            for i in range(store.num_chunks(split)):
                c = store.read_chunk(split, i)
                w.append(split, c["windows"], *(c[k] for k in COLUMNS))
        given = {k: v for k, v in m.items() if k not in _WRITER_KEYS}
        given["splits"] = {s: {k: v for k, v in e.items() if k not in ("shards", "num_windows")}
                           for s, e in m.get("splits", {}).items()}
        w.finalize(given)
    return dst


def measure(path: Path, split: str, batch_size: int, num_workers: int, min_seconds: float,
            persistent: bool = False) -> dict:
    loader = open_loader(path, split, batch_size, seed=0, shuffle=True, num_workers=num_workers,
                         persistent_workers=persistent)
    if len(loader) == 0:
        raise SystemExit(f"split {split!r} of {path} has fewer than {batch_size} windows")
    windows, epochs = 0, 0
    t0 = time.perf_counter()
    while True:
        loader.set_epoch(epochs)
        for batch in loader:
            windows += batch["x"].shape[0]
        epochs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
    C, T = loader.store.num_channels, loader.store.window
    return {"windows_per_s": windows / elapsed, "mb_per_s": windows * C * T * 4 / elapsed / 1e6,
            "epochs": epochs, "windows": windows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stores", nargs="*", type=Path, help="store directory (a second one: the other format)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--split", default="train")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    ap.add_argument("--both", action="store_true", help="also measure the other format (temporary copy)")
    ap.add_argument("--synthetic", type=int, metavar="N", help="generate N windows (9x128) in both formats")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="measure whole epochs for at least this long")
    ap.add_argument("--json", action="store_true", help="last line: {format: windows/s at num_workers=0}")
    args = ap.parse_args(argv)
    if not args.stores and not args.synthetic:
        ap.error("give a STORE or --synthetic N")

    with tempfile.TemporaryDirectory(prefix="bench_loader-") as tmp:
        stores: dict[str, Path] = {}
        if args.synthetic:
            for fmt in ("zarr", "arrow"):
                t = time.perf_counter()
                stores[fmt] = write_synthetic(Path(tmp) / fmt, fmt, args.synthetic)
                print(f"wrote synthetic {fmt} store of {args.synthetic} windows in {time.perf_counter() - t:.1f}s",
                      file=sys.stderr)
        for p in args.stores:
            stores[open_store(p).format] = p
        if args.both and len(stores) == 1:
            (fmt, src), = stores.items()
            other = "arrow" if fmt == "zarr" else "zarr"
            stores[other] = convert(src, Path(tmp) / other, other)

        rows, result = [], {}
        for fmt in ("zarr", "arrow"):
            if fmt not in stores:
                continue
            runs = [(nw, False) for nw in args.workers] + [(nw, True) for nw in args.workers if nw > 0]
            for nw, persistent in runs:
                r = measure(stores[fmt], args.split, args.batch_size, nw, args.min_seconds, persistent)
                rows.append((fmt, f"{nw}{' persistent' if persistent else ''}", r))
                if nw == 0 or fmt not in result:
                    result[fmt] = round(r["windows_per_s"], 1)
        store = open_store(next(iter(stores.values())))
        print(f"loader throughput: split {args.split!r} ({store.num_windows(args.split)} windows of "
              f"{store.num_channels}x{store.window} {store.dtype}), batch {args.batch_size}, shuffled")
        print(f"{'format':<7} {'workers':<14} {'windows/s':>12} {'MB/s':>9} {'epochs':>7}")
        for fmt, nw, r in rows:
            print(f"{fmt:<7} {nw:<14} {r['windows_per_s']:>12,.0f} {r['mb_per_s']:>9,.1f} {r['epochs']:>7}")
        if args.json:
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
