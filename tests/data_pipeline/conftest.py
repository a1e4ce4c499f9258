"""Fixtures that write small synthetic window stores with the real StoreWriter (no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.store import StoreWriter

CHANNELS = ["acc_x", "acc_y", "acc_z"]
WINDOW = 16


def synthetic_windows(n: int, seed: int = 0, channels: int = len(CHANNELS), window: int = WINDOW):
    """``(n, C, T)`` float32 windows plus per-window columns (labels include -1)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, channels, window)) * 2.0 + 0.5).astype(np.float32)
    label = rng.integers(-1, 4, n).astype(np.int64)
    subject = (np.arange(n) // 97).astype(np.int32)
    recording = (np.arange(n) // 41).astype(np.int32)
    offset = (np.arange(n) * 8).astype(np.int64)
    return {"windows": x, "label": label, "subject": subject, "recording": recording, "offset": offset}


def write_synthetic_store(
    path: Path,
    fmt: str,
    sizes: dict[str, int] | None = None,
    *,
    dtype: str = "float32",
    chunk_windows: int = 32,
    shard_windows: int = 128,
    seed: int = 0,
    append_size: int = 53,
    manifest: dict | None = None,
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Write a store (train/val/test sizes) in uneven appends; returns (manifest, source arrays)."""
    sizes = sizes or {"train": 1000, "val": 70, "test": 0}
    data = {s: synthetic_windows(n, seed + i) for i, (s, n) in enumerate(sizes.items())}
    train = data.get("train")
    norm = {
        "split": "train",
        "mean": train["windows"].mean(axis=(0, 2)).astype(float).tolist() if train and len(train["label"]) else [0.0] * len(CHANNELS),
        "std": train["windows"].std(axis=(0, 2)).astype(float).tolist() if train and len(train["label"]) else [1.0] * len(CHANNELS),
    }
    given = {"name": "synthetic", "normalization": norm, "splits": {s: {"class_counts": {"0": 1}} for s in sizes}}
    given.update(manifest or {})
    with StoreWriter(path, fmt, CHANNELS, WINDOW, dtype=dtype, chunk_windows=chunk_windows,
                     shard_windows=shard_windows) as w:
        for split, d in data.items():
            n = len(d["label"])
            for a in range(0, n, append_size):
                b = min(n, a + append_size)
                w.append(split, d["windows"][a:b], d["label"][a:b], d["subject"][a:b],
                         d["recording"][a:b], d["offset"][a:b])
        final = w.finalize(given)
    return final, data


@pytest.fixture(scope="session")
def synthetic_stores(tmp_path_factory):
    """The same 1000/70/0-window data written once as zarr and once as arrow (read-only use!)."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for fmt in ("zarr", "arrow"):
        _, data = write_synthetic_store(root / fmt, fmt)
        out[fmt] = root / fmt
    out["data"] = data
    return out
