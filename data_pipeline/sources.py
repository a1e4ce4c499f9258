"""Sources: list and read recordings (Parquet, CSV, NPZ, the HAPT package) and window files.

Recordings (``source.kind=recordings``): one file per continuous session of one subject in
``source.path``, matched by ``source.glob``. With ``source.format=auto`` the extension picks
the reader (``.parquet``/``.pq``, ``.csv``, ``.npz``) and other files (a README) are ignored;
with an explicit format every file matching ``source.glob`` is read with that reader, except
that the default glob ``*`` is narrowed to that format's extensions. Files may sit in
sub-directories when the glob says so (``**/*.csv``); a recording's ``name`` is its path
relative to ``source.path`` without the extension (the file stem for top-level files).

- **Parquet**: columns are channels; the per-sample label column is ``source.label_column``.
  Schema metadata ``subject``, ``session``, ``sample_rate_hz`` are used when present.
- **CSV**: a header row naming the columns, one row per sample. Empty cells and ``nan`` read
  as NaN. CSV carries no metadata, so subject/session come from the file name.
- **NPZ** (``np.savez``/``np.savez_compressed``, no pickled objects), either layout:

  1. one 1-D array per channel, named by the channel, plus a 1-D ``<label_column>`` array;
  2. ``data`` (S, C) plus ``channels`` (C,) strings naming its columns, plus a 1-D
     ``<label_column>`` array.

  Optional 0-d arrays ``subject``, ``session``, ``sample_rate_hz`` act as metadata (like
  Parquet schema metadata) and are never channels.

Channel selection: ``source.channels`` lists the columns in order; null takes every numeric
(integer or floating) column except the label column, in file order (non-numeric columns
are then ignored). Channels are returned as float32; labels as int64 (-1 = unlabelled;
floating label columns are accepted when every value is an integer). NaN/inf in channels
are kept: the window NaN policy deals with them.

Subjects: ``source.subject_from=metadata`` requires file metadata, ``filename`` applies
``source.filename_pattern`` (``re.search`` on the recording name: the file stem, or
``dir/stem`` for files in sub-directories) and ``auto`` prefers metadata. Subject ids are
canonicalised (``"01"`` -> ``"1"``).

Minimum length: :func:`list_recordings` returns every recording with its ``num_samples``;
the caller skips those shorter than ``source.min_length`` (and reports them), see
:func:`skip_short`. A file with no samples at all is an error, not a skip.

Window files (``source.kind=windows``): ``train``/``val``/``test`` ``.pt`` (the TS-TCC /
official TimeMAE format, a dict with ``samples`` (N, C, T) and ``labels`` (N,), tensors or
numpy arrays, loaded with ``torch.load(weights_only=True)``) or ``.npz`` with the same keys.
2-D samples (N, T) are read as one channel. ``train`` and ``test`` are required, ``val`` is
optional. No axes are swapped: samples must be channels-first.

Every problem a user can fix raises one :class:`~data_pipeline.errors.DataError` naming the
file (and row/column) and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data_pipeline.config import SourceConfig, canonical_subject
from data_pipeline.errors import DataError

__all__ = [
    "RecordingRef",
    "Recording",
    "list_recordings",
    "read_recording",
    "read_window_files",
    "skip_short",
    "FORMAT_EXTENSIONS",
]

FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv",),
    "npz": (".npz",),
}
_META_KEYS = ("subject", "session", "sample_rate_hz")
_SPLIT_NAMES = ("train", "val", "test")
_READ_BLOCK = 1 << 24  # bytes hashed (and line-counted) at a time


@dataclass(frozen=True)
class RecordingRef:
    """A recording known without reading its samples."""

    name: str  # stable unique id: path relative to source.path without extension
    subject: str  # canonical subject id
    session: str  # "" if unknown
    file: str  # path relative to source.path, or "package:HAPT.pkl.gz#<name>"
    sha256: str  # of the source file's bytes (package: of the package file)
    num_samples: int  # rows


@dataclass
class Recording:
    """One recording's samples: ``data`` (S, C) float32 C-contiguous, ``labels`` (S,) int64."""

    ref: RecordingRef
    data: np.ndarray
    channels: list[str]
    labels: Optional[np.ndarray]
    sample_rate_hz: Optional[float]


