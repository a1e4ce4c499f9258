"""A tiny synthetic task for evaluation tests: sine vs square vs sawtooth windows with noise.

Written into a real store with :class:`data_pipeline.store.StoreWriter`; a tiny TimeMAE is
pretrained on it for a few hundred Adam steps of its own loss (single process, CPU) and saved
with ``save_pretrained`` -- the same export folder ``timemae export`` produces.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import atexit
from pathlib import Path

import numpy as np
import torch

from data_pipeline.store import StoreWriter

CHANNELS = ["a", "b"]
WINDOW = 64
SPLIT_SIZES = {"train": 480, "val": 150, "test": 150}
CLASSES = 3


def waveforms(n: int, seed: int, window: int = WINDOW, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 2, window)`` float32 windows and int64 labels 0/1/2 = sine/square/sawtooth.

    2 to 2.5 cycles per window, random phase and amplitude (0.8..1.2) per channel, Gaussian
    noise. Easy for a pretrained tiny encoder's linear probe (~0.85 test accuracy after a few
    hundred steps), hard for a random-init one (~0.7): mean-pooling random patch embeddings
    mostly averages the N(0, 1) position embeddings.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    t = np.arange(window) / window
    x = np.empty((n, len(CHANNELS), window), np.float32)
    for i in range(n):
        f = rng.uniform(2.0, 2.5)
        for c in range(len(CHANNELS)):
            ph = rng.uniform(0, 1)
            u = (f * t + ph) % 1.0
            if y[i] == 0:
                w = np.sin(2 * np.pi * u)
            elif y[i] == 1:
                w = np.where(u < 0.5, 1.0, -1.0)
            else:
                w = 2 * u - 1
            x[i, c] = rng.uniform(0.8, 1.2) * w + noise * rng.normal(size=window)
    return x, y.astype(np.int64)


def make_splits(seed: int = 0, unlabelled_train: int = 40) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k, (split, n) in enumerate(SPLIT_SIZES.items()):
        x, y = waveforms(n, seed * 10 + k)
        if split == "train" and unlabelled_train:
            y[:unlabelled_train] = -1  # some unlabelled windows, as real stores have
        out[split] = (x, y)
    return out


def write_store(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], fmt: str = "zarr") -> Path:
    """Write ``splits`` into a store at ``path`` with train-split normalisation stats."""
    xtr = splits["train"][0]
    w = StoreWriter(path, fmt, CHANNELS, WINDOW, chunk_windows=32, shard_windows=128)
    manifest_splits = {}
    for split, (x, y) in splits.items():
        n = len(y)
        w.append(split, x, y, np.zeros(n, np.int32), np.zeros(n, np.int32), np.arange(n, dtype=np.int64) * WINDOW)
        lab = y[y >= 0]
        manifest_splits[split] = {
            "num_labelled": int(lab.size),
            "class_counts": {str(c): int((lab == c).sum()) for c in np.unique(lab)},
        }
    w.finalize({
        "splits": manifest_splits,
        "normalization": {"mean": xtr.mean(axis=(0, 2)).tolist(), "std": xtr.std(axis=(0, 2)).tolist()},
        "channels": [{"name": c, "unit": "au"} for c in CHANNELS],
        "window": WINDOW,
        "stride": WINDOW,
    })
    return path


def tiny_config(**kw):
    from timemae_dist.model import TimeMAEConfig

    base = dict(
        in_channels=len(CHANNELS), seq_len=WINDOW, wave_length=8, d_model=32, num_layers=2, num_heads=2,
        reg_layers=1, ffn_mult=2, vocab_size=32, dropout=0.1, kernel_backend="eager",
    )
    base.update(kw)
    return TimeMAEConfig(**base)


def pretrain(x_train: np.ndarray, out: Path, steps: int = 250, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> Path:
    """A few hundred Adam steps of TimeMAE's own loss on normalised ``x_train``; save_pretrained(out)."""
    from timemae_dist.model import TimeMAE

    x = torch.as_tensor(x_train)
    x = (x - x.mean(dim=(0, 2), keepdim=True)) / x.std(dim=(0, 2), keepdim=True)
    torch.manual_seed(seed)
    model = TimeMAE(tiny_config())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = model(x[idx], generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.momentum_update()
    model.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=None)
def shared_fixture(steps: int = 250) -> tuple[Path, Path]:
    """(store, pretrained export) built once per test process (used by several test modules)."""
    root = Path(tempfile.mkdtemp(prefix="timemae-eval-test-"))
    atexit.register(shutil.rmtree, root, True)
    splits = make_splits()
    store = write_store(root / "store", splits)
    export = pretrain(splits["train"][0], root / "export", steps=steps)
    return store, export
