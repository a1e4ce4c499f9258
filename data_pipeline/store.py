"""Window stores: a Zarr v3 group (sharding codec) or a directory of Arrow IPC files.

Layout (``STORE`` is a directory)::

    STORE/manifest.json                  canonical JSON, written LAST (no manifest = incomplete)
    STORE/data.zarr/<split>/windows      zarr: (N, C, T), inner chunks of K windows inside shard
                                         files of S windows, zstd (frame checksums on)
    STORE/data.zarr/<split>/{label,subject,recording,offset}   1-D, one chunk per shard
    STORE/arrow/<split>/shard-00000.arrow  arrow: IPC *file* format, uncompressed (zero-copy
                                         mmap), one file per S windows, record batches of K rows

Splits are always ``train``, ``val`` and ``test`` (possibly empty). Windows are stored as
float32, float16, or bfloat16 (kept as its uint16 bit pattern with the attribute / field
metadata ``logical_dtype: bfloat16``); readers always return float32. A *chunk* (K windows;
the last chunk of a shard may be shorter) is the unit readers and the loader read.

Writing (:class:`StoreWriter`) streams: each split buffers at most one shard, so memory stays
bounded whatever the input size. Shards are written whole (shard-aligned), so the bytes are a
pure function of the inputs: writing twice gives byte-identical files. Everything goes to a
temporary sibling ``.<name>.tmp-<pid>``; :meth:`StoreWriter.finalize` hashes every file,
writes ``manifest.json`` last, fsyncs, and renames the directory into place, so an
interrupted run never leaves anything at ``STORE`` that looks complete, and a re-run removes
the stale temporary directory and starts again.

Reading (:func:`open_store` -> :class:`Store`) checks each shard's files against the
manifest (present, expected size) the first time the shard is touched, and turns a missing,
truncated or undecodable shard into a :class:`~data_pipeline.errors.StoreError` naming the
file and the rows it should hold. :func:`verify_store` re-hashes every file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from data_pipeline.errors import StoreError

__all__ = [
    "SCHEMA_VERSION",
    "SPLIT_NAMES",
    "COLUMNS",
    "StoreWriter",
    "Store",
    "open_store",
    "read_manifest",
    "write_manifest",
    "verify_store",
    "float32_to_bfloat16",
    "bfloat16_to_float32",
]

SCHEMA_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
MANIFEST = "manifest.json"
ZARR_DIR = "data.zarr"
ARROW_DIR = "arrow"
#: 1-D per-window columns and their stored dtypes.
COLUMNS: dict[str, np.dtype] = {
    "label": np.dtype(np.int64),
    "subject": np.dtype(np.int32),
    "recording": np.dtype(np.int32),
    "offset": np.dtype(np.int64),
}
_STORAGE_DTYPE = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # the bit pattern; see float32_to_bfloat16
}
_FORMATS = ("zarr", "arrow")
_REPAIR = "re-run `timemae data prepare` to rebuild the store"


# --------------------------------------------------------------------------------------------
# dtype helpers


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16  # wraps only for NaN
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # quiet NaN, sign kept
    return out


def bfloat16_to_float32(u: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return float32_to_bfloat16(x)
    return np.asarray(x, dtype=_STORAGE_DTYPE[dtype])


def decode_windows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored windows (storage dtype) -> float32 (a new array unless already float32)."""
    if dtype == "bfloat16":
        return bfloat16_to_float32(raw)
    return np.asarray(raw, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# manifest I/O


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"manifest value of type {type(o).__name__} is not JSON serialisable")


