"""`timemae data prepare`: recordings (or ready windows) -> windows -> splits -> a store.

One streaming pass over the recordings: each recording is read, its derived channels are
computed, it is cut into windows, and the windows go straight to the split's shard buffer
(:class:`~data_pipeline.store.StoreWriter`), so memory stays bounded by about one shard per
split plus one recording, whatever the input size. Train-split normalisation statistics
accumulate in float64 on the way. The store is written under a temporary name and renamed
into place only when complete (with ``manifest.json`` last), so an interrupted prepare never
leaves anything that looks complete; re-running restarts cleanly, and re-running an
up-to-date store is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from data_pipeline import __version__
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.splits import (
    SPLITS,
    assign_splits,
    check_subject_disjoint,
    label_fraction_subset,
    random_split_codes,
)
from data_pipeline.stats import RunningStats
from data_pipeline.store import StoreWriter, read_manifest
from data_pipeline.typedconfig import to_dict
from data_pipeline.windowing import derive_channels, make_windows, map_labels

__all__ = ["prepare", "PrepareResult", "summary_table"]


@dataclass
class _SplitAcc:
    """Running per-split bookkeeping while windows stream to the writer."""

    num_windows: int = 0
    class_counts: Counter = field(default_factory=Counter)
    subjects: set = field(default_factory=set)
    recordings: set = field(default_factory=set)
    labels: list = field(default_factory=list)  # train only: for label-fraction subsets

    def add(self, labels: np.ndarray, subject: str, recording: str, keep_labels: bool) -> None:
        n = int(labels.shape[0])
        if n == 0:
            return
        self.num_windows += n
        values, counts = np.unique(labels[labels >= 0], return_counts=True)
        self.class_counts.update({int(v): int(c) for v, c in zip(values, counts)})
        self.subjects.add(subject)
        self.recordings.add(recording)
        if keep_labels:
            self.labels.append(labels.astype(np.int64, copy=False))


@dataclass
class PrepareResult:
    """What `prepare` did: the manifest it wrote (or found) and timing."""

    path: Path
    manifest: dict
    seconds: float
    up_to_date: bool = False
    skipped_recordings: list = field(default_factory=list)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    """A progress bar over recordings (a silent pass-through when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="rec", file=sys.stderr, leave=False, disable=not enabled)


