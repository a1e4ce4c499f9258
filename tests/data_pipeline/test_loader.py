"""Loader: partition/shuffle pure functions over grids, then the real loader on real stores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_pipeline.errors import StoreError
from data_pipeline.loader import (
    EpochPlan,
    block_units,
    chunk_order,
    open_loader,
    rank_windows,
    select_windows,
    worker_units,
)
from data_pipeline.splits import label_fraction_subset
from data_pipeline.store import open_store
from tests.data_pipeline.conftest import write_synthetic_store


def _bounds(n: int, k: int, s: int) -> np.ndarray:
    """Chunk bounds as the store lays them out: shards of s rows, chunks of k inside each."""
    out = []
    for a in range(0, n, s):
        rows = min(s, n - a)
        out += [(a + c, a + min(c + k, rows)) for c in range(0, rows, k)]
    return np.asarray(out, np.int64).reshape(-1, 2)


def _plans(n, world, remainder, batch, *, selected=None, seed=3, epoch=1, block=20, shuffle=True):
    bounds = _bounds(n, 8, 24)
    return [
        EpochPlan(bounds, selected, batch, seed=seed, epoch=epoch, world_size=world, rank=r, shuffle=shuffle,
                  remainder=remainder, shuffle_block_windows=block)
        for r in range(world)
    ]


# -------------------------------------------------------------------------------------------
# pure functions over grids


@pytest.mark.parametrize("n", [0, 1, 7, 24, 50, 101, 333])
@pytest.mark.parametrize("labelled", [False, True])
def test_partition_grid(n, labelled):
    labels = np.random.default_rng(n).integers(-1, 3, n)
    selected = select_windows(labels, labelled_only=True) if labelled else None
    pool = selected if labelled else np.arange(n)
    big_n = len(pool)
    for world, batch, remainder in itertools.product([1, 2, 3, 4], [1, 5, 16], ["drop", "wrap"]):
        plans = _plans(n, world, remainder, batch, selected=selected)
        nb = {p.num_batches for p in plans}
        assert len(nb) == 1, "every rank must have the same number of batches"
        (num_batches,) = nb
        assert num_batches * batch == rank_windows(big_n, batch, world, remainder)
        per_rank = [p.batches() for p in plans]
        assert all(b.shape == (num_batches, batch) for b in per_rank)
        seen = np.concatenate([b.reshape(-1) for b in per_rank])
        assert np.isin(seen, pool).all()
        if remainder == "drop":
            assert len(np.unique(seen)) == len(seen), "ranks must be disjoint (and no duplicates)"
            assert big_n - len(seen) < world * batch, "drop at most one global batch"
        else:
            assert set(seen.tolist()) == set(pool.tolist()), "wrap covers every window"
            if big_n >= world * batch:  # one wrap at most: nothing is read three times
                assert np.bincount(seen).max() <= 2


@pytest.mark.parametrize("num_batches,bpb", [(0, 3), (1, 1), (10, 3), (12, 4), (7, 10), (25, 1)])
def test_work_units_grid(num_batches, bpb):
    for consumed in range(num_batches + 1):
        units = block_units(num_batches, bpb, consumed)
        flat = [j for _, a, b in units.tolist() for j in range(a, b)]
        assert flat == list(range(consumed, num_batches))
        for k, a, b in units.tolist():
            assert k * bpb <= a < b <= (k + 1) * bpb, "a unit stays inside one block"
        assert len({k for k, _, _ in units.tolist()}) == len(units), "a block is read by one worker"
        for n in range(1, 5):
            shares = [worker_units(units, w, n).tolist() for w in range(n)]
            # torch's in-order round robin over workers (exhausted ones skipped)
            merged = [s[i] for i in range(max(map(len, shares), default=0)) for s in shares if i < len(s)]
            assert merged == units.tolist()


def test_orders_are_pure_functions_of_seed_epoch():
    bounds = _bounds(500, 8, 24)
    mk = lambda seed, epoch, rank=0: EpochPlan(bounds, None, 10, seed=seed, epoch=epoch, world_size=2,
                                                rank=rank, shuffle_block_windows=60).batches()
    np.testing.assert_array_equal(mk(0, 0), mk(0, 0))
    assert not np.array_equal(mk(0, 0), mk(0, 1))
    assert not np.array_equal(mk(0, 0), mk(1, 0))
    assert not np.array_equal(chunk_order(63, 0, 0), chunk_order(63, 0, 1))
    np.testing.assert_array_equal(chunk_order(63, 0, 0, shuffle=False), np.arange(63))
    # epochs change which windows a rank gets, not only their order
    assert set(mk(0, 0, 0).ravel()) != set(mk(0, 1, 0).ravel())


def test_shuffle_is_local_and_reads_whole_chunks():
    bounds = _bounds(2000, 16, 64)
    plan = EpochPlan(bounds, None, 32, seed=5, epoch=2, shuffle_block_windows=256)
    assert plan.batches_per_block == 8
    for k in range(plan.num_blocks):
        win, chunk = plan.block(k)
        # a block touches about block/chunk chunks, each read whole, not hundreds of them
        assert len(np.unique(chunk)) <= 256 // 16 + 1
        assert ((bounds[chunk, 0] <= win) & (win < bounds[chunk, 1])).all()
    first = plan.batches()[0]
    assert np.abs(np.diff(np.sort(first))).max() > 1  # windows are mixed within a block
    flat = EpochPlan(bounds, None, 32, seed=5, epoch=2, shuffle=False).batches()
    np.testing.assert_array_equal(flat.ravel(), np.arange(flat.size))


# -------------------------------------------------------------------------------------------
# the loader on real stores


def _collect(loader, limit=None):
    out = []
    if limit == 0:
        return out
    for b in loader:
        out.append({k: v.clone() for k, v in b.items()})
        if limit is not None and len(out) == limit:
            break
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def test_batches_hold_the_stored_windows(synthetic_stores):
    data = synthetic_stores["data"]["train"]
    loader = open_loader(synthetic_stores["arrow"], "train", 16, seed=1, shuffle_block_windows=64)
    assert len(loader) == loader.num_batches == 1000 // 16
    batches = _collect(loader)
    assert len(batches) == 62
    b = batches[7]
    assert b["x"].dtype == torch.float32 and b["x"].shape == (16, 3, 16)
    assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64
    idx = b["index"].numpy()
    np.testing.assert_array_equal(b["x"].numpy(), data["windows"][idx])
    np.testing.assert_array_equal(b["label"].numpy(), data["label"][idx])
    np.testing.assert_array_equal(b["subject"].numpy(), data["subject"][idx])
    seen = np.concatenate([b["index"].numpy() for b in batches])
    assert len(np.unique(seen)) == len(seen) == 992


@pytest.mark.parametrize("num_workers", [0, 2])
def test_zarr_arrow_parity(synthetic_stores, num_workers):
    kw = dict(seed=4, epoch=3, world_size=2, rank=1, num_workers=num_workers, shuffle_block_windows=100)
    z = _collect(open_loader(synthetic_stores["zarr"], "train", 24, **kw))
    a = _collect(open_loader(synthetic_stores["arrow"], "train", 24, **kw))
    _assert_same(z, a)
    if num_workers:  # workers change nothing in the order
        _assert_same(z, _collect(open_loader(synthetic_stores["zarr"], "train", 24, **{**kw, "num_workers": 0})))


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_ranks_disjoint_equal_batches_through_loader(synthetic_stores, fmt):
    for remainder in ("drop", "wrap"):
        per_rank = [
            _collect(open_loader(synthetic_stores[fmt], "train", 32, seed=9, rank=r, world_size=3, remainder=remainder))
            for r in range(3)
        ]
        assert len({len(b) for b in per_rank}) == 1
        seen = np.concatenate([b["index"].numpy() for batches in per_rank for b in batches])
        if remainder == "drop":
            assert len(seen) == 10 * 3 * 32 and len(np.unique(seen)) == len(seen)
        else:
            assert len(seen) == 11 * 3 * 32 and set(seen.tolist()) == set(range(1000))


@pytest.mark.parametrize("workers_before,workers_after", [(0, 0), (2, 2), (0, 2)])
@pytest.mark.parametrize("stop", [5, 9])
def test_resume_mid_epoch(synthetic_stores, workers_before, workers_after, stop):
    kw = dict(seed=2, epoch=1, world_size=2, rank=0, shuffle_block_windows=48)
    path = synthetic_stores["zarr"]
    full = _collect(open_loader(path, "train", 16, **kw))  # 31 batches; blocks of 3 batches
    first = open_loader(path, "train", 16, num_workers=workers_before, **kw)
    head = _collect(first, limit=stop)
    assert first.state_dict()["batches_consumed"] == stop
    _assert_same(head, full[:stop])
    state = first.state_dict()
    resumed = open_loader(path, "train", 16, num_workers=workers_after, **{**kw, "epoch": 0})
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    _assert_same(_collect(resumed), full[stop:])
    assert resumed.batches_consumed == resumed.num_batches


def test_rank_zero_state_resumes_every_rank(synthetic_stores):
    path = synthetic_stores["arrow"]
    kw = dict(seed=2, epoch=0, world_size=2)
    r0 = open_loader(path, "train", 16, rank=0, **kw)
    _collect(r0, limit=4)
    r1 = open_loader(path, "train", 16, rank=1, **kw)
    r1.load_state_dict(r0.state_dict())
    want = _collect(open_loader(path, "train", 16, rank=1, **kw))[4:]
    _assert_same(_collect(r1), want)


def test_state_mismatch_is_a_clear_error(synthetic_stores, tmp_path):
    path = synthetic_stores["zarr"]
    state = open_loader(path, "train", 16, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this loader has world_size=4"):
        open_loader(path, "train", 16, world_size=4).load_state_dict(state)
    write_synthetic_store(tmp_path / "other", "zarr", {"train": 900, "val": 0, "test": 0})
    with pytest.raises(ValueError, match="num_selected=1000 but this loader has num_selected=900"):
        open_loader(tmp_path / "other", "train", 16, world_size=2).load_state_dict(state)


def test_epochs_set_epoch_and_replay(synthetic_stores):
    loader = open_loader(synthetic_stores["arrow"], "train", 50, seed=0)
    e0 = _collect(loader)
    _assert_same(_collect(loader), e0)  # iterating again replays the epoch (no auto-advance)
    loader.set_epoch(1)
    e1 = _collect(loader)
    assert not torch.equal(e0[0]["index"], e1[0]["index"])
    loader.set_epoch(1)  # same epoch: a no-op
    assert loader.batches_consumed == len(loader)
    part = open_loader(synthetic_stores["arrow"], "train", 50, seed=0)
    _collect(part, limit=3)
    _assert_same(_collect(part), e0[3:])  # breaking out and iterating again continues


def test_normalize(synthetic_stores, tmp_path):
    store = open_store(synthetic_stores["zarr"])
    mean = np.asarray(store.manifest["normalization"]["mean"], np.float32)
    std = np.asarray(store.manifest["normalization"]["std"], np.float32)
    raw = _collect(open_loader(store, "train", 64), limit=2)
    norm = _collect(open_loader(store, "train", 64, normalize=True), limit=2)
    want = (raw[1]["x"].numpy() - mean[None, :, None]) / std[None, :, None]
    np.testing.assert_allclose(norm[1]["x"].numpy(), want, rtol=1e-6, atol=1e-6)
    allx = np.concatenate([b["x"].numpy() for b in _collect(open_loader(store, "train", 100, normalize=True))])
    assert abs(allx.mean()) < 0.05 and abs(allx.std() - 1) < 0.05
    write_synthetic_store(tmp_path / "nonorm", "arrow", {"train": 40, "val": 0, "test": 0},
                          manifest={"normalization": None})
    with pytest.raises(StoreError, match="no normalisation statistics"):
        open_loader(tmp_path / "nonorm", "train", 8, normalize=True)


def test_labelled_only_and_label_fraction(synthetic_stores):
    path = synthetic_stores["arrow"]
    labels = synthetic_stores["data"]["train"]["label"]
    lab = _collect(open_loader(path, "train", 10, labelled_only=True, remainder="wrap"))
    seen = np.concatenate([b["index"].numpy() for b in lab])
    assert (labels[seen] >= 0).all()
    assert set(seen.tolist()) == set(np.flatnonzero(labels >= 0).tolist())
    assert all((b["label"] >= 0).all() for b in lab)
    subset = label_fraction_subset(labels, 0.1, 11)
    few = _collect(open_loader(path, "train", 4, label_fraction=0.1, subset_seed=11, remainder="wrap"))
    got = np.concatenate([b["index"].numpy() for b in few])
    assert set(got.tolist()) == set(subset.tolist())


def test_label_fraction_uses_and_checks_the_manifest_seed(tmp_path):
    _, data = write_synthetic_store(tmp_path / "s", "zarr", {"train": 300, "val": 0, "test": 0})
    labels = data["train"]["label"]
    import hashlib

    idx = label_fraction_subset(labels, 0.5, 42)
    rec = {"seed": 42, "num_windows": len(idx),
           "indices_sha256": hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()}
    write_synthetic_store(tmp_path / "t", "zarr", {"train": 300, "val": 0, "test": 0},
                          manifest={"splits": {"train": {"label_fractions": {"0.5": rec}}}})
    got = _collect(open_loader(tmp_path / "t", "train", 1, label_fraction=0.5, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b["index"].numpy() for b in got]), idx)
    bad = dict(rec, indices_sha256="0" * 64)
    write_synthetic_store(tmp_path / "u", "zarr", {"train": 300, "val": 0, "test": 0},
                          manifest={"splits": {"train": {"label_fractions": {"0.5": bad}}}})
    with pytest.raises(StoreError, match="differs from the one recorded"):
        open_loader(tmp_path / "u", "train", 1, label_fraction=0.5)


def test_bfloat16_store_through_loader(tmp_path, synthetic_stores):
    write_synthetic_store(tmp_path / "bf", "zarr", dtype="bfloat16")
    kw = dict(seed=1, shuffle_block_windows=64)
    bf = _collect(open_loader(tmp_path / "bf", "train", 32, **kw))
    f32 = _collect(open_loader(synthetic_stores["arrow"], "train", 32, **kw))
    for x, y in zip(bf, f32):
        torch.testing.assert_close(x["index"], y["index"], rtol=0, atol=0)
        torch.testing.assert_close(x["x"], y["x"], rtol=2.0**-8, atol=0)


def test_bad_arguments_are_clear(synthetic_stores):
    path = synthetic_stores["zarr"]
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        open_loader(path, "train", 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="remainder='pad'"):
        open_loader(path, "train", 8, remainder="pad")
    with pytest.raises(StoreError, match="no split 'dev'"):
        open_loader(path, "dev", 8)
    empty = open_loader(path, "test", 8)
    assert len(empty) == 0 and _collect(empty) == []


def test_missing_shard_surfaces_through_loader(tmp_path):
    m, _ = write_synthetic_store(tmp_path / "s", "arrow", {"train": 300, "val": 0, "test": 0})
    rel = list(m["splits"]["train"]["shards"][1]["files"])[0]
    (tmp_path / "s" / rel).unlink()
    with pytest.raises(StoreError, match=rf"{rel}.*shard 1 of split 'train' \(expected 128 rows\)"):
        open_loader(tmp_path / "s", "train", 8)  # reading the label column already needs it


def test_persistent_workers_follow_epochs_and_resume(synthetic_stores):
    path = synthetic_stores["zarr"]
    kw = dict(seed=6, shuffle_block_windows=64)
    ref = open_loader(path, "train", 32, **kw)
    want0 = _collect(ref)
    ref.set_epoch(1)
    want1 = _collect(ref)
    loader = open_loader(path, "train", 32, num_workers=2, persistent_workers=True, **kw)
    _assert_same(_collect(loader), want0)
    loader.set_epoch(1)
    head = _collect(loader, limit=7)  # break mid-epoch, then continue with the same workers
    _assert_same(head + _collect(loader), want1)