def canonical_json(obj: Any) -> str:
    """Canonical manifest text: sorted keys, indent 1, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=1, default=_json_default, allow_nan=False) + "\n"


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path: str | Path, manifest: dict) -> None:
    """Write ``STORE/manifest.json`` canonically and durably (temp file, fsync, rename)."""
    root = Path(path)
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(canonical_json(manifest))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    _fsync_path(root)


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store at ``path``; :class:`StoreError` with the fix if it cannot be used."""
    root = Path(path)
    if not root.exists():
        raise StoreError(
            f"store {str(root)!r} does not exist; create it with "
            f"`timemae data prepare CONFIG output.path={root}` or pass the right path"
        )
    if not root.is_dir():
        raise StoreError(f"store {str(root)!r} is a file, not a store directory; pass the store directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise StoreError(
            f"store {str(root)!r} has no {MANIFEST}: it is incomplete (an interrupted or failed "
            f"prepare?); re-run `timemae data prepare` to rebuild it"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"manifest {str(mpath)!r} cannot be read ({e}); {_REPAIR}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        raise StoreError(
            f"manifest {str(mpath)!r} has no integer schema_version; it is not a timemae store manifest"
        )
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise StoreError(
            f"store {str(root)!r} has schema_version {manifest['schema_version']}, newer than this "
            f"timemae-dist understands ({SCHEMA_VERSION}); upgrade timemae-dist"
        )
    return manifest