# --------------------------------------------------------------------------------------------
# helpers


def _sha256_and_lines(path: Path, count_lines: bool) -> tuple[str, int]:
    """sha256 of the file and (optionally) its number of non-blank lines, in one pass."""
    h = hashlib.sha256()
    lines = 0
    prev_nl = -1  # absolute position of the previous '\n' (-1 = start of file)
    last_byte = b"\n"
    pos = 0
    prev_cr = False  # the byte before the current chunk was '\r'
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            h.update(block)
            if count_lines:
                buf = np.frombuffer(block, dtype=np.uint8)
                nl = np.flatnonzero(buf == 10) + pos
                if nl.size:
                    starts = np.concatenate([[prev_nl + 1], nl[:-1] + 1])
                    length = nl - starts  # bytes before each '\n'
                    # a line holding only '\r' is blank too
                    before = nl - 1
                    is_cr = np.zeros(nl.size, dtype=bool)
                    inside = before >= pos
                    is_cr[inside] = buf[before[inside] - pos] == 13
                    is_cr[~inside & (before >= 0)] = prev_cr
                    blank = (length == 0) | ((length == 1) & is_cr)
                    lines += int(nl.size - blank.sum())
                    prev_nl = int(nl[-1])
                prev_cr = block[-1:] == b"\r"
                last_byte = block[-1:]
            pos += len(block)
    if count_lines and pos and last_byte != b"\n":
        tail = pos - (prev_nl + 1)
        if not (tail == 1 and last_byte == b"\r"):
            lines += 1
    return h.hexdigest(), lines


