"""Streaming per-channel statistics equal numpy's float64 mean/std, stably."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.stats import STD_FLOOR, RunningStats


def random_batches(x, rng):
    cuts = np.sort(rng.choice(np.arange(1, x.shape[0]), size=7, replace=False))
    return np.split(x, cuts)


def reference(x):
    x64 = x.astype(np.float64)
    return x64.mean(axis=(0, 2)), x64.std(axis=(0, 2))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_matches_numpy_on_random_batches(offset):
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 0.01, 5.0])[None, :, None]
    x = (offset + scale * rng.normal(size=(300, 3, 16))).astype(np.float32)
    st = RunningStats()
    for b in random_batches(x, rng):
        st.update(b)
    mean, std = reference(x)
    assert st.count == 300 * 16
    assert st.mean.dtype == np.float64 and st.std.dtype == np.float64
    np.testing.assert_allclose(st.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(st.std, std, rtol=1e-9)


def test_stable_far_from_zero():
    # E[x^2] - E[x]^2 in float64 loses everything here; the Chan merge does not
    rng = np.random.default_rng(1)
    x = 1e9 + 1e-3 * rng.normal(size=(200, 2, 8))
    st = RunningStats()
    for b in random_batches(x, rng):
        st.update(b)
    # float64 resolves 1e9 to ~1e-7, so per-batch means carry ~1e-7 error: rtol 1e-4 on a 1e-3 std
    np.testing.assert_allclose(st.std, x.std(axis=(0, 2)), rtol=1e-4)
    np.testing.assert_allclose(st.mean, x.mean(axis=(0, 2)), rtol=1e-15)
    naive = np.sqrt(np.maximum((x**2).mean(axis=(0, 2)) - x.mean(axis=(0, 2)) ** 2, 0))
    assert not np.allclose(naive, x.std(axis=(0, 2)), rtol=1e-2)


def test_merge_equals_single_pass_and_round_trips():
    rng = np.random.default_rng(2)
    x = rng.normal(loc=3.0, size=(120, 4, 10)).astype(np.float32)
    whole = RunningStats()
    whole.update(x)
    parts = [RunningStats() for _ in range(3)]
    for p, chunk in zip(parts, np.array_split(x, [10, 90])):
        p.update(chunk)
    merged = RunningStats().merge(parts[0]).merge(parts[1]).merge(parts[2])
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std, whole.std, rtol=1e-10)
    d = json.loads(json.dumps(merged.to_dict()))
    assert sorted(d) == ["count", "mean", "std"] and d["count"] == 1200 and len(d["std"]) == 4
    back = RunningStats.from_dict(d)
    np.testing.assert_allclose(back.std, merged.std, rtol=1e-12)
    with pytest.raises(ValueError, match="4 channels, got 3"):
        merged.update(x[:, :3])


def test_constant_channel_floor_and_empty():
    x = np.ones((5, 2, 4), np.float32)
    x[:, 1] = np.arange(4)
    st = RunningStats()
    assert st.count == 0 and st.to_dict() == {"count": 0, "mean": [], "std": []}
    st.update(np.zeros((0, 2, 4), np.float32))
    st.update(x)
    assert st.std[0] == 0.0 and st.constant_channels == [0]
    assert st.safe_std()[0] == STD_FLOOR and st.safe_std()[1] == st.std[1]
    with pytest.raises(ValueError, match="non-finite"):
        st.update(np.full((1, 2, 4), np.nan, np.float32))
