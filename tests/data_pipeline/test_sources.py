"""Recording sources (Parquet/CSV/NPZ), window files, and their clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import (
    RecordingRef,
    list_recordings,
    read_recording,
    read_window_files,
    skip_short,
)

SHARED = Path("/work/shared/data/hapt")


def cfg(path, **kw) -> SourceConfig:
    c = SourceConfig(path=str(path), **kw)
    c.validate()
    return c


def write_parquet(path: Path, n=20, meta=None, seed=0, **extra):
    rng = np.random.default_rng(seed)
    cols = {
        "acc_x": rng.normal(size=n).astype(np.float32),
        "acc_y": rng.normal(size=n).astype(np.float32),
        "note": [f"r{i}" for i in range(n)],
        "label": (np.arange(n) % 3 - 1).astype(np.int8),
    }
    cols.update(extra)
    table = pa.table(cols)
    if meta is not None:
        table = table.replace_schema_metadata({k: str(v) for k, v in meta.items()})
    pq.write_table(table, path)
    return cols


# --------------------------------------------------------------------------------------------
# happy paths


def test_parquet_metadata_and_channels(tmp_path):
    cols = write_parquet(tmp_path / "rec_a.parquet", meta={"subject": "07", "session": "2", "sample_rate_hz": 50})
    (tmp_path / "README.md").write_text("not data")
    refs = list_recordings(cfg(tmp_path))
    assert len(refs) == 1
    ref = refs[0]
    digest = hashlib.sha256((tmp_path / "rec_a.parquet").read_bytes()).hexdigest()
    assert ref == RecordingRef("rec_a", "7", "2", "rec_a.parquet", digest, 20)
    rec = read_recording(ref, cfg(tmp_path))
    # null channels = numeric columns except the label, file order; the string column is ignored
    assert rec.channels == ["acc_x", "acc_y"]
    assert rec.data.dtype == np.float32 and rec.data.flags.c_contiguous and rec.data.shape == (20, 2)
    assert np.array_equal(rec.data[:, 1], cols["acc_y"])
    assert rec.labels.dtype == np.int64 and np.array_equal(rec.labels, cols["label"])
    assert rec.sample_rate_hz == 50.0
    # explicit order, config rate wins, unlabelled
    rec2 = read_recording(ref, cfg(tmp_path, channels=["acc_y", "acc_x"], label_column=None, sample_rate_hz=20.0))
    assert rec2.channels == ["acc_y", "acc_x"] and rec2.labels is None and rec2.sample_rate_hz == 20.0
    assert np.array_equal(rec2.data, rec.data[:, ::-1])


def test_subject_from_filename_and_metadata_choice(tmp_path):
    write_parquet(tmp_path / "subject03_session1.parquet", meta={"subject": "9"})
    write_parquet(tmp_path / "subject04_session0.parquet")
    auto = list_recordings(cfg(tmp_path))
    assert [(r.subject, r.session) for r in auto] == [("9", ""), ("4", "0")]
    by_name = list_recordings(cfg(tmp_path, subject_from="filename"))
    assert [(r.subject, r.session) for r in by_name] == [("3", "1"), ("4", "0")]
    with pytest.raises(DataError, match=r"subject04_session0.parquet.*subject_from=metadata.*subject_from=filename"):
        list_recordings(cfg(tmp_path, subject_from="metadata"))
    custom = list_recordings(cfg(tmp_path, subject_from="filename", filename_pattern=r"(?P<subject>\d+)_session"))
    assert [r.subject for r in custom] == ["3", "4"]


def test_csv_counts_and_values(tmp_path):
    (tmp_path / "s1_run2.csv").write_text("a,b,label\n1,2,0\n3,nan,-1\n5,,1\n\n\n")
    (tmp_path / "s2.csv").write_bytes(b"a,b,label\r\n1,2,0\r\n3,4,1")  # CRLF, no final newline
    (tmp_path / "s3.csv").write_text("a,b,label\n1.5,2,1.0\n")  # integral float labels are fine
    refs = list_recordings(cfg(tmp_path))
    assert [(r.name, r.subject, r.session, r.num_samples) for r in refs] == [
        ("s1_run2", "1", "2", 3),
        ("s2", "2", "", 2),
        ("s3", "3", "", 1),
    ]
    rec = read_recording(refs[0], cfg(tmp_path))
    assert rec.channels == ["a", "b"] and rec.sample_rate_hz is None
    assert np.isnan(rec.data[1, 1]) and np.isnan(rec.data[2, 1])  # NaN is not a read error
    assert rec.labels.tolist() == [0, -1, 1]
    rec3 = read_recording(refs[2], cfg(tmp_path))
    assert rec3.labels.tolist() == [1] and rec3.data.tolist() == [[1.5, 2.0]]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
def test_csv_line_count_across_read_blocks(tmp_path, monkeypatch, block):
    import data_pipeline.sources as sources

    monkeypatch.setattr(sources, "_READ_BLOCK", block)
    contents = [
        b"a,label\n1,0\n2,0\n",
        b"a,label\r\n1,0\r\n\r\n2,0\r\n\r\n",
        b"\na,label\n\n1,0\n\n\n2,0",
        b"a,label\n1,0\n2,0\r",
    ]
    for i, text in enumerate(contents):
        (tmp_path / f"s{i}.csv").write_bytes(text)
    refs = list_recordings(cfg(tmp_path))
    assert [r.num_samples for r in refs] == [2, 2, 2, 2]
    for r in refs:
        assert read_recording(r, cfg(tmp_path)).ref.num_samples == 2
        assert r.sha256 == hashlib.sha256((tmp_path / r.file).read_bytes()).hexdigest()


def test_npz_both_layouts_with_metadata(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    y = np.array([0, 0, 1, 1, -1, 2])
    np.savez(tmp_path / "stacked.npz", data=x, channels=np.array(["u", "v"]), label=y,
             subject=np.array("05"), session=np.array("1"), sample_rate_hz=np.array(32.0))
    np.savez_compressed(tmp_path / "subj6.npz", v=x[:, 1], u=x[:, 0], label=y)
    refs = list_recordings(cfg(tmp_path))
    assert [(r.name, r.subject, r.session, r.num_samples) for r in refs] == [("stacked", "5", "1", 6), ("subj6", "6", "", 6)]
    a = read_recording(refs[0], cfg(tmp_path))
    b = read_recording(refs[1], cfg(tmp_path, channels=["u", "v"]))
    assert a.channels == ["u", "v"] and a.sample_rate_hz == 32.0
    assert np.array_equal(a.data, x.astype(np.float32)) and np.array_equal(b.data, a.data)
    assert np.array_equal(a.labels, y) and np.array_equal(b.labels, y)
    c = read_recording(refs[0], cfg(tmp_path, channels=["v"]))
    assert c.channels == ["v"] and np.array_equal(c.data[:, 0], x[:, 1])


def test_glob_format_and_min_length(tmp_path):
    write_parquet(tmp_path / "s1.parquet", n=5)
    write_parquet(tmp_path / "s2.parquet", n=50)
    (tmp_path / "s3.csv").write_text("a,label\n1,0\n")
    assert [r.name for r in list_recordings(cfg(tmp_path, glob="*.parquet"))] == ["s1", "s2"]
    assert [r.name for r in list_recordings(cfg(tmp_path, format="csv"))] == ["s3"]
    kept, skipped = skip_short(list_recordings(cfg(tmp_path, min_length=10)), cfg(tmp_path, min_length=10))
    assert [r.name for r in kept] == ["s2"] and [r.name for r in skipped] == ["s1", "s3"]


def test_subdirectories_give_unique_names(tmp_path):
    for d in ("subject1", "subject2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "run0.csv").write_text("a,label\n1,0\n2,0\n")
    refs = list_recordings(cfg(tmp_path, glob="**/*.csv"))
    assert [(r.name, r.subject, r.file) for r in refs] == [
        ("subject1/run0", "1", "subject1/run0.csv"),
        ("subject2/run0", "2", "subject2/run0.csv"),
    ]
    rec = read_recording(refs[1], cfg(tmp_path, glob="**/*.csv"))
    assert rec.data[:, 0].tolist() == [1.0, 2.0]
    with pytest.raises(DataError, match=r"subject1/run0.csv: cannot derive the subject.*filename_pattern='x\(\?P<subject>"):
        list_recordings(cfg(tmp_path, glob="**/*.csv", filename_pattern=r"x(?P<subject>\d+)"))


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared HAPT Parquet files not found")
def test_shared_hapt_directory():
    refs = list_recordings(cfg(SHARED))
    assert len(refs) == 61 and refs[0].name == "subject01_session0" and refs[0].subject == "1"
    rec = read_recording(refs[-1], cfg(SHARED))
    assert rec.channels == ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    assert rec.sample_rate_hz == 50.0


# --------------------------------------------------------------------------------------------
# bad input: one clear DataError naming the file (and row/column) and the fix


def test_ragged_csv(tmp_path):
    (tmp_path / "s1.csv").write_text("a,b,label\n1,2,0\n3,4,0\n5,6\n")
    ref = list_recordings(cfg(tmp_path))[0]
    with pytest.raises(DataError, match=r"s1.csv: ragged rows: line 4 has 2 fields but the header has 3"):
        read_recording(ref, cfg(tmp_path))


def test_ragged_npz(tmp_path):
    np.savez(tmp_path / "s1.npz", a=np.zeros(5), b=np.zeros(4), label=np.zeros(5, int))
    with pytest.raises(DataError, match=r"s1.npz: ragged channels.*'a': 5.*'b': 4"):
        list_recordings(cfg(tmp_path))
    np.savez(tmp_path / "s1.npz", data=np.zeros((5, 2)), channels=np.array(["a", "b"]), label=np.zeros(4, int))
    with pytest.raises(DataError, match=r"s1.npz: ragged arrays"):
        list_recordings(cfg(tmp_path))


@pytest.mark.parametrize("kind", ["parquet", "csv", "npz"])
def test_missing_label_column(tmp_path, kind):
    if kind == "parquet":
        pq.write_table(pa.table({"a": [1.0, 2.0]}), tmp_path / "s1.parquet")
    elif kind == "csv":
        (tmp_path / "s1.csv").write_text("a\n1\n2\n")
    else:
        np.savez(tmp_path / "s1.npz", a=np.zeros(2))
    c = cfg(tmp_path)
    with pytest.raises(DataError, match=rf"s1.{kind}: no label (column|array) 'label'.*source.label_column=null"):
        read_recording(list_recordings(c)[0], c)
    rec = read_recording(list_recordings(cfg(tmp_path, label_column=None))[0], cfg(tmp_path, label_column=None))
    assert rec.labels is None and rec.channels == ["a"]


def test_non_numeric_channel(tmp_path):
    (tmp_path / "s1.csv").write_text("a,b,label\n1,2,0\n3,x4,0\n")
    c = cfg(tmp_path, channels=["a", "b"])
    with pytest.raises(DataError, match=r"s1.csv: channel column 'b' has type string.*row 1: 'x4'"):
        read_recording(list_recordings(c)[0], c)
    np.savez(tmp_path / "s2.npz", a=np.array(["x", "y"]), label=np.zeros(2, int))
    c = cfg(tmp_path, glob="*.npz", channels=["a"])
    with pytest.raises(DataError, match=r"s2.npz: channel array 'a' has dtype <U1"):
        read_recording(list_recordings(c)[0], c)


@pytest.mark.parametrize(
    "labels, pattern",
    [("0\n0.5\n", r"row 1, column 'label': label 0.5"), ("1\nwalk\n", r"row 1, column 'label': label 'walk'"), ("1\n\n", None)],
)
def test_non_integer_labels(tmp_path, labels, pattern):
    rows = labels.split("\n")[:2]
    (tmp_path / "s1.csv").write_text("a,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(rows)))
    c = cfg(tmp_path)
    ref = list_recordings(c)[0]
    with pytest.raises(DataError, match=pattern or r"row 1, column 'label': missing label") as e:
        read_recording(ref, c)
    assert "s1.csv" in str(e.value) and "integers" in str(e.value)


def test_parquet_float_and_null_labels(tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "label": [1.0, None, 2.0]}), tmp_path / "s1.parquet")
    c = cfg(tmp_path)
    with pytest.raises(DataError, match=r"s1.parquet: row 1, column 'label': missing label"):
        read_recording(list_recordings(c)[0], c)


@pytest.mark.parametrize(
    "name, content",
    [("s1.csv", b""), ("s1.csv", b"a,label\n"), ("s1.csv", b"\n\n"), ("s1.npz", b"")],
)
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}: empty file"):
        list_recordings(cfg(tmp_path))


def test_empty_parquet_and_npz(tmp_path):
    pq.write_table(pa.table({"a": pa.array([], pa.float32()), "label": pa.array([], pa.int8())}), tmp_path / "s1.parquet")
    with pytest.raises(DataError, match=r"s1.parquet: empty file"):
        list_recordings(cfg(tmp_path))
    (tmp_path / "s1.parquet").unlink()
    np.savez(tmp_path / "s2.npz", a=np.zeros(0), label=np.zeros(0, int))
    with pytest.raises(DataError, match=r"s2.npz: empty file"):
        list_recordings(cfg(tmp_path))


def test_unknown_channel_lists_available(tmp_path):
    write_parquet(tmp_path / "s1.parquet")
    c = cfg(tmp_path, channels=["acc_x", "acc_q"])
    with pytest.raises(DataError, match=r"s1.parquet: unknown channel\(s\) \['acc_q'\].*available columns: \['acc_x', 'acc_y', 'note'\]"):
        read_recording(list_recordings(c)[0], c)
    np.savez(tmp_path / "s2.npz", data=np.zeros((3, 2)), channels=np.array(["u", "v"]), label=np.zeros(3, int))
    c = cfg(tmp_path, glob="*.npz", channels=["w"])
    with pytest.raises(DataError, match=r"s2.npz: unknown channel.*\['u', 'v'\]"):
        read_recording(list_recordings(c)[0], c)


def test_no_files_matching(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no recordings found in source.path=.*source.glob='\*'"):
        list_recordings(cfg(tmp_path))
    with pytest.raises(DataError, match="not a directory"):
        list_recordings(cfg(tmp_path / "missing"))


def test_corrupt_files(tmp_path):
    (tmp_path / "s1.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"s1.parquet: not a readable Parquet file"):
        list_recordings(cfg(tmp_path))
    (tmp_path / "s1.parquet").unlink()
    (tmp_path / "s2.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(DataError, match=r"s2.npz: not a readable .npz file"):
        list_recordings(cfg(tmp_path))


def test_subject_not_derivable_names_pattern(tmp_path):
    (tmp_path / "walk.csv").write_text("a,label\n1,0\n")
    with pytest.raises(DataError, match=r"walk.csv: cannot derive the subject.*source.filename_pattern="):
        list_recordings(cfg(tmp_path))


def test_duplicate_names_across_formats(tmp_path):
    (tmp_path / "s1.csv").write_text("a,label\n1,0\n")
    np.savez(tmp_path / "s1.npz", a=np.zeros(1), label=np.zeros(1, int))
    with pytest.raises(DataError, match=r"\['s1'\] exist in several formats"):
        list_recordings(cfg(tmp_path))


# --------------------------------------------------------------------------------------------
# window files


def test_window_files_pt_tensors_without_val(tmp_path):
    x = torch.randn(7, 3, 16)
    torch.save({"samples": x, "labels": torch.arange(7) % 2}, tmp_path / "train.pt")
    torch.save({"samples": x[:4].double(), "labels": torch.zeros(4, dtype=torch.int32)}, tmp_path / "test.pt")
    out = read_window_files(cfg(tmp_path, kind="windows"))
    assert sorted(out) == ["test", "train"]
    xs, ys, sha = out["train"]
    assert xs.dtype == np.float32 and xs.shape == (7, 3, 16) and np.array_equal(xs, x.numpy())
    assert ys.dtype == np.int64 and ys.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert sha == hashlib.sha256((tmp_path / "train.pt").read_bytes()).hexdigest()
    assert out["test"][0].dtype == np.float32
    torch.save({"samples": x.bfloat16(), "labels": torch.arange(7).float()}, tmp_path / "train.pt")
    xs, ys, _ = read_window_files(cfg(tmp_path, kind="windows"))["train"]
    assert xs.dtype == np.float32 and ys.tolist() == list(range(7))


def test_window_files_numpy_in_pt_and_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 2, 8)).astype(np.float32)
    torch.save({"samples": x, "labels": np.arange(5)}, tmp_path / "train.pt")
    np.savez(tmp_path / "val.npz", samples=x[:2], labels=np.arange(2))
    np.savez(tmp_path / "test.npz", samples=x[:3], labels=np.arange(3).reshape(3, 1))
    out = read_window_files(cfg(tmp_path, kind="windows"))
    assert sorted(out) == ["test", "train", "val"]
    assert np.array_equal(out["train"][0], x) and np.array_equal(out["val"][0], x[:2])
    assert out["test"][1].tolist() == [0, 1, 2]
    # univariate (N, T) samples are one channel
    uni = tmp_path / "uni"
    uni.mkdir()
    for split in ("train", "test"):
        np.savez(uni / f"{split}.npz", samples=x[:3, 0], labels=np.arange(3))
    assert read_window_files(cfg(uni, kind="windows"))["test"][0].shape == (3, 1, 8)


def test_window_files_errors(tmp_path):
    torch.save({"samples": torch.zeros(5, 2, 8), "labels": torch.zeros(4)}, tmp_path / "train.pt")
    np.savez(tmp_path / "test.npz", samples=np.zeros((3, 2, 8)), labels=np.zeros(3))
    with pytest.raises(DataError, match=r"train.pt: 'samples' holds 5 windows but 'labels' 4"):
        read_window_files(cfg(tmp_path, kind="windows"))
    torch.save({"x": torch.zeros(5, 2, 8)}, tmp_path / "train.pt")
    with pytest.raises(DataError, match=r"train.pt: expected a dict with 'samples'"):
        read_window_files(cfg(tmp_path, kind="windows"))
    (tmp_path / "train.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train.pt: cannot load it with torch.load\(weights_only=True\)"):
        read_window_files(cfg(tmp_path, kind="windows"))
    (tmp_path / "train.pt").unlink()
    with pytest.raises(DataError, match=r"no train.pt or train.npz"):
        read_window_files(cfg(tmp_path, kind="windows"))
    np.savez(tmp_path / "train.npz", samples=np.zeros((3, 2, 9)), labels=np.zeros(3))
    with pytest.raises(DataError, match=r"disagree on \(C, T\)"):
        read_window_files(cfg(tmp_path, kind="windows"))