def _config_fingerprint(config: dict) -> str:
    """Everything that decides the store's bytes (output.overwrite does not)."""
    cfg = json.loads(json.dumps(config))
    cfg.get("output", {}).pop("overwrite", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _existing_store(out: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """The manifest of an up-to-date store at ``out``, None to (re)build, or an error."""
    if not out.exists():
        return None
    if not (out / "manifest.json").is_file():
        if any(out.iterdir()):
            if not overwrite:
                raise DataError(
                    f"output.path {str(out)!r} exists and is not a store (no manifest.json); "
                    "choose another output.path or set output.overwrite=true to replace it"
                )
        return None
    manifest = read_manifest(out)
    if manifest.get("config_fingerprint") == fingerprint:
        return manifest
    if not overwrite:
        raise DataError(
            f"store {str(out)!r} exists and was made from a different config; "
            "set output.overwrite=true to replace it, or choose another output.path"
        )
    return None


def prepare(cfg: DataConfig, *, command: str = "", progress: bool = False) -> PrepareResult:
    """Build the store described by ``cfg`` (see module docstring)."""
    t0 = time.perf_counter()
    out = Path(cfg.output.path)
    config = to_dict(cfg)
    fingerprint = _config_fingerprint(config)
    found = _existing_store(out, fingerprint, cfg.output.overwrite)
    if found is not None:
        return PrepareResult(out, found, time.perf_counter() - t0, up_to_date=True)

    if cfg.source.kind == "windows":
        build = _from_window_files
    else:
        build = _from_recordings
    meta = {
        "name": cfg.name,
        "pipeline_version": __version__,
        "config": config,
        "config_fingerprint": fingerprint,
        "command": command,
    }
    manifest, skipped = build(cfg, out, meta, progress)
    return PrepareResult(out, manifest, time.perf_counter() - t0, skipped_recordings=skipped)


def _open_writer(cfg: DataConfig, out: Path, channels: list[str]) -> StoreWriter:
    """The store writer the ``output`` section describes."""
    return StoreWriter(
        out,
        cfg.output.format,
        channels,
        cfg.window.length,
        dtype=cfg.output.dtype,
        chunk_windows=cfg.output.chunk_windows,
        shard_windows=cfg.output.shard_windows,
        compression_level=cfg.output.compression_level,
    )


def _units(cfg: DataConfig, channels: list[str]) -> list[dict]:
    return [{"name": c, "unit": cfg.channels.units.get(c, "")} for c in channels]


def _finish(
    cfg: DataConfig,
    acc: dict[str, _SplitAcc],
    stats: RunningStats,
    channels: list[str],
    sample_rate: float | None,
    sources: list[dict],
    subjects: list[str],
) -> dict:
    """Split summaries, label subsets and normalisation -> manifest; finalize the store."""
    if stats.count == 0:
        raise DataError(
            "the train split has no windows, so normalisation statistics cannot be computed; "
            "check split.test_subjects/val_subjects/fractions and window.length"
        )
    splits: dict[str, dict] = {}
    for name in SPLITS:
        a = acc[name]
        entry = {
            "num_windows": a.num_windows,
            "num_labelled": int(sum(a.class_counts.values())),
            "class_counts": {str(k): v for k, v in sorted(a.class_counts.items())},
            "subjects": sorted(a.subjects, key=_natural),
            "recordings": sorted(a.recordings),
        }
        if name == "train":
            labels = np.concatenate(a.labels) if a.labels else np.zeros(0, np.int64)
            entry["label_fractions"] = {}
            for frac in cfg.split.label_fractions:
                idx = label_fraction_subset(labels, frac, cfg.split.seed)
                entry["label_fractions"][repr(float(frac))] = {
                    "seed": cfg.split.seed,
                    "num_windows": int(idx.shape[0]),
                    "indices_sha256": hashlib.sha256(
                        np.ascontiguousarray(idx, dtype=np.int64).tobytes()
                    ).hexdigest(),
                }
        splits[name] = entry
    if cfg.split.method not in ("random", "predefined"):  # window files carry no subjects
        check_subject_disjoint({s: set(splits[s]["subjects"]) for s in SPLITS})
    stats_dict = stats.to_dict()
    manifest = {
        "channels": _units(cfg, channels),
        "sample_rate_hz": sample_rate,
        "window": cfg.window.length,
        "stride": cfg.window.stride,
        "label_policy": cfg.window.label_policy,
        "label_map": {str(k): v for k, v in (cfg.window.label_map or {}).items()} or None,
        "split_method": cfg.split.method,
        "splits": splits,
        "normalization": {"split": "train", **stats_dict},
        "sources": sources,
        "subjects": subjects,
    }
    return manifest


def _natural(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _from_recordings(cfg: DataConfig, out: Path, meta: dict, progress: bool) -> tuple[dict, list]:
    from data_pipeline.sources import list_recordings, read_recording

    refs = list_recordings(cfg.source)
    if not refs:
        raise DataError(
            f"no recordings found in source.path={cfg.source.path!r} matching "
            f"source.glob={cfg.source.glob!r}; point source.path at a directory of "
            "Parquet/CSV/NPZ files"
        )
    min_len = max(cfg.source.min_length, 1)
    skipped = [r.name for r in refs if r.num_samples < min_len]
    refs = [r for r in refs if r.num_samples >= min_len]
    if not refs:
        raise DataError(
            f"every recording is shorter than source.min_length={cfg.source.min_length}; lower it"
        )
    subjects = sorted({r.subject for r in refs}, key=_natural)
    subject_id = {s: i for i, s in enumerate(subjects)}
    assignment = assign_splits(refs, cfg.split) if cfg.split.method != "random" else {}

    acc = {s: _SplitAcc() for s in SPLITS}
    stats = RunningStats()
    channels: list[str] | None = None
    sample_rate: float | None = None
    sources: list[dict] = []
    writer: StoreWriter | None = None
    try:
        bar = _progress(refs, len(refs), "recordings", progress)
        for rec_id, ref in enumerate(bar):
            rec = read_recording(ref, cfg.source)
            # the config's rate wins over file metadata
            rate = cfg.source.sample_rate_hz or rec.sample_rate_hz
            if sample_rate is None:
                sample_rate = rate
            elif rate is not None and abs(rate - sample_rate) > 1e-9:
                raise DataError(
                    f"recording {ref.file!r} is sampled at {rate} Hz but earlier ones at "
                    f"{sample_rate} Hz; resample it or prepare it separately"
                )
            data, names = derive_channels(rec, cfg.channels, rate)
            if channels is None:
                channels = names
                writer = _open_writer(cfg, out, channels)
            elif names != channels:
                raise DataError(
                    f"recording {ref.file!r} yields channels {names}, earlier ones {channels}; "
                    "give every recording the same columns or set source.channels"
                )
            w = make_windows(data, rec.labels, cfg.window, where=ref.file, channels=names)
            n = int(w.x.shape[0])
            subj = np.full(n, subject_id[ref.subject], dtype=np.int32)
            recn = np.full(n, rec_id, dtype=np.int32)
            if cfg.split.method == "random":
                codes = random_split_codes(ref.name, w.offset, cfg.split)
                parts = [(SPLITS[c], codes == c) for c in range(len(SPLITS))]
            else:
                parts = [(assignment[ref.name], slice(None))]
            for split, sel in parts:
                x = w.x[sel]
                if x.shape[0] == 0:
                    continue
                writer.append(split, x, w.label[sel], subj[sel], recn[sel], w.offset[sel])
                acc[split].add(w.label[sel], ref.subject, ref.name, keep_labels=split == "train")
                if split == "train":
                    stats.update(x)
            bar.set_postfix(
                windows=sum(a.num_windows for a in acc.values()),
                shards=writer.num_shards_written,
                refresh=False,
            )
            sources.append(
                {
                    "id": rec_id,
                    "name": ref.name,
                    "file": ref.file,
                    "sha256": ref.sha256,
                    "subject": ref.subject,
                    "session": ref.session,
                    "num_samples": ref.num_samples,
                    "num_windows": n,
                    "num_dropped_nan": int(w.num_dropped_nan),
                    "split": "random" if cfg.split.method == "random" else assignment[ref.name],
                }
            )
        assert writer is not None and channels is not None
        manifest = _finish(cfg, acc, stats, channels, sample_rate, sources, subjects)
        manifest["skipped_recordings"] = skipped
        final = writer.finalize({**manifest, **meta})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return final, skipped


def _from_window_files(cfg: DataConfig, out: Path, meta: dict, progress: bool) -> tuple[dict, list]:
    from data_pipeline.sources import read_window_files

    files = read_window_files(cfg.source)
    first = next(iter(files.values()))[0]
    num_channels, length = int(first.shape[1]), int(first.shape[2])
    if length != cfg.window.length:
        raise DataError(
            f"window files hold windows of length {length} but window.length={cfg.window.length}; "
            f"set window.length={length}"
        )
    channels = list(cfg.source.channels or [f"ch{i}" for i in range(num_channels)])
    if len(channels) != num_channels:
        raise DataError(
            f"source.channels names {len(channels)} channels but the window files hold "
            f"{num_channels}; list {num_channels} names or set source.channels=null"
        )
    writer = _open_writer(cfg, out, channels)  # length == window.length, checked above
    acc = {s: _SplitAcc() for s in SPLITS}
    stats = RunningStats()
    sources = []
    try:
        for rec_id, (split_name, (x, y, sha)) in enumerate(sorted(files.items())):
            if x.shape[1:] != (num_channels, length):
                raise DataError(
                    f"window file for split {split_name!r} has windows of shape {tuple(x.shape[1:])}, "
                    f"others {(num_channels, length)}; all files must share (C, T)"
                )
            if not np.isfinite(x).all():
                bad = int(np.argwhere(~np.isfinite(x))[0][0])
                if cfg.window.nan_policy == "error":
                    raise DataError(
                        f"window file for split {split_name!r} has non-finite values in window {bad}; "
                        "fix the file or set window.nan_policy=drop_window|zero_fill"
                    )
                if cfg.window.nan_policy == "zero_fill":
                    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
                else:
                    keep = np.isfinite(x).all(axis=(1, 2))
                    x, y = x[keep], y[keep]
            y = map_labels(y.astype(np.int64), cfg.window.label_map)
            offset = np.arange(x.shape[0], dtype=np.int64)
            if cfg.split.method == "random":
                codes = random_split_codes(split_name, offset, cfg.split)
                parts = [(SPLITS[c], codes == c) for c in range(len(SPLITS))]
            else:
                if split_name not in SPLITS:
                    raise DataError(f"window file split {split_name!r} is not one of {SPLITS}")
                parts = [(split_name, slice(None))]
            for split, sel in parts:
                xs = np.ascontiguousarray(x[sel], dtype=np.float32)
                if xs.shape[0] == 0:
                    continue
                n = xs.shape[0]
                writer.append(
                    split,
                    xs,
                    y[sel],
                    np.zeros(n, np.int32),
                    np.full(n, rec_id, np.int32),
                    offset[sel],
                )
                acc[split].add(y[sel], "unknown", split_name, keep_labels=split == "train")
                if split == "train":
                    stats.update(xs)
            sources.append(
                {"id": rec_id, "name": split_name, "file": f"{split_name}", "sha256": sha,
                 "num_windows": int(x.shape[0])}
            )
        manifest = _finish(cfg, acc, stats, channels, cfg.source.sample_rate_hz, sources, ["unknown"])
        final = writer.finalize({**manifest, **meta})
    except BaseException:
        writer.abort()
        raise
    return final, []


def summary_table(manifest: dict, seconds: float | None = None, path: Path | None = None) -> str:
    """A human summary of a store: windows per split, classes, channels, bytes, time."""
    lines = []
    head = f"store {path}" if path else "store"
    lines.append(f"{head}  [{manifest.get('format')}, {manifest.get('dtype')}]")
    chans = [c["name"] if isinstance(c, dict) else c for c in manifest.get("channels", [])]
    lines.append(
        f"channels ({len(chans)}): {', '.join(chans)}  |  window {manifest.get('window')} "
        f"stride {manifest.get('stride')} @ {manifest.get('sample_rate_hz')} Hz"
    )
    lines.append(f"{'split':<6} {'windows':>9} {'labelled':>9} {'subjects':>8}  classes")
    for name, s in manifest.get("splits", {}).items():
        classes = " ".join(f"{k}:{v}" for k, v in s.get("class_counts", {}).items())
        lines.append(
            f"{name:<6} {s.get('num_windows', 0):>9} {s.get('num_labelled', 0):>9} "
            f"{len(s.get('subjects', [])):>8}  {classes}"
        )
    total_bytes = sum(f.get("bytes", 0) for f in manifest.get("files", {}).values())
    tail = f"{total_bytes / 1e6:.1f} MB in {len(manifest.get('files', {}))} files"
    if seconds is not None:
        tail += f", {seconds:.1f} s"
    lines.append(tail)
    return "\n".join(lines)