def _format_of(path: Path, cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    suffix = path.suffix.lower()
    for fmt, exts in FORMAT_EXTENSIONS.items():
        if suffix in exts:
            return fmt
    raise AssertionError(path)  # list_recordings only yields known extensions in auto mode


def _root(cfg: SourceConfig) -> Path:
    if not cfg.path:
        raise DataError(f"source.kind={cfg.kind} needs source.path=DIR")
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(
            f"source.path={cfg.path!r} is not a directory; point it at the folder of recordings"
        )
    return root


def _matching_files(cfg: SourceConfig, root: Path) -> list[Path]:
    known = tuple(e for exts in FORMAT_EXTENSIONS.values() for e in exts)
    if cfg.format == "auto":
        wanted: Optional[tuple[str, ...]] = known
    elif cfg.glob == "*":
        wanted = FORMAT_EXTENSIONS[cfg.format]
    else:
        wanted = None
    files = []
    for p in root.glob(cfg.glob):
        if not p.is_file() or p.name.startswith("."):
            continue
        if wanted is not None and p.suffix.lower() not in wanted:
            continue
        files.append(p)
    return sorted(files)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _subject_from_name(stem: str, rel: str, cfg: SourceConfig) -> tuple[str, str]:
    m = re.search(cfg.filename_pattern, stem)
    if m is None or not m.group("subject"):
        raise DataError(
            f"{rel}: cannot derive the subject: name {stem!r} does not match "
            f"source.filename_pattern={cfg.filename_pattern!r}; rename the file, set "
            "source.filename_pattern to a regex with a (?P<subject>...) group, or store a "
            "'subject' in the file's metadata"
        )
    session = m.groupdict().get("session") or ""
    return canonical_subject(m.group("subject")), str(session)


def _identity(
    meta: dict[str, str], stem: str, rel: str, cfg: SourceConfig, fmt: str
) -> tuple[str, str]:
    """(subject, session) from metadata or the file name, per ``source.subject_from``."""
    if cfg.subject_from == "filename":
        return _subject_from_name(stem, rel, cfg)
    if meta.get("subject", "").strip():
        return canonical_subject(meta["subject"]), str(meta.get("session", "")).strip()
    if cfg.subject_from == "metadata":
        where = {
            "parquet": "Parquet schema metadata",
            "npz": "a 0-d 'subject' array",
            "csv": "metadata (CSV files carry none)",
        }[fmt]
        raise DataError(
            f"{rel}: cannot derive the subject: source.subject_from=metadata but the file has "
            f"no 'subject' in {where}; set source.subject_from=filename (or auto)"
        )
    return _subject_from_name(stem, rel, cfg)


def _parquet_file(path: Path, rel: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(
            f"{rel}: not a readable Parquet file ({e}); replace the file or exclude it with "
            "source.glob"
        ) from None


def _parquet_meta(pf: Any) -> dict[str, str]:
    raw = pf.schema_arrow.metadata or {}
    out = {}
    for k in _META_KEYS:
        v = raw.get(k.encode())
        if v is not None:
            out[k] = v.decode("utf-8", "replace")
    return out


def _npz_headers(path: Path, rel: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of an .npz from its member headers (no data read)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                out[info.filename[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(
            f"{rel}: not a readable .npz file ({e}); write it with numpy.savez or exclude it "
            "with source.glob"
        ) from None
    if not out:
        raise DataError(f"{rel}: the .npz file holds no arrays (empty file); delete it or fix it")
    return out


def _npz_load(path: Path, rel: str, names: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {n: z[n] for n in names}
    except ValueError as e:
        raise DataError(
            f"{rel}: cannot read arrays {names} ({e}); save plain numeric arrays "
            "(no Python objects) with numpy.savez"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{rel}: not a readable .npz file ({e}); replace it") from None


def _npz_meta(path: Path, rel: str, headers: dict) -> dict[str, str]:
    keys = [k for k in _META_KEYS if k in headers and headers[k][0] == ()]
    if not keys:
        return {}
    vals = _npz_load(path, rel, keys)
    out = {}
    for k, v in vals.items():
        item = v.item()
        out[k] = item.decode() if isinstance(item, bytes) else str(item)
    return out


def _numeric_dtype(dt: np.dtype) -> bool:
    return dt.kind in "iuf"


class _NpzLayout:
    """The channel/label arrays of one .npz recording (see module docstring)."""

    def __init__(self, path: Path, rel: str, cfg: SourceConfig):
        self.path, self.rel, self.cfg = path, rel, cfg
        self.headers = _npz_headers(path, rel)
        h = self.headers
        self.stacked = "data" in h and len(h["data"][0]) == 2
        label = cfg.label_column
        if label is not None and label not in h:
            raise DataError(
                f"{rel}: no label array {label!r} (arrays: {sorted(h)}); set "
                "source.label_column=null if the recordings are unlabelled, or name the label "
                "array in source.label_column"
            )
        if self.stacked:
            if "channels" not in h:
                raise DataError(
                    f"{rel}: array 'data' (S, C) needs a 'channels' array of C names; save it "
                    "with np.savez(..., data=X, channels=np.array(names))"
                )
        else:
            skip = set(_META_KEYS) | ({label} if label else set())
            self.candidates = [
                k for k, (shape, dt) in h.items()
                if k not in skip and len(shape) == 1 and _numeric_dtype(dt)
            ]

    def _check_lengths(self, names: list[str]) -> int:
        for n in names:
            shape = self.headers[n][0]
            if len(shape) != 1:
                raise DataError(
                    f"{self.rel}: array {n!r} has shape {shape}; channels and labels must be "
                    "1-D arrays of one value per sample"
                )
        lengths = {n: self.headers[n][0][0] for n in names}
        if len(set(lengths.values())) > 1:
            raise DataError(
                f"{self.rel}: ragged channels: arrays have different lengths {lengths}; every "
                "channel and the label array need one value per sample"
            )
        return next(iter(lengths.values())) if lengths else 0

    def channel_names(self) -> list[str]:
        if self.stacked:
            names = _npz_load(self.path, self.rel, ["channels"])["channels"]
            return [str(c) for c in names.tolist()]
        return list(self.candidates)

    def count(self) -> int:
        """Rows (and the raggedness check, which needs only headers)."""
        if self.stacked:
            n = self.headers["data"][0][0]
            lab = self.cfg.label_column
            if lab is not None and self.headers[lab][0] != (n,):
                raise DataError(
                    f"{self.rel}: ragged arrays: 'data' has {n} rows but {lab!r} has shape "
                    f"{self.headers[lab][0]}; the label array needs one value per row"
                )
            return n
        names = list(self.cfg.channels) if self.cfg.channels is not None else list(self.candidates)
        names = [n for n in names if n in self.headers]
        if self.cfg.label_column is not None:
            names.append(self.cfg.label_column)
        return self._check_lengths(names)


# --------------------------------------------------------------------------------------------
# listing


def list_recordings(cfg: SourceConfig) -> list[RecordingRef]:
    """Every recording of the source, sorted by name (see module docstring).

    Recordings shorter than ``source.min_length`` are *included*: the caller skips them
    (:func:`skip_short`) so that it can report them.
    """
    if cfg.kind == "hapt_package":
        from data_pipeline.hapt import list_hapt_recordings

        return list_hapt_recordings(cfg)
    if cfg.kind != "recordings":
        raise DataError(
            f"source.kind={cfg.kind} holds window files, not recordings; use read_window_files"
        )
    root = _root(cfg)
    files = _matching_files(cfg, root)
    if not files:
        fmt = (
            "a .parquet/.pq, .csv or .npz extension"
            if cfg.format == "auto"
            else f"source.format={cfg.format}"
        )
        raise DataError(
            f"no recordings found in source.path={cfg.path!r} matching "
            f"source.glob={cfg.glob!r} with {fmt}; fix source.path or source.glob"
        )
    refs = []
    for path in files:
        rel = _rel(path, root)
        name = Path(rel).with_suffix("").as_posix()
        fmt = _format_of(path, cfg)
        if path.stat().st_size == 0:
            raise DataError(
                f"{rel}: empty file (0 bytes); delete it or exclude it with source.glob"
            )
        sha, lines = _sha256_and_lines(path, count_lines=fmt == "csv")
        meta: dict[str, str] = {}
        if fmt == "parquet":
            pf = _parquet_file(path, rel)
            num = pf.metadata.num_rows
            meta = _parquet_meta(pf)
        elif fmt == "csv":
            if lines == 0:
                raise DataError(f"{rel}: empty file (no header row); delete it or fix it")
            num = lines - 1  # header; quoted multi-line cells would make this an over-count
        else:
            layout = _NpzLayout(path, rel, cfg)
            num = layout.count()
            meta = _npz_meta(path, rel, layout.headers)
        if num == 0:
            raise DataError(
                f"{rel}: empty file (no samples); delete it or exclude it with source.glob"
            )
        subject, session = _identity(meta, name, rel, cfg, fmt)
        refs.append(RecordingRef(name, subject, session, rel, sha, int(num)))
    names = [r.name for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(
            f"recordings {dup} exist in several formats in source.path={cfg.path!r}; keep one "
            "or narrow source.glob"
        )
    return sorted(refs, key=lambda r: r.name)


def skip_short(
    refs: list[RecordingRef], cfg: SourceConfig
) -> tuple[list[RecordingRef], list[RecordingRef]]:
    """``(kept, skipped)``: recordings with at least ``max(source.min_length, 1)`` samples."""
    n = max(cfg.min_length, 1)
    return [r for r in refs if r.num_samples >= n], [r for r in refs if r.num_samples < n]


# --------------------------------------------------------------------------------------------
# reading


def _unknown_channels(rel: str, missing: list[str], available: list[str]) -> DataError:
    return DataError(
        f"{rel}: unknown channel(s) {missing} in source.channels; available columns: "
        f"{available}"
    )


def _labels_from_values(
    values: np.ndarray, rel: str, column: str, valid: Optional[np.ndarray] = None
) -> np.ndarray:
    """int64 labels from an integer/float/object array; non-integers -> DataError with row."""
    hint = (
        f"labels must be integers (-1 = unlabelled); fix column {column!r} or set "
        "source.label_column=null if the recordings are unlabelled"
    )
    if valid is not None and not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        raise DataError(f"{rel}: row {row}, column {column!r}: missing label; {hint}")
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "b":
        raise DataError(f"{rel}: column {column!r} holds booleans; {hint}")
    if values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = values[row].item()
            raise DataError(f"{rel}: row {row}, column {column!r}: label {value!r}; {hint}")
        return values.astype(np.int64)
    # strings / objects
    row = 0
    for row, v in enumerate(values.tolist()):
        try:
            int(str(v).strip())
        except ValueError:
            break
    else:
        return np.array([int(str(v).strip()) for v in values.tolist()], dtype=np.int64)
    raise DataError(
        f"{rel}: row {row}, column {column!r}: label {values[row]!r} is not an integer; {hint}"
    )


def _first_non_numeric(values: list) -> int:
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            float(v)
        except (TypeError, ValueError):
            return i
    return 0


_Columns = tuple[dict, list, Optional[np.ndarray], dict]  # channels, order, labels, metadata


def _read_arrow_table(path: Path, rel: str, fmt: str, cfg: SourceConfig) -> _Columns:
    """Parquet/CSV -> ({channel: float32 array}, channel order, labels, metadata)."""
    import pyarrow as pa

    if fmt == "parquet":
        pf = _parquet_file(path, rel)
        schema = pf.schema_arrow
        meta = _parquet_meta(pf)
        columns = list(schema.names)
    else:
        import pyarrow.csv as pcsv

        try:
            table = pcsv.read_csv(path)
        except pa.ArrowInvalid as e:
            raise _csv_error(path, rel, e) from None
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{rel}: not a readable CSV file ({e}); fix or replace it") from None
        schema = table.schema
        meta = {}
        columns = list(schema.names)

    label = cfg.label_column
    if label is not None and label not in columns:
        raise DataError(
            f"{rel}: no label column {label!r} (columns: {columns}); set "
            "source.label_column=null if the recordings are unlabelled, or name the label "
            "column in source.label_column"
        )

    def numeric(t: Any) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)

    available = [c for c in columns if c != label]
    if cfg.channels is None:
        names = [c for c in available if numeric(schema.field(c).type)]
        if not names:
            raise DataError(
                f"{rel}: no numeric channel columns (columns: {columns}); list the channels in "
                "source.channels"
            )
    else:
        names = list(cfg.channels)
        missing = [c for c in names if c not in columns]
        if missing:
            raise _unknown_channels(rel, missing, available)
    wanted = names + ([label] if label is not None else [])
    if fmt == "parquet":
        try:
            table = pf.read(columns=wanted)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{rel}: not a readable Parquet file ({e}); replace it") from None
    if table.num_rows == 0:
        raise DataError(f"{rel}: empty file (no samples); delete it or exclude it with source.glob")

    chans = {}
    for c in names:
        col = table.column(c)
        if not numeric(col.type):
            values = col.to_pylist()
            row = _first_non_numeric(values)
            raise DataError(
                f"{rel}: channel column {c!r} has type {col.type}, not a number (row {row}: "
                f"{values[row]!r}); fix the data or leave the column out of source.channels"
            )
        if pa.types.is_null(col.type):
            chans[c] = np.full(table.num_rows, np.nan, dtype=np.float32)
        else:
            chans[c] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32)
    labels = None
    if label is not None:
        col = table.column(label)
        valid = None
        if col.null_count:
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            col = col.fill_null(0) if not pa.types.is_null(col.type) else col
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            values = col.to_numpy(zero_copy_only=False)
        else:
            values = np.asarray(col.to_pylist(), dtype=object)
        labels = _labels_from_values(values, rel, label, valid)
    return chans, names, labels, meta


def _csv_error(path: Path, rel: str, err: Exception) -> DataError:
    """A clear message for a CSV pyarrow could not parse (ragged rows, empty file)."""
    import csv

    msg = str(err)
    if "Empty CSV file" in msg:
        return DataError(f"{rel}: empty file; delete it or exclude it with source.glob")
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is not None:
                for row in reader:
                    if row and len(row) != len(header):
                        return DataError(
                            f"{rel}: ragged rows: line {reader.line_num} has {len(row)} fields "
                            f"but the header has {len(header)} ({header}); every row needs a "
                            "value for every column"
                        )
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return DataError(f"{rel}: not a readable CSV file ({msg}); fix or replace it")


def _read_npz(path: Path, rel: str, cfg: SourceConfig) -> _Columns:
    layout = _NpzLayout(path, rel, cfg)
    layout.count()
    available = layout.channel_names()
    h = layout.headers
    label = cfg.label_column
    if cfg.channels is None:
        names = available
        if not names:
            raise DataError(
                f"{rel}: no numeric 1-D channel arrays (arrays: {sorted(h)}); see the NPZ "
                "layouts in data_pipeline/sources.py"
            )
    else:
        names = list(cfg.channels)
        known = (
            available
            if layout.stacked
            else [k for k in h if k not in _META_KEYS and k != label]
        )
        missing = [c for c in names if c not in known]
        if missing:
            raise _unknown_channels(rel, missing, known)
        if not layout.stacked:
            layout._check_lengths(names + ([label] if label else []))
    if layout.stacked:
        if len(available) != h["data"][0][1]:
            raise DataError(
                f"{rel}: 'channels' names {len(available)} columns but 'data' has "
                f"{h['data'][0][1]}; make them agree"
            )
        arrays = _npz_load(path, rel, ["data"] + ([label] if label else []))
        data = arrays["data"]
        if not _numeric_dtype(data.dtype):
            raise DataError(
                f"{rel}: array 'data' has dtype {data.dtype}, not a number; save floats"
            )
        chans = {c: data[:, available.index(c)] for c in names}
    else:
        arrays = _npz_load(path, rel, names + ([label] if label else []))
        chans = {}
        for c in names:
            if not _numeric_dtype(arrays[c].dtype):
                raise DataError(
                    f"{rel}: channel array {c!r} has dtype {arrays[c].dtype}, not a number; "
                    "save it as floats or leave it out of source.channels"
                )
            chans[c] = arrays[c]
    chans = {c: np.asarray(v, dtype=np.float32) for c, v in chans.items()}
    if chans and next(iter(chans.values())).shape[0] == 0:
        raise DataError(f"{rel}: empty file (no samples); delete it or exclude it with source.glob")
    labels = _labels_from_values(arrays[label], rel, label) if label else None
    return chans, names, labels, _npz_meta(path, rel, h)


def read_recording(ref: RecordingRef, cfg: SourceConfig) -> Recording:
    """Read one recording listed by :func:`list_recordings` (see module docstring)."""
    if cfg.kind == "hapt_package":
        from data_pipeline.hapt import read_hapt_recording

        return read_hapt_recording(ref, cfg)
    root = _root(cfg)
    path = root / ref.file
    if not path.is_file():
        raise DataError(f"{ref.file}: recording vanished from source.path={cfg.path!r}; re-run")
    fmt = _format_of(path, cfg)
    if fmt == "npz":
        chans, names, labels, meta = _read_npz(path, ref.file, cfg)
    else:
        chans, names, labels, meta = _read_arrow_table(path, ref.file, fmt, cfg)
    num = next(iter(chans.values())).shape[0]
    data = np.empty((num, len(names)), dtype=np.float32)
    for j, c in enumerate(names):
        data[:, j] = chans[c]
    rate: Optional[float] = cfg.sample_rate_hz
    if rate is None and meta.get("sample_rate_hz"):
        try:
            rate = float(meta["sample_rate_hz"])
        except ValueError:
            raise DataError(
                f"{ref.file}: metadata sample_rate_hz={meta['sample_rate_hz']!r} is not a number; "
                "fix it or set source.sample_rate_hz"
            ) from None
    if num != ref.num_samples:  # CSV counts are line counts; the parsed table is the truth
        ref = dataclasses.replace(ref, num_samples=int(num))
    return Recording(ref, data, list(names), labels, rate)


# --------------------------------------------------------------------------------------------
# window files


def _torch_load(path: Path, rel: str) -> Any:
    import pickle

    import torch

    allowed = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(getattr(__import__(mod, fromlist=["_reconstruct"]), "_reconstruct"))
            break
        except (ImportError, AttributeError):
            continue
    for code in "?bBhHiIlLqQefdg":
        allowed.append(type(np.dtype(code)))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{rel}: cannot load it with torch.load(weights_only=True) ({first[:200]}); save a "
            "dict {'samples': tensor (N, C, T), 'labels': tensor (N,)} of plain tensors or "
            "numpy arrays, or convert it to .npz with the same keys"
        ) from None


def _as_numpy(v: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(v)


def _read_window_file(path: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        except (ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(
                f"{rel}: not a readable .npz of numeric arrays ({e}); save it with "
                "np.savez(path, samples=X, labels=y)"
            ) from None
    else:
        obj = _torch_load(path, rel)
    if not isinstance(obj, dict) or "samples" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{rel}: expected a dict with 'samples' (N, C, T) and 'labels' (N,), got {keys}"
        )
    x = _as_numpy(obj["samples"])
    y = _as_numpy(obj["labels"])
    if x.dtype.kind not in "iuf" and x.dtype != np.float16:
        raise DataError(f"{rel}: 'samples' has dtype {x.dtype}, not a number; save float tensors")
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise DataError(f"{rel}: 'samples' has shape {tuple(x.shape)}; expected (N, C, T)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{rel}: 'labels' has shape {tuple(y.shape)}; expected (N,)")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{rel}: 'samples' holds {x.shape[0]} windows but 'labels' {y.shape[0]}; they must "
            "have the same length N"
        )
    labels = _labels_from_values(y, rel, "labels")
    return np.ascontiguousarray(x, dtype=np.float32), labels


def read_window_files(cfg: SourceConfig) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """``{split: (samples (N, C, T) float32, labels (N,) int64, sha256)}`` (see module doc)."""
    root = _root(cfg)
    out = {}
    for split in _SPLIT_NAMES:
        found = [p for p in (root / f"{split}.pt", root / f"{split}.npz") if p.is_file()]
        if len(found) > 1:
            raise DataError(
                f"source.path={cfg.path!r} holds both {split}.pt and {split}.npz; keep one"
            )
        if not found:
            if split == "val":
                continue
            raise DataError(
                f"source.path={cfg.path!r} has no {split}.pt or {split}.npz; window files need "
                "train and test (val is optional)"
            )
        path = found[0]
        rel = _rel(path, root)
        if path.stat().st_size == 0:
            raise DataError(f"{rel}: empty file (0 bytes); replace it")
        sha, _ = _sha256_and_lines(path, count_lines=False)
        x, y = _read_window_file(path, rel)
        out[split] = (x, y, sha)
    shapes = {s: v[0].shape[1:] for s, v in out.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"window files disagree on (C, T): {shapes}; every split needs the same channels "
            "and window length"
        )
    return out
