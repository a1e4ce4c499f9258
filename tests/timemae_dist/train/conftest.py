"""Fixtures: a tiny synthetic store (StoreWriter) and one embedded Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

CHANNELS = ["acc_x", "acc_y", "acc_z"]
WINDOW = 32


def make_windows(n: int, seed: int) -> np.ndarray:
    """Learnable signals: per-window sinusoids (random frequency/phase per channel) + noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW, dtype=np.float32)[None, None, :]
    freq = rng.uniform(0.05, 0.3, size=(n, len(CHANNELS), 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, len(CHANNELS), 1)).astype(np.float32)
    amp = rng.uniform(0.5, 2.0, size=(n, len(CHANNELS), 1)).astype(np.float32)
    x = amp * np.sin(2 * np.pi * freq * t + phase) + 0.05 * rng.standard_normal((n, len(CHANNELS), WINDOW))
    return x.astype(np.float32)


def write_store(path: Path, n_train: int = 256, fmt: str = "zarr", unlabelled_every: int = 0) -> Path:
    from data_pipeline.store import StoreWriter

    sizes = {"train": n_train, "val": 32, "test": 32}
    with StoreWriter(path, fmt, CHANNELS, WINDOW, chunk_windows=32, shard_windows=128) as w:
        for i, (split, n) in enumerate(sizes.items()):
            x = make_windows(n, seed=i)
            label = np.arange(n) % 4
            if unlabelled_every:
                label[::unlabelled_every] = -1
            w.append(split, x, label=label, subject=np.arange(n) % 5, recording=0, offset=np.arange(n) * WINDOW)
        train = make_windows(n_train, seed=0)
        w.finalize(
            {
                "sample_rate_hz": 50.0,
                "normalization": {
                    "split": "train",
                    "mean": train.mean(axis=(0, 2)).tolist(),
                    "std": train.std(axis=(0, 2)).tolist(),
                },
            }
        )
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "tiny")


REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "configs" / "pretrain" / "tiny.yaml"


def tiny_overrides(store: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [f"data.store={store}", f"run.storage_path={storage}", f"run.name={name}", *extra]


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for every test of the session (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()
