"""End to end: `timemae data prepare` on real files -> a store, through the real CLI code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import load_data_config
from data_pipeline.errors import DataError
from data_pipeline.prepare import prepare
from data_pipeline.store import open_store, read_manifest, verify_store
from launch.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
HAPT_DIR = REPO.parent / "shared" / "data" / "hapt"
CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


def write_recordings(root: Path, num_subjects: int = 5, sessions: int = 2, length: int = 1000) -> Path:
    """Parquet recordings with subject metadata, a labelled stretch and an unlabelled one."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(1, num_subjects + 1):
        for k in range(sessions):
            n = length + 37 * s + 11 * k
            data = {c: rng.normal(size=n).astype(np.float32) for c in CHANNELS}
            label = np.full(n, -1, dtype=np.int8)
            label[100:400] = 1 + (s % 3)
            label[500:800] = 4
            table = pa.table({**data, "label": label})
            table = table.replace_schema_metadata(
                {"subject": str(s), "session": str(k), "sample_rate_hz": "50"}
            )
            pq.write_table(table, root / f"subject{s:02d}_session{k}.parquet")
    return root


def _cfg(src: Path, out: Path, *extra: str):
    return load_data_config(
        None,
        [
            "source.kind=recordings",
            f"source.path={src}",
            f"output.path={out}",
            "window.length=64",
            "window.stride=32",
            "split.test_subjects=[5]",
            "split.val_subjects=[4]",
            "split.label_fractions=[0.1, 0.5]",
            "output.chunk_windows=16",
            "output.shard_windows=64",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    return write_recordings(tmp_path_factory.mktemp("rec") / "recordings")


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_prepare_writes_complete_store(recordings: Path, tmp_path: Path, fmt: str) -> None:
    cfg = _cfg(recordings, tmp_path / "store", f"output.format={fmt}")
    res = prepare(cfg, command="test")
    m = read_manifest(tmp_path / "store")
    assert m == res.manifest and m["format"] == fmt
    assert [c["name"] for c in m["channels"]] == CHANNELS
    assert m["window"] == 64 and m["stride"] == 32 and m["sample_rate_hz"] == 50.0
    assert m["splits"]["test"]["subjects"] == ["5"] and m["splits"]["val"]["subjects"] == ["4"]
    assert m["splits"]["train"]["subjects"] == ["1", "2", "3"]
    store = open_store(tmp_path / "store")
    # every window of every recording lands in exactly one split
    total = sum(s["num_windows"] for s in m["sources"])
    assert total == sum(store.num_windows(s) for s in ("train", "val", "test"))
    # train-only normalisation statistics, recomputed from the stored windows
    train = store.read_all("train")
    x = train["windows"].astype(np.float64)
    np.testing.assert_allclose(m["normalization"]["mean"], x.mean(axis=(0, 2)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(m["normalization"]["std"], x.std(axis=(0, 2)), rtol=1e-6)
    # class histograms match the stored labels
    lab = train["label"]
    hist = {str(k): int(v) for k, v in zip(*np.unique(lab[lab >= 0], return_counts=True))}
    assert m["splits"]["train"]["class_counts"] == hist
    assert m["splits"]["train"]["num_labelled"] == int((lab >= 0).sum())
    assert set(m["splits"]["train"]["label_fractions"]) == {"0.1", "0.5"}
    assert verify_store(tmp_path / "store") == []
    assert not list(tmp_path.glob(".store.tmp-*"))


def test_prepare_is_deterministic_and_idempotent(recordings: Path, tmp_path: Path) -> None:
    a = prepare(_cfg(recordings, tmp_path / "a")).manifest
    b = prepare(_cfg(recordings, tmp_path / "b")).manifest
    assert a["files"] == b["files"]  # byte-identical shards (same sha256 for every file)
    again = prepare(_cfg(recordings, tmp_path / "a"))
    assert again.up_to_date
    with pytest.raises(DataError, match="different config.*output.overwrite=true"):
        prepare(_cfg(recordings, tmp_path / "a", "window.stride=64"))
    res = prepare(_cfg(recordings, tmp_path / "a", "window.stride=64", "output.overwrite=true"))
    assert not res.up_to_date and read_manifest(tmp_path / "a")["stride"] == 64


def test_interrupted_prepare_leaves_nothing_that_looks_complete(recordings: Path, tmp_path: Path) -> None:
    src = tmp_path / "rec"
    src.mkdir()
    for f in sorted(recordings.glob("*.parquet")):
        (src / f.name).write_bytes(f.read_bytes())
    # the last recording (sorted by name) holds a NaN: prepare fails half-way through
    bad = src / "subject05_session1.parquet"
    df = pq.read_table(bad)
    meta = df.schema.metadata
    pdf = df.to_pandas()
    pdf.loc[123, "gyro_y"] = np.nan
    pq.write_table(pa.Table.from_pandas(pdf, preserve_index=False).replace_schema_metadata(meta), bad)
    out = tmp_path / "store"
    with pytest.raises(DataError) as info:
        prepare(_cfg(src, out))
    msg = str(info.value)
    assert "subject05_session1" in msg and "123" in msg and "nan_policy" in msg
    assert not out.exists()
    assert not list(tmp_path.glob(".store.tmp-*"))
    # the fix the message names works
    res = prepare(_cfg(src, out, "window.nan_policy=drop_window"))
    assert (out / "manifest.json").is_file() and res.manifest["splits"]["test"]["num_windows"] > 0


def test_cli_prepare_inspect_verify(recordings: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "store"
    cfg_file = tmp_path / "data.yaml"
    cfg_file.write_text(
        "source: {kind: recordings}\nwindow: {length: 64, stride: 32}\n"
        "split: {test_subjects: [5], val_subjects: [4]}\n"
        "output: {chunk_windows: 16, shard_windows: 64}\n"
    )
    rc = cli(["data", "prepare", str(cfg_file), f"source.path={recordings}", f"output.path={out}",
              "output.format=arrow", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "train" in text and "MB" in text
    assert cli(["data", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["format"] == "arrow" and info["channels"] == CHANNELS
    assert info["window"] == 64 and info["stride"] == 32
    assert set(info["splits"]) == {"train", "val", "test"}
    for s in info["splits"].values():
        assert {"num_windows", "num_labelled", "class_counts"} <= set(s)
    assert cli(["data", "verify", str(out)]) == 0
    # flip one byte of one shard: verify names it and fails
    shard = sorted((out / "arrow" / "train").glob("*.arrow"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli(["data", "verify", str(out)]) != 0
    assert shard.name in capsys.readouterr().err


def test_cli_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    rc = cli(["data", "prepare", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "missing.yaml" in err and len(err.strip().splitlines()) == 1
    rc = cli(["data", "prepare", str(REPO / "configs/data/hapt_har.yaml"), "window.lenght=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "window.lenght" in err and "did you mean 'length'" in err
    rc = cli(["data", "inspect", str(tmp_path / "nostore")])
    err = capsys.readouterr().err
    assert rc == 2 and "nostore" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli(["data", "prepare", str(REPO / "configs/data/hapt_har.yaml"), "source.kind=recordings",
              f"source.path={empty}", f"output.path={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no recordings found" in err


@pytest.mark.skipif(not HAPT_DIR.is_dir(), reason=f"shared HAPT recordings not found at {HAPT_DIR}")
def test_hapt_har_config_rebuilds_uci_har(tmp_path: Path) -> None:
    """configs/data/hapt_har.yaml on the real recordings gives the UCI HAR layout and sizes."""
    cfg = load_data_config(
        REPO / "configs/data/hapt_har.yaml",
        ["source.kind=recordings", f"source.path={HAPT_DIR}", f"output.path={tmp_path / 'har'}"],
    )
    m = prepare(cfg).manifest
    store = open_store(tmp_path / "har")
    chunk = store.read_chunk("train", 0)
    assert chunk["windows"].shape[1:] == (9, 128) and chunk["windows"].dtype == np.float32
    s = m["splits"]
    labelled_trainval = s["train"]["num_labelled"] + s["val"]["num_labelled"]
    assert 6900 <= labelled_trainval <= 7400, labelled_trainval
    assert 2750 <= s["test"]["num_labelled"] <= 3000, s["test"]["num_labelled"]
    assert s["test"]["subjects"] == ["2", "4", "9", "10", "12", "13", "18", "20", "24"]
    assert sorted(int(k) for k in s["train"]["class_counts"]) == [0, 1, 2, 3, 4, 5]
    assert len(s["val"]["subjects"]) == 4  # 20% of the 21 train subjects
    # unlabelled/transition windows are kept for pretraining
    assert s["train"]["num_windows"] > s["train"]["num_labelled"]


def test_prepare_from_official_window_files(tmp_path: Path) -> None:
    """The official TimeMAE / TS-TCC HAR format (train.pt/val.pt/test.pt) becomes a store as is."""
    import torch

    rng = np.random.default_rng(1)
    src = tmp_path / "har_pt"
    src.mkdir()
    sizes = {"train": 70, "val": 20, "test": 30}
    for split, n in sizes.items():
        samples = torch.from_numpy(rng.normal(size=(n, 3, 32)).astype(np.float32))
        labels = torch.from_numpy(rng.integers(0, 4, size=n))
        torch.save({"samples": samples, "labels": labels}, src / f"{split}.pt")
    out = tmp_path / "store"
    cfg = load_data_config(
        None,
        ["source.kind=windows", f"source.path={src}", "split.method=predefined", "window.length=32",
         f"output.path={out}", "output.chunk_windows=8", "output.shard_windows=32",
         "source.channels=[a, b, c]"],
    )
    m = prepare(cfg).manifest
    assert {s: m["splits"][s]["num_windows"] for s in sizes} == sizes
    assert [c["name"] for c in m["channels"]] == ["a", "b", "c"]
    store = open_store(out)
    for split in sizes:
        saved = torch.load(src / f"{split}.pt", weights_only=True)
        got = store.read_all(split)
        np.testing.assert_array_equal(got["windows"], saved["samples"].numpy())
        np.testing.assert_array_equal(got["label"], saved["labels"].numpy())
    with pytest.raises(DataError, match="window.length=32"):
        prepare(load_data_config(None, ["source.kind=windows", f"source.path={src}", "split.method=predefined",
                                        f"output.path={tmp_path / 'o2'}"]))
    # the window label map applies to window files too (unlisted raw labels become -1)
    mapped = prepare(load_data_config(None, [
        "source.kind=windows", f"source.path={src}", "split.method=predefined", "window.length=32",
        f"output.path={tmp_path / 'mapped'}", "window.label_map={0: 1, 1: 0}",
    ]))
    raw = torch.load(src / "test.pt", weights_only=True)["labels"].numpy()
    want = np.select([raw == 0, raw == 1], [1, 0], default=-1)
    np.testing.assert_array_equal(open_store(tmp_path / "mapped").read_all("test")["label"], want)
    assert mapped.manifest["splits"]["test"]["num_labelled"] == int((want >= 0).sum())
