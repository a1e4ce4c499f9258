"""Channels and windows: derived channels of one recording, then (C, T) windows with labels.

:func:`derive_channels` builds the output channels of one recording (whole session at once):

- ``channels.gravity_split``: for each listed acceleration column ``col`` a zero-phase
  Butterworth low-pass (``scipy.signal.butter(order, cutoff_hz, fs=rate, output="sos")``
  applied forward and backward with ``sosfiltfilt``; UCI HAR: order 3, 0.3 Hz at 50 Hz)
  gives ``gravity_<col>``, and ``body_<col> = col - gravity_<col>``. Computed in float64 over
  the whole recording. Non-finite samples are bridged by linear interpolation for the
  filter's input only and are NaN again in both outputs at the same rows, so one bad sample
  stays one bad row for the window NaN policy instead of spreading over the recording.
- ``channels.aliases``: ``new name -> existing channel`` (input or derived).
- ``channels.select``: output order. When null the output is the input channels, then the
  derived ``body_<col>, gravity_<col>`` pairs (in ``gravity_split.columns`` order), then the
  aliases (in config order).

:func:`make_windows` cuts (S, C) data into (N, C, T) windows with start ``offset = i *
stride``, vectorised with :func:`numpy.lib.stride_tricks.sliding_window_view` (no Python
loop per window):

- ``tail=drop``: ``N = (S - T) // stride + 1`` windows (0 if ``S < T``).
- ``tail=pad``: if samples remain after the last full window, one more, zero-padded window
  starts at ``N_drop * stride`` when that is inside the data (so ``ceil((S - T) / stride) + 1``
  windows when ``stride <= T``; 1 if ``0 < S < T``); padded samples are unlabelled (-1).
- labels: ``window.label_map`` is applied per *sample* first (raw labels not listed -> -1),
  then the policy: ``pure`` (every sample has the same label >= 0, else -1), ``majority``
  (most frequent label among labelled samples, ties -> the smallest, none -> -1),
  ``center`` (label of sample ``T // 2``).
- non-finite samples (NaN/inf) in a window: ``error`` raises a DataError naming the
  recording, the first bad row and column and the fix; ``drop_window`` drops those windows
  (counted in ``num_dropped_nan``); ``zero_fill`` replaces the bad values by 0. Non-finite
  samples outside every window (a dropped tail) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from data_pipeline.config import ChannelsConfig, WindowConfig
from data_pipeline.errors import DataError

__all__ = ["derive_channels", "lowpass_gravity", "Windows", "make_windows", "num_windows"]


# --------------------------------------------------------------------------------------------
# channels


def lowpass_gravity(
    x: np.ndarray, sample_rate_hz: float, cutoff_hz: float, order: int
) -> np.ndarray:
    """Zero-phase Butterworth low-pass of ``x`` (S,) or (S, K) along axis 0, float64.

    Non-finite samples are interpolated for the filter and NaN in the result.
    """
    from scipy.signal import butter, sosfiltfilt

    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        x = x.copy()
        cols = [x] if x.ndim == 1 else [x[:, k] for k in range(x.shape[1])]
        masks = [bad] if x.ndim == 1 else [bad[:, k] for k in range(x.shape[1])]
        for col, m in zip(cols, masks):
            if m.all():
                col[:] = 0.0
            elif m.any():
                idx = np.arange(col.shape[0])
                col[m] = np.interp(idx[m], idx[~m], col[~m])
    sos = butter(order, cutoff_hz, btype="low", fs=sample_rate_hz, output="sos")
    n = x.shape[0]
    if n < 2:
        out = x.copy()
    else:
        default = 3 * (2 * len(sos) + 1 - min((sos[:, 2] == 0).sum(), (sos[:, 5] == 0).sum()))
        out = sosfiltfilt(sos, x, axis=0, padlen=min(int(default), n - 2))
    if bad.any():
        out[bad] = np.nan
    return out


def derive_channels(
    rec, cfg: ChannelsConfig, sample_rate_hz: Optional[float]
) -> tuple[np.ndarray, list[str]]:
    """``(data (S, C_out) float32, names)`` of one recording (see module docstring)."""
    where = rec.ref.file if getattr(rec, "ref", None) is not None else "recording"
    inputs = list(rec.channels)
    index = {c: j for j, c in enumerate(inputs)}
    derived: list[str] = []
    gs = cfg.gravity_split
    if gs is not None:
        missing = [c for c in gs.columns if c not in index]
        if missing:
            raise DataError(
                f"{where}: channels.gravity_split.columns names unknown channel(s) {missing}; "
                f"available: {inputs}"
            )
        for c in gs.columns:
            derived += [f"body_{c}", f"gravity_{c}"]
    known = inputs + derived
    aliases = dict(cfg.aliases)
    for new, old in aliases.items():
        if new in known:
            raise DataError(
                f"{where}: channels.aliases.{new} would shadow an existing channel; "
                "pick another name"
            )
        if old not in known:
            raise DataError(
                f"{where}: channels.aliases.{new} points to unknown channel {old!r}; available: "
                f"{known}"
            )
    available = known + list(aliases)
    names = list(cfg.select) if cfg.select is not None else available
    missing = [c for c in names if c not in available]
    if missing:
        raise DataError(
            f"{where}: channels.select names unknown channel(s) {missing}; available: {available}"
        )

    def source_of(name: str) -> str:
        return aliases.get(name, name)

    needed = {source_of(n) for n in names}
    data = rec.data
    grav: dict[str, np.ndarray] = {}
    if gs is not None:
        split_cols = [c for c in gs.columns if f"body_{c}" in needed or f"gravity_{c}" in needed]
        if split_cols:
            if sample_rate_hz is None:
                raise DataError(
                    f"{where}: channels.gravity_split needs the sample rate, but the file has no "
                    "sample_rate_hz metadata; set source.sample_rate_hz"
                )
            if gs.cutoff_hz >= sample_rate_hz / 2:
                raise DataError(
                    f"{where}: channels.gravity_split.cutoff_hz={gs.cutoff_hz} must be below half "
                    f"the sample rate ({sample_rate_hz / 2} Hz); lower it"
                )
            cols = np.asarray(data[:, [index[c] for c in split_cols]], dtype=np.float64)
            g = lowpass_gravity(cols, sample_rate_hz, gs.cutoff_hz, gs.order)
            for k, c in enumerate(split_cols):
                grav[c] = g[:, k]

    out = np.empty((data.shape[0], len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        src = source_of(name)
        if src in index:
            out[:, j] = data[:, index[src]]
        elif src.startswith("gravity_"):
            out[:, j] = grav[src[len("gravity_"):]]
        else:  # body_<col>
            col = src[len("body_"):]
            out[:, j] = np.asarray(data[:, index[col]], dtype=np.float64) - grav[col]
    return out, names


# --------------------------------------------------------------------------------------------
# windows


@dataclass
class Windows:
    """Windows of one recording."""

    x: np.ndarray  # (N, C, T) float32
    label: np.ndarray  # (N,) int64, -1 = unlabelled
    offset: np.ndarray  # (N,) int64 start sample
    num_dropped_nan: int = 0


def num_windows(num_samples: int, length: int, stride: int, tail: str = "drop") -> int:
    """Windows :func:`make_windows` cuts from ``num_samples`` samples (before NaN drops)."""
    full = (num_samples - length) // stride + 1 if num_samples >= length else 0
    covered = (full - 1) * stride + length if full else 0
    if tail == "pad" and covered < num_samples and full * stride < num_samples:
        return full + 1  # samples after the last full window, and a start inside the data
    return full


def map_labels(labels: np.ndarray, label_map: Optional[dict[int, int]]) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if label_map is None:
        return labels
    keys = np.array(sorted(label_map), dtype=np.int64)
    vals = np.array([label_map[k] for k in sorted(label_map)], dtype=np.int64)
    out = np.full(labels.shape, -1, dtype=np.int64)
    if keys.size:
        pos = np.clip(np.searchsorted(keys, labels), 0, keys.size - 1)
        hit = keys[pos] == labels
        out[hit] = vals[pos[hit]]
    return out


def _window_labels(lw: np.ndarray, policy: str) -> np.ndarray:
    """(N, T) per-sample labels (-1 = none) -> (N,) window labels."""
    n, t = lw.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if policy == "center":
        return lw[:, t // 2].astype(np.int64)
    if policy == "pure":
        first = lw[:, 0]
        pure = (lw == first[:, None]).all(axis=1) & (first >= 0)
        return np.where(pure, first, -1).astype(np.int64)
    # majority among labelled samples, ties -> smallest label
    valid = lw >= 0
    classes = np.unique(lw[valid])
    if classes.size == 0:
        return np.full(n, -1, dtype=np.int64)
    codes = np.searchsorted(classes, lw)  # valid entries map to their class index
    k = classes.size
    rows = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], lw.shape)
    counts = np.bincount((rows * k + codes)[valid], minlength=n * k).reshape(n, k)
    best = counts.argmax(axis=1)  # first maximum = smallest label
    return np.where(counts.max(axis=1) > 0, classes[best], -1).astype(np.int64)


def make_windows(
    data: np.ndarray,
    labels: Optional[np.ndarray],
    cfg: WindowConfig,
    where: str,
    channels: Optional[list[str]] = None,
) -> Windows:
    """Cut (S, C) ``data`` into windows (see module docstring). ``where`` names the recording
    in error messages; ``channels`` (optional) names the columns there."""
    data = np.asarray(data)
    if data.ndim != 2:
        raise DataError(f"{where}: expected (samples, channels) data, got shape {data.shape}")
    s, c = data.shape
    t, stride = cfg.length, cfg.stride
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (s,):
            raise DataError(
                f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {s} samples; "
                "give one label per sample"
            )
        labels = map_labels(labels, cfg.label_map)
    else:
        labels = np.full(s, -1, dtype=np.int64)

    n = num_windows(s, t, stride, cfg.tail)
    n_full = num_windows(s, t, stride, "drop")
    offsets = np.arange(n, dtype=np.int64) * stride

    # non-finite rows, counted per window with a prefix sum
    bad_row = ~np.isfinite(data).all(axis=1) if data.dtype.kind == "f" else np.zeros(s, bool)
    cum = np.concatenate([[0], np.cumsum(bad_row, dtype=np.int64)])
    ends = np.minimum(offsets + t, s)
    bad_win = (cum[ends] - cum[offsets]) > 0
    if bad_win.any() and cfg.nan_policy == "error":
        first = int(np.flatnonzero(bad_win)[0])
        row = int(offsets[first] + np.flatnonzero(bad_row[offsets[first]:ends[first]])[0])
        col = int(np.flatnonzero(~np.isfinite(data[row]))[0])
        col_name = f" ({channels[col]!r})" if channels is not None and col < len(channels) else ""
        raise DataError(
            f"{where}: non-finite value {data[row, col]} at row {row}, column {col}{col_name}; "
            "clean the data or set window.nan_policy=drop_window (skip such windows) or "
            "window.nan_policy=zero_fill (replace them by 0)"
        )

    keep = ~bad_win if cfg.nan_policy == "drop_window" else np.ones(n, dtype=bool)
    num_dropped = int(n - keep.sum())

    x = np.empty((n, c, t), dtype=np.float32)
    lw = np.empty((n, t), dtype=np.int64)
    if n_full:
        x[:n_full] = sliding_window_view(data, t, axis=0)[::stride][:n_full]
        lw[:n_full] = sliding_window_view(labels, t)[::stride][:n_full]
    for i in range(n_full, n):  # at most one padded tail window
        start = int(offsets[i])
        m = s - start
        x[i, :, :m] = data[start:].T
        x[i, :, m:] = 0.0
        lw[i, :m] = labels[start:]
        lw[i, m:] = -1
    if num_dropped:
        x, lw, offsets = x[keep], lw[keep], offsets[keep]
    if cfg.nan_policy == "zero_fill" and bad_win.any():
        x[bad_win] = np.nan_to_num(x[bad_win], nan=0.0, posinf=0.0, neginf=0.0)
    return Windows(x, _window_labels(lw, cfg.label_policy), offsets, num_dropped)