def _sha256_file(p: Path, fsync: bool = False) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(p, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
            n += len(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest(), n


def _relpaths(root: Path) -> list[str]:
    """Every file under root (POSIX relative paths, sorted), manifest excluded."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


# --------------------------------------------------------------------------------------------
# writer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _zarr_shard_files(split: str, shard: int) -> list[str]:
    base = f"{ZARR_DIR}/{split}"
    return [f"{base}/windows/c/{shard}/0/0"] + [f"{base}/{col}/c/{shard}" for col in COLUMNS]


def _arrow_shard_file(split: str, shard: int) -> str:
    return f"{ARROW_DIR}/{split}/shard-{shard:05d}.arrow"


class StoreWriter:
    """Streams windows into a new store; :meth:`finalize` makes it appear atomically at ``path``.

    Memory is bounded by one shard buffer per split. Use as a context manager (an exception
    aborts) or call :meth:`abort` yourself.
    """

    def __init__(
        self,
        path: str | Path,
        fmt: Literal["zarr", "arrow"],
        channels: list[str],
        window: int,
        *,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        chunk_windows: int = 256,
        shard_windows: int = 4096,
        compression_level: int = 3,
    ):
        if fmt not in _FORMATS:
            raise ValueError(f"format {fmt!r}: choose 'zarr' or 'arrow'")
        if dtype not in _STORAGE_DTYPE:
            raise ValueError(f"dtype {dtype!r}: choose float32, float16 or bfloat16")
        if not channels:
            raise ValueError("channels: list at least one channel name")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if chunk_windows < 1:
            raise ValueError("chunk_windows must be >= 1")
        if shard_windows < chunk_windows or shard_windows % chunk_windows:
            raise ValueError(f"shard_windows must be a positive multiple of chunk_windows ({chunk_windows})")
        if not 1 <= compression_level <= 22:
            raise ValueError("compression_level: zstd levels are 1..22")
        self.path = Path(path).absolute()
        self.format = fmt
        self.channels = [str(c) for c in channels]
        self.window = int(window)
        self.dtype = dtype
        self.chunk_windows = int(chunk_windows)
        self.shard_windows = int(shard_windows)
        self.compression_level = int(compression_level)
        self._shape = (len(self.channels), self.window)
        self._store_dtype = _STORAGE_DTYPE[dtype]
        self._closed = False

        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale(parent, self.path.name)
        self.tmp = parent / f".{self.path.name}.tmp-{os.getpid()}"
        self.tmp.mkdir()

        C, T = self._shape
        S = self.shard_windows
        self._buf = {s: np.empty((S, C, T), self._store_dtype) for s in SPLIT_NAMES}
        self._cols = {s: {c: np.empty(S, dt) for c, dt in COLUMNS.items()} for s in SPLIT_NAMES}
        self._fill = dict.fromkeys(SPLIT_NAMES, 0)
        self._written = dict.fromkeys(SPLIT_NAMES, 0)
        self._shards: dict[str, list[dict]] = {s: [] for s in SPLIT_NAMES}
        self._zarr: dict[str, dict[str, Any]] = {}
        try:
            if fmt == "zarr":
                self._init_zarr()
            else:
                for s in SPLIT_NAMES:
                    (self.tmp / ARROW_DIR / s).mkdir(parents=True)
        except BaseException:
            self.abort()
            raise

    # -- setup ---------------------------------------------------------------------------------

    @staticmethod
    def _remove_stale(parent: Path, name: str) -> None:
        """Remove temp/old dirs of interrupted runs (their process is gone, or it is us)."""
        pat = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)$")
        for p in parent.iterdir():
            m = pat.match(p.name)
            if m and p.is_dir():
                pid = int(m.group(2))
                if pid == os.getpid() or not _pid_alive(pid):
                    shutil.rmtree(p, ignore_errors=True)

    def _init_zarr(self) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        C, T = self._shape
        K, S = self.chunk_windows, self.shard_windows
        root = zarr.open_group(zarr.storage.LocalStore(self.tmp / ZARR_DIR), mode="w", zarr_format=3)
        zstd = ZstdCodec(level=self.compression_level, checksum=True)
        cfg = {"write_empty_chunks": True}  # every shard file exists, even if all zeros
        for split in SPLIT_NAMES:
            g = root.create_group(split)
            arrays = {
                "windows": g.create_array(
                    "windows",
                    shape=(0, C, T),
                    dtype=self._store_dtype,
                    chunks=(K, C, T),
                    shards=(S, C, T),
                    compressors=zstd,
                    fill_value=0,
                    config=cfg,
                    attributes={"logical_dtype": self.dtype} if self.dtype == "bfloat16" else {},
                )
            }
            for col, dt in COLUMNS.items():
                arrays[col] = g.create_array(
                    col, shape=(0,), dtype=dt, chunks=(S,), compressors=zstd, fill_value=0, config=cfg
                )
            self._zarr[split] = arrays

    # -- writing -------------------------------------------------------------------------------

    def append(self, split: str, windows: np.ndarray, label, subject, recording, offset) -> None:
        """Add ``N`` windows ``(N, C, T)`` and their per-window columns to ``split``."""
        if self._closed:
            raise RuntimeError("StoreWriter is finalized or aborted")
        if split not in SPLIT_NAMES:
            raise ValueError(f"split {split!r}: choose one of {', '.join(SPLIT_NAMES)}")
        x = np.asarray(windows)
        if x.ndim != 3 or x.shape[1:] != self._shape:
            raise ValueError(
                f"windows must have shape (N, {self._shape[0]}, {self._shape[1]}) "
                f"(channels, window), got {x.shape}"
            )
        n = x.shape[0]
        cols = {}
        for name, value in zip(COLUMNS, (label, subject, recording, offset)):
            a = np.broadcast_to(np.asarray(value), (n,)) if np.ndim(value) == 0 else np.asarray(value)
            if a.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) like windows, got {a.shape}")
            cols[name] = a
        S = self.shard_windows
        i = 0
        while i < n:
            fill = self._fill[split]
            take = min(S - fill, n - i)
            self._buf[split][fill : fill + take] = _encode(x[i : i + take], self.dtype)
            for name, a in cols.items():
                self._cols[split][name][fill : fill + take] = a[i : i + take]
            self._fill[split] = fill + take
            i += take
            if self._fill[split] == S:
                self._flush(split)

    @property
    def num_shards_written(self) -> int:
        """Shard files completed so far, over all splits (for progress reporting)."""
        return sum(len(v) for v in self._shards.values())

    def _flush(self, split: str) -> None:
        rows = self._fill[split]
        if rows == 0:
            return
        index = len(self._shards[split])
        start = self._written[split]
        x = self._buf[split][:rows]
        cols = {c: v[:rows] for c, v in self._cols[split].items()}
        if self.format == "zarr":
            C, T = self._shape
            arrays = self._zarr[split]
            arrays["windows"].resize((start + rows, C, T))
            arrays["windows"][start : start + rows] = x
            for c, v in cols.items():
                arrays[c].resize((start + rows,))
                arrays[c][start : start + rows] = v
            files = _zarr_shard_files(split, index)
        else:
            self._write_arrow(self.tmp / _arrow_shard_file(split, index), x, cols)
            files = [_arrow_shard_file(split, index)]
        self._shards[split].append({"index": index, "rows": rows, "files": files})
        self._written[split] = start + rows
        self._fill[split] = 0

    def _arrow_schema(self):
        import pyarrow as pa

        value_type = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}[self.dtype]
        meta = {b"logical_dtype": self.dtype.encode()}
        tensor = pa.fixed_shape_tensor(value_type, list(self._shape))
        fields = [pa.field("windows", tensor, nullable=False, metadata=meta)]
        fields += [pa.field(c, pa.from_numpy_dtype(dt), nullable=False) for c, dt in COLUMNS.items()]
        return pa.schema(fields)

    def _write_arrow(self, path: Path, x: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        schema = self._arrow_schema()
        ttype = schema.field("windows").type
        C, T = self._shape
        K = self.chunk_windows
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for s in range(0, x.shape[0], K):
                e = min(s + K, x.shape[0])
                flat = pa.array(np.ascontiguousarray(x[s:e]).reshape(-1))
                storage = pa.FixedSizeListArray.from_arrays(flat, C * T)
                arrays = [pa.ExtensionArray.from_storage(ttype, storage)]
                arrays += [pa.array(np.ascontiguousarray(cols[c][s:e])) for c in COLUMNS]
                w.write_batch(pa.record_batch(arrays, schema=schema))

    # -- finishing -----------------------------------------------------------------------------

    def finalize(self, manifest: dict) -> dict:
        """Flush, hash, write ``manifest.json`` (last), fsync and rename into place; the final manifest."""
        if self._closed:
            raise RuntimeError("StoreWriter is finalized or aborted")
        try:
            for split in SPLIT_NAMES:
                self._flush(split)
            self._zarr = {}
            files: dict[str, dict] = {}
            for rel in _relpaths(self.tmp):
                sha, n = _sha256_file(self.tmp / rel, fsync=True)
                files[rel] = {"sha256": sha, "bytes": n}
            out = self._manifest(manifest, files)
            for dirpath, _d, _f in os.walk(self.tmp, topdown=False):
                _fsync_path(Path(dirpath))
            write_manifest(self.tmp, out)
            self._swap_in()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return out

    def _manifest(self, given: dict, files: dict[str, dict]) -> dict:
        out = copy.deepcopy(dict(given))
        given_channels = out.get("channels")
        if given_channels is not None:
            names = [c["name"] if isinstance(c, dict) else str(c) for c in given_channels]
            if names != self.channels:
                raise ValueError(
                    f"manifest channels {names} differ from the writer's channels {self.channels}"
                )
        else:
            out["channels"] = list(self.channels)
        out.update(
            schema_version=SCHEMA_VERSION,
            format=self.format,
            dtype=self.dtype,
            chunk_windows=self.chunk_windows,
            shard_windows=self.shard_windows,
            window=self.window,
            files=files,
        )
        if self.format == "zarr":
            out["compression"] = {"codec": "zstd", "level": self.compression_level}
        splits = dict(out.get("splits") or {})
        for split in SPLIT_NAMES:
            entry = dict(splits.get(split) or {})
            entry["num_windows"] = self._written[split]
            entry["shards"] = [
                {
                    "index": sh["index"],
                    "rows": sh["rows"],
                    "files": {rel: files[rel]["sha256"] for rel in sh["files"]},
                }
                for sh in self._shards[split]
            ]
            splits[split] = entry
        out["splits"] = splits
        return out

    def _swap_in(self) -> None:
        target = self.path
        old = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(self.tmp, target)
        _fsync_path(target.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()

    def abort(self) -> None:
        """Drop everything written so far (removes the temporary directory)."""
        self._closed = True
        self._zarr = {}
        if getattr(self, "tmp", None) is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            # an exception, or the block ended without finalize(): nothing complete to keep
            self.abort()


# --------------------------------------------------------------------------------------------
# reader


class Store:
    """A finished store opened for reading (see the module docstring for the layout)."""

    def __init__(self, path: str | Path, manifest: dict | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path) if manifest is None else manifest
        m = self.manifest
        try:
            self.format: str = m["format"]
            self.dtype: str = m["dtype"]
            self.window: int = int(m["window"])
            self.chunk_windows: int = int(m["chunk_windows"])
            self.shard_windows: int = int(m["shard_windows"])
            self.channels: list[str] = [c["name"] if isinstance(c, dict) else str(c) for c in m["channels"]]
            splits = m["splits"]
            self._files: dict[str, dict] = m["files"]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(
                f"manifest of store {str(self.path)!r} lacks or garbles {e}; {_REPAIR}"
            ) from None
        if self.format not in _FORMATS or self.dtype not in _STORAGE_DTYPE:
            raise StoreError(
                f"manifest of store {str(self.path)!r}: unknown format {self.format!r} "
                f"or dtype {self.dtype!r}"
            )
        known = [s for s in SPLIT_NAMES if s in splits]
        self.splits: list[str] = known + sorted(s for s in splits if s not in SPLIT_NAMES)
        self._tables: dict[str, dict[str, np.ndarray]] = {}
        self._checked: set[tuple[str, int]] = set()
        self._handles: dict[Any, Any] = {}
        #: Zarr: decode shard chunks directly (pread + zstd) when the array has exactly the layout
        #: StoreWriter writes; False forces zarr's own reader (same bytes, slower per call).
        self.zarr_direct = True

    # pickling (DataLoader workers with spawn): drop open handles, they are reopened lazily
    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_handles"] = {}
        d["_checked"] = set()
        return d

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_windows(s)}" for s in self.splits)
        return f"Store({str(self.path)!r}, format={self.format}, dtype={self.dtype}, {counts})"

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise StoreError(
                f"store {str(self.path)!r} has no split {split!r}; it has {', '.join(self.splits)}"
            ) from None

    def num_windows(self, split: str) -> int:
        return int(self._split(split)["num_windows"])

    def _table(self, split: str) -> dict[str, np.ndarray]:
        """Chunk table of a split: bounds (num_chunks, 2), shard, chunk-within-shard; shard starts."""
        t = self._tables.get(split)
        if t is not None:
            return t
        entry = self._split(split)
        K = self.chunk_windows
        bounds, shard, local, shard_start = [], [], [], []
        start = 0
        for s, sh in enumerate(entry.get("shards", [])):
            rows = int(sh["rows"])
            shard_start.append(start)
            for j, a in enumerate(range(0, rows, K)):
                bounds.append((start + a, start + min(a + K, rows)))
                shard.append(s)
                local.append(j)
            start += rows
        if start != int(entry["num_windows"]):
            raise StoreError(
                f"store {str(self.path)!r}: split {split!r} shards hold {start} rows but the manifest "
                f"says {entry['num_windows']}; {_REPAIR}"
            )
        t = {
            "bounds": np.asarray(bounds, dtype=np.int64).reshape(-1, 2),
            "shard": np.asarray(shard, dtype=np.int64),
            "local": np.asarray(local, dtype=np.int64),
            "shard_start": np.asarray(shard_start + [start], dtype=np.int64),
        }
        self._tables[split] = t
        return t

    def chunk_bounds(self, split: str) -> np.ndarray:
        """``(num_chunks, 2)`` global ``[start, stop)`` window indices of each chunk, in storage order."""
        return self._table(split)["bounds"].copy()

    def num_chunks(self, split: str) -> int:
        return int(self._table(split)["bounds"].shape[0])

    # -- integrity -----------------------------------------------------------------------------

    def _check_shard(self, split: str, s: int) -> None:
        """Every file of shard ``s`` exists with the manifest's size (checked once per shard)."""
        if (split, s) in self._checked:
            return
        sh = self._split(split)["shards"][s]
        for rel in sh["files"]:
            p = self.path / rel
            where = (
                f"shard {s} of split {split!r} (expected {sh['rows']} rows) in store {str(self.path)!r}"
            )
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise StoreError(
                    f"file {rel} of {where} is missing; {_REPAIR} (`timemae data verify` lists every problem)"
                ) from None
            want = self._files.get(rel, {}).get("bytes")
            if want is not None and size != want:
                raise StoreError(
                    f"file {rel} of {where} is truncated or altered: {size} bytes, expected {want}; {_REPAIR}"
                )
        self._checked.add((split, s))

    def _damaged(self, split: str, s: int, err: BaseException) -> StoreError:
        sh = self._split(split)["shards"][s]
        files = ", ".join(sh["files"])
        return StoreError(
            f"shard {s} of split {split!r} in store {str(self.path)!r} ({files}; expected {sh['rows']} rows) "
            f"cannot be decoded ({type(err).__name__}: {err}); {_REPAIR}"
        )

    # -- zarr ----------------------------------------------------------------------------------

    def _zarr_array(self, split: str, name: str):
        key = ("zarr", split, name)
        a = self._handles.get(key)
        if a is None:
            import zarr

            root = self._handles.get("zarr-root")
            if root is None:
                root = zarr.storage.LocalStore(self.path / ZARR_DIR, read_only=True)
                self._handles["zarr-root"] = root
            try:
                a = zarr.open_array(root, path=f"{split}/{name}", mode="r", zarr_format=3)
            except Exception as e:  # noqa: BLE001 - any failure here is a damaged store
                raise StoreError(
                    f"array {ZARR_DIR}/{split}/{name} of store {str(self.path)!r} cannot be opened "
                    f"({type(e).__name__}: {e}); {_REPAIR}"
                ) from None
            if a.shape[0] != self.num_windows(split):
                raise StoreError(
                    f"array {ZARR_DIR}/{split}/{name} holds {a.shape[0]} rows, the manifest says "
                    f"{self.num_windows(split)}; {_REPAIR}"
                )
            self._handles[key] = a
        return a

    # Direct shard reads. zarr's reader costs two thread hand-offs (event loop + codec pool) per
    # call, which dominates for ~1 MB chunks on busy CPUs. Our shard files follow the zarr v3
    # sharding spec with a fixed codec chain, so a chunk is: read the shard index (cached;
    # crc32c-checked), pread the chunk's bytes, zstd-decode (frame checksum verified). Used
    # only when zarr.json matches that chain exactly; tests check parity with zarr's reader.

    def _direct_layout(self, split: str) -> dict | None:
        key = ("direct-layout", split)
        if key in self._handles:
            return self._handles[key]
        layout = None
        try:
            meta = json.loads((self.path / ZARR_DIR / split / "windows" / "zarr.json").read_text())
            C, T = self.num_channels, self.window
            (shard_codec,) = meta["codecs"]
            conf = shard_codec["configuration"]
            expected = (
                shard_codec["name"] == "sharding_indexed"
                and conf["chunk_shape"] == [self.chunk_windows, C, T]
                and meta["chunk_grid"]["configuration"]["chunk_shape"] == [self.shard_windows, C, T]
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and [c["name"] for c in conf["codecs"]] == ["bytes", "zstd"]
                and conf["codecs"][0].get("configuration", {}).get("endian") == "little"
                and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
                and conf["index_codecs"][0].get("configuration", {}).get("endian") == "little"
                and conf.get("index_location", "end") == "end"
                and meta["data_type"] == _STORAGE_DTYPE[self.dtype].name
            )
            if expected:
                layout = {"dtype": _STORAGE_DTYPE[self.dtype].newbyteorder("<"), "fill": meta["fill_value"]}
        except (OSError, ValueError, KeyError, TypeError):
            layout = None  # let zarr's reader report whatever is wrong
        self._handles[key] = layout
        return layout

    def _direct_chunk(self, split: str, s: int, local: int, rows: int) -> np.ndarray:
        import google_crc32c
        from numcodecs.zstd import Zstd

        rel = _zarr_shard_files(split, s)[0]
        C, T = self.num_channels, self.window
        n_inner = self.shard_windows // self.chunk_windows
        fd = os.open(self.path / rel, os.O_RDONLY)
        try:
            key = ("direct-index", split, s)
            index = self._handles.get(key)
            if index is None:
                size = os.fstat(fd).st_size
                nbytes = 16 * n_inner + 4
                raw = os.pread(fd, nbytes, size - nbytes) if size >= nbytes else b""
                if len(raw) != nbytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise ValueError(f"shard index of {rel} fails its crc32c check")
                index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
                self._handles[key] = index
            offset, length = (int(v) for v in index[local])
            layout = self._direct_layout(split)
            if offset == 2**64 - 1:  # an empty chunk (never written by StoreWriter): fill value
                return np.full((rows, C, T), layout["fill"], layout["dtype"])
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise ValueError(f"{rel}: chunk {local} is cut short")
        out = np.frombuffer(Zstd().decode(data), dtype=layout["dtype"])
        return out.reshape(self.chunk_windows, C, T)[:rows]

    # -- arrow ---------------------------------------------------------------------------------

    def _arrow_reader(self, split: str, s: int):
        key = ("arrow", split, s)
        r = self._handles.get(key)
        if r is None:
            import pyarrow as pa

            rel = _arrow_shard_file(split, s)
            rows = int(self._split(split)["shards"][s]["rows"])
            try:
                r = pa.ipc.open_file(pa.memory_map(str(self.path / rel), "r"))
                n = sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))
            except (OSError, pa.ArrowException) as e:
                raise self._damaged(split, s, e) from None
            if n != rows or r.num_record_batches != -(-rows // self.chunk_windows):
                raise StoreError(
                    f"file {rel} (shard {s} of split {split!r}) holds {n} rows, expected {rows}; {_REPAIR}"
                )
            self._handles[key] = r
        return r

    def _arrow_windows(self, batch) -> np.ndarray:
        col = batch.column(0)
        storage = col.storage
        C, T = self.num_channels, self.window
        values = storage.values.to_numpy(zero_copy_only=True)
        off = storage.offset * C * T
        return values[off : off + len(storage) * C * T].reshape(len(storage), C, T)

    # -- public reads --------------------------------------------------------------------------

    def read_chunk_raw(self, split: str, i: int) -> np.ndarray:
        """Windows of chunk ``i`` in the storage dtype (uint16 bits for bfloat16); may be a read-only view."""
        t = self._table(split)
        s = int(t["shard"][i])
        self._check_shard(split, s)
        if self.format == "zarr":
            a, b = (int(v) for v in t["bounds"][i])
            try:
                if self.zarr_direct and self._direct_layout(split) is not None:
                    return self._direct_chunk(split, s, int(t["local"][i]), b - a)
                return self._zarr_array(split, "windows")[a:b]
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - decode errors of a damaged shard
                raise self._damaged(split, s, e) from None
        r = self._arrow_reader(split, s)
        return self._arrow_windows(r.get_batch(int(t["local"][i])))

    def read_chunk(self, split: str, i: int, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Chunk ``i`` of ``split``: ``windows`` (float32) and the 1-D columns (or only ``columns``)."""
        t = self._table(split)
        if not 0 <= i < t["bounds"].shape[0]:
            raise IndexError(f"chunk {i} out of range: split {split!r} has {t['bounds'].shape[0]} chunks")
        names = list(columns) if columns is not None else ["windows", *COLUMNS]
        out: dict[str, np.ndarray] = {}
        if "windows" in names:
            out["windows"] = decode_windows(self.read_chunk_raw(split, i), self.dtype)
        cols = [c for c in names if c != "windows"]
        if cols:
            s = int(t["shard"][i])
            self._check_shard(split, s)
            a, b = (int(v) for v in t["bounds"][i])
            if self.format == "zarr":
                for c in cols:
                    try:
                        out[c] = self._zarr_array(split, self._col(c))[a:b]
                    except StoreError:
                        raise
                    except Exception as e:  # noqa: BLE001
                        raise self._damaged(split, s, e) from None
            else:
                batch = self._arrow_reader(split, s).get_batch(int(t["local"][i]))
                for c in cols:
                    out[c] = batch.column(self._col(c)).to_numpy()
        return out

    @staticmethod
    def _col(name: str) -> str:
        if name not in COLUMNS:
            raise KeyError(f"unknown column {name!r}; columns are windows, {', '.join(COLUMNS)}")
        return name

    def read_column(self, split: str, name: str) -> np.ndarray:
        """A whole 1-D column (label, subject, recording or offset) of ``split``."""
        self._col(name)
        shards = self._split(split).get("shards", [])
        for s in range(len(shards)):
            self._check_shard(split, s)
        if not shards:
            return np.zeros(0, COLUMNS[name])
        if self.format == "zarr":
            try:
                return np.asarray(self._zarr_array(split, name)[:], dtype=COLUMNS[name])
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001
                raise self._damaged(split, 0, e) from None
        parts = []
        for s in range(len(shards)):
            r = self._arrow_reader(split, s)
            parts += [r.get_batch(i).column(name).to_numpy() for i in range(r.num_record_batches)]
        return np.concatenate(parts).astype(COLUMNS[name], copy=False)

    def read_all(self, split: str) -> dict[str, np.ndarray]:
        """Every window and column of ``split`` (for evaluation on small splits)."""
        n = self.num_windows(split)
        C, T = self.num_channels, self.window
        x = np.empty((n, C, T), np.float32)
        for i, (a, b) in enumerate(self._table(split)["bounds"]):
            x[a:b] = decode_windows(self.read_chunk_raw(split, i), self.dtype)
        out = {"windows": x}
        for c in COLUMNS:
            out[c] = self.read_column(split, c)
        return out

    def normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel train mean/std (float32) from the manifest; StoreError if absent."""
        norm = self.manifest.get("normalization")
        try:
            mean = np.asarray(norm["mean"], dtype=np.float32)
            std = np.asarray(norm["std"], dtype=np.float32)
        except (TypeError, KeyError, ValueError):
            raise StoreError(
                f"store {str(self.path)!r} has no normalisation statistics (manifest 'normalization' "
                "with 'mean' and 'std'); rebuild it with `timemae data prepare` or use normalize=False"
            ) from None
        if mean.shape != (self.num_channels,) or std.shape != (self.num_channels,):
            raise StoreError(
                f"store {str(self.path)!r}: normalisation stats have shapes {mean.shape}/{std.shape}, "
                f"expected ({self.num_channels},) per channel; {_REPAIR}"
            )
        return mean, std


def open_store(path: str | Path) -> Store:
    """Open the store at ``path`` for reading (StoreError with the fix if it is missing/incomplete)."""
    return Store(path)


# --------------------------------------------------------------------------------------------
# verify


def verify_store(path: str | Path) -> list[str]:
    """Every problem found in the store at ``path`` (checksums, missing files, row counts); [] = intact."""
    root = Path(path)
    try:
        manifest = read_manifest(root)
        store = Store(root, manifest)
    except StoreError as e:
        return [str(e)]
    problems: list[str] = []
    owner: dict[str, str] = {}
    for split in store.splits:
        entry = manifest["splits"][split]
        shards = entry.get("shards", [])
        total = 0
        for sh in shards:
            total += int(sh["rows"])
            for rel in sh["files"]:
                owner[rel] = f"shard {sh['index']} of split {split!r} ({sh['rows']} rows)"
            if sh is not shards[-1] and int(sh["rows"]) != store.shard_windows:
                problems.append(
                    f"shard {sh['index']} of split {split!r} has {sh['rows']} rows; every shard but "
                    f"the last must hold shard_windows={store.shard_windows}"
                )
        if total != int(entry.get("num_windows", -1)):
            problems.append(
                f"split {split!r}: shards hold {total} rows but num_windows is {entry.get('num_windows')}"
            )
    for rel, info in sorted(manifest.get("files", {}).items()):
        what = f"file {rel}" + (f" ({owner[rel]})" if rel in owner else "")
        p = root / rel
        if not p.is_file():
            problems.append(f"{what} is missing")
            continue
        sha, n = _sha256_file(p)
        if n != info.get("bytes"):
            problems.append(f"{what} has {n} bytes, expected {info.get('bytes')}")
        if sha != info.get("sha256"):
            want = str(info.get("sha256"))
            problems.append(f"{what}: sha256 mismatch (got {sha[:12]}..., expected {want[:12]}...)")
    for rel in owner:
        if rel not in manifest.get("files", {}):
            problems.append(f"file {rel} ({owner[rel]}) is listed in a shard but not in the manifest's files")
    if problems:
        return problems
    # checksums match: cross-check row counts the data itself reports
    for split in store.splits:
        try:
            if store.format == "zarr":
                for name in ("windows", *COLUMNS):
                    store._zarr_array(split, name)  # raises on a shape mismatch
            else:
                for s in range(len(manifest["splits"][split].get("shards", []))):
                    store._arrow_reader(split, s)  # raises on a row-count mismatch
        except StoreError as e:
            problems.append(str(e))
    return problems
