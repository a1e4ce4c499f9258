"""Stores: round trips, determinism, atomicity, integrity errors, verify (real files, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import StoreError
from data_pipeline.store import (
    SCHEMA_VERSION,
    StoreWriter,
    bfloat16_to_float32,
    float32_to_bfloat16,
    open_store,
    read_manifest,
    verify_store,
)
from tests.data_pipeline.conftest import CHANNELS, WINDOW, synthetic_windows, write_synthetic_store

REPO = Path(__file__).resolve().parents[2]
FORMATS = ("zarr", "arrow")


def _shard_file(manifest: dict, split: str, shard: int, fmt: str) -> str:
    files = list(manifest["splits"][split]["shards"][shard]["files"])
    return files[0]  # zarr: the windows shard file comes first; arrow: the one file


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_and_layout(synthetic_stores, fmt):
    store = open_store(synthetic_stores[fmt])
    data = synthetic_stores["data"]
    assert store.format == fmt and store.channels == CHANNELS and store.window == WINDOW
    assert store.splits == ["train", "val", "test"]
    assert [store.num_windows(s) for s in store.splits] == [1000, 70, 0]
    bounds = store.chunk_bounds("train")
    # shards of 128 = 4 chunks of 32; the last shard holds 1000 - 7*128 = 104 rows -> 32,32,32,8
    assert bounds.shape == (32, 2)
    assert bounds[0].tolist() == [0, 32] and bounds[-1].tolist() == [992, 1000]
    assert (bounds[1:, 0] == bounds[:-1, 1]).all()
    for split in ("train", "val"):
        got = store.read_all(split)
        for k, v in data[split].items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype
    chunk = store.read_chunk("train", 5)
    np.testing.assert_array_equal(chunk["windows"], data["train"]["windows"][160:192])
    np.testing.assert_array_equal(chunk["label"], data["train"]["label"][160:192])
    only = store.read_chunk("train", 31, columns=["windows"])
    assert list(only) == ["windows"] and only["windows"].shape == (8, 3, 16)
    np.testing.assert_array_equal(store.read_column("train", "offset"), data["train"]["offset"])
    empty = store.read_all("test")
    assert empty["windows"].shape == (0, 3, 16) and empty["label"].shape == (0,)
    assert store.chunk_bounds("test").shape == (0, 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_contents_and_canonical_json(synthetic_stores, fmt):
    path = synthetic_stores[fmt]
    text = (path / "manifest.json").read_text()
    m = json.loads(text)
    assert text == json.dumps(m, sort_keys=True, indent=1) + "\n"
    assert m["schema_version"] == SCHEMA_VERSION and m["format"] == fmt and m["dtype"] == "float32"
    assert (m["chunk_windows"], m["shard_windows"], m["window"]) == (32, 128, WINDOW)
    assert m["channels"] == CHANNELS and m["name"] == "synthetic"
    train = m["splits"]["train"]
    assert train["class_counts"] == {"0": 1}  # caller's keys survive the merge
    assert train["num_windows"] == 1000
    assert [s["rows"] for s in train["shards"]] == [128] * 7 + [104]
    assert [s["index"] for s in train["shards"]] == list(range(8))
    assert m["splits"]["test"] == {"class_counts": {"0": 1}, "num_windows": 0, "shards": []}
    on_disk = sorted(
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(m["files"]) == on_disk
    for shard in train["shards"]:
        for rel, sha in shard["files"].items():
            assert m["files"][rel]["sha256"] == sha
            assert m["files"][rel]["bytes"] == (path / rel).stat().st_size
    if fmt == "zarr":
        assert len(train["shards"][0]["files"]) == 5  # windows + 4 columns
        meta = json.loads((path / "data.zarr/train/windows/zarr.json").read_text())
        assert meta["shape"] == [1000, 3, 16]
        assert meta["codecs"][0]["name"] == "sharding_indexed"
        assert meta["codecs"][0]["configuration"]["chunk_shape"] == [32, 3, 16]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [128, 3, 16]
    else:
        import pyarrow as pa

        r = pa.ipc.open_file(pa.memory_map(str(path / "arrow/train/shard-00000.arrow")))
        assert r.num_record_batches == 4 and r.get_batch(0).num_rows == 32
        assert r.schema.field("windows").type == pa.fixed_shape_tensor(pa.float32(), [3, 16])


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic_bytes(tmp_path, fmt):
    m1, _ = write_synthetic_store(tmp_path / "a", fmt, {"train": 300, "val": 20, "test": 5}, append_size=37)
    m2, _ = write_synthetic_store(tmp_path / "b", fmt, {"train": 300, "val": 20, "test": 5}, append_size=101)
    assert m1["files"] == m2["files"]  # same relpaths, sha256 and sizes, whatever the append sizes
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_round_trip(tmp_path, fmt, dtype):
    m, data = write_synthetic_store(tmp_path / "s", fmt, {"train": 150, "val": 0, "test": 0}, dtype=dtype)
    assert m["dtype"] == dtype
    store = open_store(tmp_path / "s")
    got = store.read_all("train")["windows"]
    want = data["train"]["windows"]
    assert got.dtype == np.float32
    # round to nearest: relative error <= 2^-(mantissa bits + 1); values here are well inside range
    rel = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    np.testing.assert_allclose(got, want, rtol=rel, atol=1e-7 if dtype == "float16" else 0)
    assert np.abs(got - want).max() > 0  # really stored at lower precision
    if dtype == "bfloat16":
        if fmt == "zarr":
            meta = json.loads((tmp_path / "s/data.zarr/train/windows/zarr.json").read_text())
            assert meta["data_type"] == "uint16" and meta["attributes"]["logical_dtype"] == "bfloat16"
        else:
            import pyarrow as pa

            r = pa.ipc.open_file(pa.memory_map(str(tmp_path / "s/arrow/train/shard-00000.arrow")))
            field = r.schema.field("windows")
            assert field.type.value_type == pa.uint16()
            assert field.metadata[b"logical_dtype"] == b"bfloat16"


def test_bfloat16_conversion_matches_torch():
    import torch

    x = np.concatenate([
        np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100,
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40], np.float32),
    ])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16(x), want)
    back = bfloat16_to_float32(float32_to_bfloat16(x))
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    nan = bfloat16_to_float32(float32_to_bfloat16(np.array([np.nan], np.float32)))
    assert np.isnan(nan).all()


# -------------------------------------------------------------------------------------------
# atomicity


def _tmp_dirs(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exception_inside_writer_leaves_nothing(tmp_path, fmt):
    target = tmp_path / "store"
    d = synthetic_windows(300)
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(target, fmt, CHANNELS, WINDOW, chunk_windows=32, shard_windows=128) as w:
            w.append("train", d["windows"], d["label"], d["subject"], d["recording"], d["offset"])
            raise RuntimeError("boom")
    assert not target.exists()
    assert _tmp_dirs(tmp_path, "store") == []


def test_killed_prepare_is_incomplete_and_rerun_succeeds(tmp_path):
    target = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from data_pipeline.store import StoreWriter
        from tests.data_pipeline.conftest import synthetic_windows, CHANNELS, WINDOW
        d = synthetic_windows(700)
        w = StoreWriter({str(target)!r}, "zarr", CHANNELS, WINDOW, chunk_windows=32, shard_windows=128)
        w.append("train", d["windows"], d["label"], d["subject"], d["recording"], d["offset"])
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-way: no finalize, no cleanup
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not target.exists()
    (stale,) = _tmp_dirs(tmp_path, "store")
    assert stale.name.startswith(".store.tmp-")
    assert any(stale.rglob("c/0/0/0"))  # shards were written ...
    assert not (stale / "manifest.json").exists()  # ... but it never looks complete
    with pytest.raises(StoreError, match="incomplete.*re-run `timemae data prepare`"):
        open_store(stale)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(target)
    # a re-run removes the stale temporary directory and succeeds
    write_synthetic_store(target, "zarr", {"train": 200, "val": 10, "test": 3})
    assert _tmp_dirs(tmp_path, "store") == []
    assert verify_store(target) == []


def test_directory_without_manifest_is_incomplete(tmp_path):
    target = tmp_path / "store"
    write_synthetic_store(target, "arrow", {"train": 50, "val": 0, "test": 0})
    (target / "manifest.json").unlink()
    with pytest.raises(StoreError, match="no manifest.json: it is incomplete"):
        read_manifest(target)
    assert "incomplete" in verify_store(target)[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_finalize_replaces_existing_store(tmp_path, fmt):
    target = tmp_path / "store"
    write_synthetic_store(target, fmt, {"train": 100, "val": 0, "test": 0})
    write_synthetic_store(target, fmt, {"train": 40, "val": 5, "test": 0}, seed=7)
    store = open_store(target)
    assert store.num_windows("train") == 40 and store.num_windows("val") == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert verify_store(target) == []


def test_writer_validates_inputs(tmp_path):
    with pytest.raises(ValueError, match="multiple of chunk_windows"):
        StoreWriter(tmp_path / "s", "zarr", CHANNELS, WINDOW, chunk_windows=32, shard_windows=100)
    with pytest.raises(ValueError, match="format"):
        StoreWriter(tmp_path / "s", "hdf5", CHANNELS, WINDOW)
    with StoreWriter(tmp_path / "s", "arrow", CHANNELS, WINDOW) as w:
        with pytest.raises(ValueError, match=r"shape \(N, 3, 16\)"):
            w.append("train", np.zeros((4, 2, 16), np.float32), 0, 0, 0, 0)
        with pytest.raises(ValueError, match="split 'dev'"):
            w.append("dev", np.zeros((4, 3, 16), np.float32), 0, 0, 0, 0)
        with pytest.raises(ValueError, match=r"label must have shape \(4,\)"):
            w.append("train", np.zeros((4, 3, 16), np.float32), [0, 1], 0, 0, 0)
        with pytest.raises(ValueError, match="channels"):
            w.finalize({"channels": ["a", "b", "c"]})
    assert not (tmp_path / "s").exists()


def test_caller_channels_with_units_are_kept(tmp_path):
    chans = [{"name": c, "unit": "g"} for c in CHANNELS]
    m, _ = write_synthetic_store(tmp_path / "s", "arrow", {"train": 10, "val": 0, "test": 0},
                                 manifest={"channels": chans})
    assert m["channels"] == chans
    assert open_store(tmp_path / "s").channels == CHANNELS


# -------------------------------------------------------------------------------------------
# integrity


def test_read_manifest_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist.*timemae data prepare"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a store directory"):
        read_manifest(tmp_path / "file")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot be read"):
        read_manifest(bad)
    (bad / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(StoreError, match="newer than this timemae-dist understands.*upgrade"):
        read_manifest(bad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_names_flipped_byte(tmp_path, fmt):
    m, _ = write_synthetic_store(tmp_path / "s", fmt, {"train": 400, "val": 30, "test": 0})
    assert verify_store(tmp_path / "s") == []
    rel = _shard_file(m, "train", 2, fmt)
    p = tmp_path / "s" / rel
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    problems = verify_store(tmp_path / "s")
    assert len(problems) == 1, problems
    assert rel in problems[0] and "shard 2 of split 'train'" in problems[0] and "sha256 mismatch" in problems[0]
    if fmt == "zarr":  # zstd frame checksums turn a flipped byte into a read error naming the shard
        store = open_store(tmp_path / "s")
        with pytest.raises(StoreError, match="shard 2 of split 'train'"):
            for i in range(store.num_chunks("train")):
                store.read_chunk("train", i)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_or_truncated_shard_is_a_clear_error(tmp_path, fmt):
    m, _ = write_synthetic_store(tmp_path / "s", fmt, {"train": 400, "val": 30, "test": 0})
    rel = _shard_file(m, "train", 1, fmt)
    (tmp_path / "s" / rel).unlink()
    store = open_store(tmp_path / "s")
    store.read_chunk("train", 0)  # shard 0 is fine
    with pytest.raises(StoreError, match=rf"file {rel} of shard 1 of split 'train' \(expected 128 rows\).*missing"):
        store.read_chunk("train", 4)  # chunk 4 = first chunk of shard 1
    with pytest.raises(StoreError, match="missing"):
        store.read_column("train", "label")
    assert any(rel in p and "missing" in p for p in verify_store(tmp_path / "s"))

    m, _ = write_synthetic_store(tmp_path / "t", fmt, {"train": 400, "val": 30, "test": 0})
    rel = _shard_file(m, "train", 3, fmt)
    p = tmp_path / "t" / rel
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(StoreError, match=rf"file {rel} of shard 3 of split 'train' \(expected 16 rows\).*truncated"):
        open_store(tmp_path / "t").read_chunk("train", 12)
    assert any(rel in q and "bytes" in q for q in verify_store(tmp_path / "t"))


def test_unknown_split_is_a_clear_error(synthetic_stores):
    store = open_store(synthetic_stores["zarr"])
    with pytest.raises(StoreError, match="no split 'dev'; it has train, val, test"):
        store.num_windows("dev")


def test_writer_memory_is_one_shard_per_split(tmp_path):
    with StoreWriter(tmp_path / "s", "zarr", CHANNELS, WINDOW, chunk_windows=8, shard_windows=64) as w:
        d = synthetic_windows(1000)
        w.append("train", d["windows"], d["label"], d["subject"], d["recording"], d["offset"])
        assert all(b.shape[0] == 64 for b in w._buf.values())
        assert w._fill["train"] == 1000 % 64 and len(w._shards["train"]) == 1000 // 64
        w.finalize({})
    assert open_store(tmp_path / "s").num_windows("train") == 1000


def test_open_store_pickles_without_handles(synthetic_stores):
    import pickle

    store = open_store(synthetic_stores["arrow"])
    store.read_chunk("train", 0)
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read_chunk("train", 3)["windows"], store.read_chunk("train", 3)["windows"])
    assert os.fspath(clone.path) == os.fspath(store.path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zarr_direct_reader_matches_zarr(tmp_path, dtype):
    write_synthetic_store(tmp_path / "s", "zarr", {"train": 300, "val": 0, "test": 0}, dtype=dtype)
    fast, lib = open_store(tmp_path / "s"), open_store(tmp_path / "s")
    lib.zarr_direct = False
    assert fast._direct_layout("train") is not None
    for i in range(fast.num_chunks("train")):
        a, b = fast.read_chunk_raw("train", i), lib.read_chunk_raw("train", i)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
