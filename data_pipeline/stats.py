"""Streaming per-channel mean/std of windows (train split only), float64 throughout.

Each :meth:`RunningStats.update` computes the batch's mean and sum of squared deviations
(M2) in float64 around the batch mean, then merges them into the running totals with Chan et
al.'s parallel formula::

    delta = mean_b - mean_a;  n = n_a + n_b
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta**2 * n_a * n_b / n

which stays accurate when the data sit far from zero (no ``E[x^2] - E[x]^2`` cancellation).
``std`` is the population standard deviation ``sqrt(M2 / count)``, reported as is (0 for a
constant channel). Whoever divides by it must use :meth:`RunningStats.safe_std` /
``max(std, STD_FLOOR)`` so constant channels normalise to 0 instead of inf/NaN.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["RunningStats", "STD_FLOOR"]

STD_FLOOR = 1e-8
_BATCH_ELEMS = 1 << 24  # float64 elements converted at once (128 MiB)


class RunningStats:
    """Per-channel count/mean/M2 over (N, C, T) batches; mergeable across workers."""

    def __init__(self, num_channels: Optional[int] = None):
        self._n = 0
        self._mean: Optional[np.ndarray] = None
        self._m2: Optional[np.ndarray] = None
        if num_channels is not None:
            self._mean = np.zeros(num_channels, dtype=np.float64)
            self._m2 = np.zeros(num_channels, dtype=np.float64)

    # ---------------------------------------------------------------------------------------

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        if self._mean is None:
            self._mean = np.zeros_like(mean_b)
            self._m2 = np.zeros_like(m2_b)
        if mean_b.shape != self._mean.shape:
            raise ValueError(
                f"RunningStats holds {self._mean.shape[0]} channels, got {mean_b.shape[0]}"
            )
        n_a = self._n
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta * delta * (n_a * n_b / n)
        self._n = n

    def update(self, x_NCT: np.ndarray) -> None:
        """Add a batch of windows (N, C, T); any float dtype, accumulated in float64."""
        x_NCT = np.asarray(x_NCT)
        if x_NCT.ndim != 3:
            raise ValueError(f"expected (N, C, T) windows, got shape {x_NCT.shape}")
        n, c, t = x_NCT.shape
        if n == 0 or t == 0:
            if self._mean is None:
                self._mean, self._m2 = np.zeros(c), np.zeros(c)
            return
        step = max(1, _BATCH_ELEMS // max(1, c * t))
        for i in range(0, n, step):  # bounded float64 copies for huge batches
            xb = np.asarray(x_NCT[i:i + step], dtype=np.float64)
            cnt = xb.shape[0] * t
            mean_b = xb.mean(axis=(0, 2))
            dev = xb - mean_b[None, :, None]
            m2_b = np.einsum("nct,nct->c", dev, dev)
            if not (np.isfinite(mean_b).all() and np.isfinite(m2_b).all()):
                raise ValueError(
                    "non-finite values in windows passed to RunningStats; apply "
                    "window.nan_policy before computing statistics"
                )
            self._merge(cnt, mean_b, m2_b)

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold ``other`` (e.g. another worker's stats) into this one; returns self."""
        if other._mean is not None:
            self._merge(other._n, other._mean, other._m2)
        return self

    # ---------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Samples per channel seen so far (windows x T)."""
        return self._n

    @property
    def num_channels(self) -> Optional[int]:
        return None if self._mean is None else int(self._mean.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean, float64 (C,); NaN before any data."""
        if self._mean is None:
            return np.zeros(0)
        return self._mean.copy() if self._n else np.full_like(self._mean, np.nan)

    @property
    def std(self) -> np.ndarray:
        """Per-channel population std, float64 (C,); NaN before any data, 0 if constant."""
        if self._m2 is None:
            return np.zeros(0)
        if not self._n:
            return np.full_like(self._m2, np.nan)
        return np.sqrt(np.maximum(self._m2, 0.0) / self._n)

    def safe_std(self) -> np.ndarray:
        """``max(std, STD_FLOOR)``: what a normaliser should divide by."""
        return np.maximum(self.std, STD_FLOOR)

    @property
    def constant_channels(self) -> list[int]:
        """Channels whose std is below ``STD_FLOOR`` (normalised by the floor)."""
        return [int(i) for i in np.flatnonzero(self.std < STD_FLOOR)]

    def to_dict(self) -> dict:
        """``{"count", "mean": [...], "std": [...]}`` (plain Python floats, JSON-ready)."""
        return {
            "count": int(self._n),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RunningStats":
        """Inverse of :meth:`to_dict` (M2 rebuilt as ``std**2 * count``)."""
        out = cls(len(d["mean"]))
        n = int(d["count"])
        if n:
            out._n = n
            out._mean = np.asarray(d["mean"], dtype=np.float64)
            out._m2 = np.asarray(d["std"], dtype=np.float64) ** 2 * n
        return out

    def __repr__(self) -> str:
        return f"RunningStats(count={self._n}, channels={self.num_channels})"
