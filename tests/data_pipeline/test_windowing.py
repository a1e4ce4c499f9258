"""Derived channels and windowing: counts/offsets, label policies, label map, NaN policies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import butter, filtfilt

from data_pipeline.config import ChannelsConfig, GravitySplitConfig, WindowConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import Recording, RecordingRef
from data_pipeline.windowing import derive_channels, make_windows, num_windows


def wcfg(**kw) -> WindowConfig:
    c = WindowConfig(**kw)
    c.validate()
    return c


def rec_of(data, channels, labels=None) -> Recording:
    ref = RecordingRef("r", "1", "", "r.parquet", "0" * 64, len(data))
    return Recording(ref, np.ascontiguousarray(data, np.float32), channels, labels, 50.0)


# --------------------------------------------------------------------------------------------
# counts and offsets


@pytest.mark.parametrize(
    "s, t, stride, tail, offsets",
    [
        (10, 4, 2, "drop", [0, 2, 4, 6]),
        (10, 4, 2, "pad", [0, 2, 4, 6]),  # last full window reaches the end: nothing to pad
        (11, 4, 2, "drop", [0, 2, 4, 6]),
        (11, 4, 2, "pad", [0, 2, 4, 6, 8]),
        (3, 4, 2, "drop", []),
        (3, 4, 2, "pad", [0]),
        (4, 4, 4, "drop", [0]),
        (9, 2, 5, "drop", [0, 5]),  # stride > length leaves gaps
        (9, 2, 5, "pad", [0, 5]),
        (0, 4, 2, "pad", []),
    ],
)
def test_offsets_and_content(s, t, stride, tail, offsets):
    data = np.arange(s * 2, dtype=np.float32).reshape(s, 2)
    w = make_windows(data, None, wcfg(length=t, stride=stride, tail=tail), "r")
    assert w.offset.dtype == np.int64 and w.offset.tolist() == offsets
    assert w.x.shape == (len(offsets), 2, t) and w.x.dtype == np.float32 and w.x.flags.c_contiguous
    assert w.label.dtype == np.int64 and (w.label == -1).all()
    for i, o in enumerate(offsets):
        seg = data[o : o + t]
        assert np.array_equal(w.x[i, :, : len(seg)], seg.T)
        assert (w.x[i, :, len(seg) :] == 0).all()
    assert num_windows(s, t, stride, tail) == len(offsets)


def test_num_windows_matches_brute_force():
    for s in range(0, 40):
        for t in (1, 3, 8):
            for stride in (1, 2, 3, 8, 11):
                drop = [o for o in range(0, s, stride) if o + t <= s]
                pad = list(drop)
                covered = (drop[-1] + t) if drop else 0
                o = (drop[-1] + stride) if drop else 0
                if covered < s and o < s:
                    pad.append(o)
                assert num_windows(s, t, stride, "drop") == len(drop), (s, t, stride)
                assert num_windows(s, t, stride, "pad") == len(pad), (s, t, stride)


def test_hapt_har_sized_recording():
    s = 20598
    w = make_windows(np.zeros((s, 9), np.float32), None, wcfg(length=128, stride=64), "r")
    assert w.x.shape == ((s - 128) // 64 + 1, 9, 128)
    assert w.offset[-1] == 64 * (w.x.shape[0] - 1)


# --------------------------------------------------------------------------------------------
# labels


def windows_labels(labels, policy, length=4, stride=4, tail="drop", label_map=None):
    labels = np.asarray(labels)
    data = np.zeros((labels.size, 1), np.float32)
    return make_windows(data, labels, wcfg(length=length, stride=stride, tail=tail, label_policy=policy, label_map=label_map), "r").label.tolist()


def test_pure_policy():
    labels = [1, 1, 1, 1, 1, 1, 2, 2, -1, 3, 3, 3, 0, 0, 0, 0]
    assert windows_labels(labels, "pure") == [1, -1, -1, 0]


def test_majority_policy_ties_and_unlabelled():
    labels = [
        2, 2, 1, -1,  # 2 wins
        3, 1, 3, 1,  # tie 1 vs 3 -> smallest
        -1, -1, -1, 5,  # only labelled sample counts
        -1, -1, -1, -1,  # nothing labelled
        7, 7, 7, 7,
    ]
    assert windows_labels(labels, "majority") == [2, 1, 5, -1, 7]


def test_center_policy():
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    # T=4: centre index 2; T=5: centre index 2
    assert windows_labels(labels, "center", length=4, stride=3) == [2, 5, 8]
    assert windows_labels(labels, "center", length=5, stride=5) == [2, 7]


def test_padded_samples_are_unlabelled():
    labels = [3, 3, 3, 3, 3, 3]
    assert windows_labels(labels, "pure", tail="pad") == [3, -1]
    assert windows_labels(labels, "majority", tail="pad") == [3, 3]
    assert windows_labels(labels, "center", tail="pad") == [3, -1]  # centre (index 2) is padding


def test_label_map_applies_per_sample():
    hapt_like = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5}
    labels = [1, 1, 1, 1, 6, 6, 6, 6, 7, 7, 7, 7, -1, -1, -1, -1, 2, 2, 7, 7]
    assert windows_labels(labels, "pure", label_map=hapt_like) == [0, 5, -1, -1, -1]
    assert windows_labels(labels, "majority", label_map=hapt_like) == [0, 5, -1, -1, 1]
    # merging raw classes: 7 and 8 both -> 6 make a pure window
    assert windows_labels([7, 8, 7, 8], "pure", label_map={7: 6, 8: 6}) == [6]
    assert windows_labels([7, 8, 7, 8], "pure") == [-1]
    assert windows_labels([1, 1, 1, 1], "pure", label_map={}) == [-1]


def test_label_length_mismatch_is_an_error():
    with pytest.raises(DataError, match="r.csv: 3 labels for 4 samples"):
        make_windows(np.zeros((4, 1), np.float32), np.zeros(3, np.int64), wcfg(length=2, stride=2), "r.csv")


# --------------------------------------------------------------------------------------------
# NaN / inf


def nan_data():
    data = np.arange(40, dtype=np.float32).reshape(20, 2)
    data[9, 1] = np.nan
    data[13, 0] = np.inf
    return data


def test_nan_error_names_file_row_column_and_fix():
    with pytest.raises(DataError) as e:
        make_windows(nan_data(), None, wcfg(length=4, stride=4), "subject01_session0.parquet", channels=["acc_x", "acc_y"])
    msg = str(e.value)
    assert "subject01_session0.parquet" in msg and "row 9, column 1 ('acc_y')" in msg
    assert "window.nan_policy=drop_window" in msg and "window.nan_policy=zero_fill" in msg
    with pytest.raises(DataError, match=r"f.csv: non-finite value inf at row 13, column 0"):
        d = nan_data()
        d[9, 1] = 0
        make_windows(d, None, wcfg(length=4, stride=4), "f.csv")


def test_nan_drop_window():
    w = make_windows(nan_data(), np.arange(20), wcfg(length=4, stride=4, nan_policy="drop_window", label_policy="center"), "r")
    assert w.offset.tolist() == [0, 4, 16] and w.num_dropped_nan == 2
    assert w.label.tolist() == [2, 6, 18]
    assert np.isfinite(w.x).all()
    # overlapping windows: every window touching row 9 or 13 goes
    w = make_windows(nan_data(), None, wcfg(length=4, stride=2, nan_policy="drop_window"), "r")
    assert w.offset.tolist() == [0, 2, 4, 14, 16] and w.num_dropped_nan == 4


def test_nan_zero_fill():
    data = nan_data()
    w = make_windows(data, None, wcfg(length=4, stride=4, nan_policy="zero_fill"), "r")
    assert w.offset.tolist() == [0, 4, 8, 12, 16] and w.num_dropped_nan == 0
    assert w.x[2, 1, 1] == 0 and w.x[3, 0, 1] == 0
    expected = np.where(np.isfinite(data), data, 0).reshape(5, 4, 2).transpose(0, 2, 1)
    assert np.array_equal(w.x, expected)
    assert np.isnan(data[9, 1])  # input untouched


def test_nan_outside_every_window_is_ignored():
    data = np.zeros((10, 1), np.float32)
    data[9] = np.nan  # dropped tail
    w = make_windows(data, None, wcfg(length=4, stride=4), "r")
    assert w.offset.tolist() == [0, 4]


# --------------------------------------------------------------------------------------------
# derived channels


def har_channels(**kw) -> ChannelsConfig:
    c = ChannelsConfig(gravity_split=GravitySplitConfig(), **kw)
    c.validate()
    return c


def test_gravity_split_matches_scipy_filtfilt():
    fs = 50.0
    t = np.arange(3000) / fs
    acc = np.stack(
        [0.98 + 0.3 * np.sin(2 * np.pi * 2.0 * t), -0.1 + 0.05 * np.sin(2 * np.pi * 0.05 * t), 0.2 * np.cos(2 * np.pi * 5 * t)],
        axis=1,
    ).astype(np.float32)
    gyro = np.random.default_rng(0).normal(size=(3000, 1)).astype(np.float32)
    rec = rec_of(np.concatenate([acc, gyro], axis=1), ["acc_x", "acc_y", "acc_z", "gyro_x"])
    out, names = derive_channels(rec, har_channels(), fs)
    assert names == ["acc_x", "acc_y", "acc_z", "gyro_x", "body_acc_x", "gravity_acc_x",
                     "body_acc_y", "gravity_acc_y", "body_acc_z", "gravity_acc_z"]
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (3000, 10)
    b, a = butter(3, 0.3, btype="low", fs=fs)
    for k, col in enumerate(["acc_x", "acc_y", "acc_z"]):
        ref = filtfilt(b, a, acc[:, k].astype(np.float64))
        g = out[:, names.index(f"gravity_{col}")]
        body = out[:, names.index(f"body_{col}")]
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-6)
        # body + gravity == total (up to the float32 rounding of each output)
        np.testing.assert_allclose(body.astype(np.float64) + g, acc[:, k], rtol=0, atol=1e-6)
    # the 2 Hz motion goes to body, the constant to gravity (away from the edges)
    mid = slice(500, 2500)
    assert np.abs(out[mid, names.index("gravity_acc_x")] - 0.98).max() < 0.01
    assert np.abs(out[mid, names.index("body_acc_z")] - acc[mid, 2]).max() < 0.01
    assert np.array_equal(out[:, 3], gyro[:, 0])


def test_select_aliases_and_har_layout():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(500, 6)).astype(np.float32)
    chans = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    cfg = har_channels(
        aliases={f"total_acc_{a}": f"acc_{a}" for a in "xyz"} | {f"body_gyro_{a}": f"gyro_{a}" for a in "xyz"},
        select=[f"body_acc_{a}" for a in "xyz"] + [f"body_gyro_{a}" for a in "xyz"] + [f"total_acc_{a}" for a in "xyz"],
    )
    out, names = derive_channels(rec_of(data, chans), cfg, 50.0)
    assert names == cfg.select and out.shape == (500, 9)
    assert np.array_equal(out[:, 3:6], data[:, 3:6]) and np.array_equal(out[:, 6:9], data[:, 0:3])
    full, full_names = derive_channels(rec_of(data, chans), har_channels(), 50.0)
    assert np.array_equal(out[:, 0], full[:, full_names.index("body_acc_x")])
    # no gravity split: plain re-ordering, aliases appended when select is null
    plain, plain_names = derive_channels(rec_of(data, chans), ChannelsConfig(aliases={"t": "acc_y"}), None)
    assert plain_names == chans + ["t"] and np.array_equal(plain[:, 6], data[:, 1])


def test_derive_errors():
    data = np.zeros((100, 2), np.float32)
    rec = rec_of(data, ["acc_x", "gyro_x"])
    with pytest.raises(DataError, match=r"r.parquet: channels.select names unknown channel\(s\) \['gyro_q'\]; available: \['acc_x', 'gyro_x'\]"):
        derive_channels(rec, ChannelsConfig(select=["gyro_q"]), 50.0)
    with pytest.raises(DataError, match=r"gravity_split.columns names unknown channel\(s\) \['acc_y'"):
        derive_channels(rec, har_channels(), 50.0)
    g = ChannelsConfig(gravity_split=GravitySplitConfig(columns=["acc_x"]))
    with pytest.raises(DataError, match=r"r.parquet: .*set source.sample_rate_hz"):
        derive_channels(rec, g, None)
    with pytest.raises(DataError, match="cutoff_hz=0.3 must be below half the sample rate"):
        derive_channels(rec, g, 0.5)
    with pytest.raises(DataError, match=r"aliases.t points to unknown channel 'nope'"):
        derive_channels(rec, ChannelsConfig(aliases={"t": "nope"}), None)
    # no rate needed when the derived channels are not selected
    out, names = derive_channels(rec, ChannelsConfig(gravity_split=GravitySplitConfig(columns=["acc_x"]), select=["gyro_x"]), None)
    assert names == ["gyro_x"]


def test_gravity_split_keeps_nan_local_and_short_recordings():
    fs = 50.0
    t = np.arange(1000) / fs
    x = (1.0 + 0.2 * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    x_nan = x.copy()
    x_nan[400] = np.nan
    g = ChannelsConfig(gravity_split=GravitySplitConfig(columns=["acc_x"]))
    out, names = derive_channels(rec_of(x_nan[:, None], ["acc_x"]), g, fs)
    bad = ~np.isfinite(out).all(axis=1)
    assert np.flatnonzero(bad).tolist() == [400]  # the NaN stays at its row in every channel
    clean, _ = derive_channels(rec_of(x[:, None], ["acc_x"]), g, fs)
    far = np.r_[0:300, 500:1000]
    np.testing.assert_allclose(out[far], clean[far], atol=1e-3)
    with pytest.raises(DataError, match="row 400"):
        make_windows(out, None, wcfg(length=128, stride=64), "r", channels=names)
    for n in (0, 1, 2, 5, 13):  # shorter than the filter's default padding
        o, _ = derive_channels(rec_of(x[:n, None], ["acc_x"]), g, fs)
        assert o.shape == (n, 3) and np.isfinite(o).all()
