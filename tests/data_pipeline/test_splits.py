"""Splits: subject/recording assignment, random codes, disjointness, label-fraction subsets."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.config import SplitConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import RecordingRef
from data_pipeline.splits import (
    SPLITS,
    assign_splits,
    check_subject_disjoint,
    label_fraction_subset,
    random_split_codes,
)

UCI_TEST = [2, 4, 9, 10, 12, 13, 18, 20, 24]


def refs_for(subjects, sessions=2):
    return [
        RecordingRef(f"subject{s:02d}_session{k}", str(s), str(k), f"subject{s:02d}_session{k}.parquet", "", 100)
        for s in subjects
        for k in range(sessions)
    ]


def scfg(**kw) -> SplitConfig:
    c = SplitConfig(**kw)
    c.validate()
    return c


def subjects_by_split(refs, assignment):
    out = {s: set() for s in SPLITS}
    for r in refs:
        out[assignment[r.name]].add(r.subject)
    return out


def test_explicit_test_subjects_and_drawn_val():
    refs = refs_for(range(1, 31))
    a = assign_splits(refs, scfg(test_subjects=UCI_TEST, val_fraction=0.1))
    assert set(a) == {r.name for r in refs}
    by = subjects_by_split(refs, a)
    assert by["test"] == {str(s) for s in UCI_TEST}
    assert len(by["val"]) == 2  # round(0.1 * 21)
    assert len(by["train"]) == 19
    assert not (by["val"] & by["test"]) and not (by["train"] & by["val"])
    # both sessions of a subject land together
    for s in range(1, 31):
        assert a[f"subject{s:02d}_session0"] == a[f"subject{s:02d}_session1"]
    # "02" and 2 name the same subject
    b = assign_splits(refs, scfg(test_subjects=[f"{s:02d}" for s in UCI_TEST], val_fraction=0.1))
    assert b == a


def test_explicit_val_and_test():
    refs = refs_for(range(1, 8), sessions=1)
    a = assign_splits(refs, scfg(test_subjects=[1, 2], val_subjects=["3"]))
    assert subjects_by_split(refs, a) == {"train": {"4", "5", "6", "7"}, "val": {"3"}, "test": {"1", "2"}}
    # val listed, test drawn from the others
    b = assign_splits(refs, scfg(val_subjects=[3], test_fraction=0.3))
    by = subjects_by_split(refs, b)
    assert by["val"] == {"3"} and len(by["test"]) == 2 and "3" not in by["test"]


def test_unknown_listed_subject_is_named():
    refs = refs_for(range(1, 5))
    with pytest.raises(DataError, match=r"split.test_subjects lists subject\(s\) \['99'\].*known subjects: \['1', '2', '3', '4'\]"):
        assign_splits(refs, scfg(test_subjects=[1, 99]))
    with pytest.raises(DataError, match=r"val_subjects lists subject\(s\) \['x'\]"):
        assign_splits(refs, scfg(val_subjects=["x"]))
    with pytest.raises(DataError, match="no subject is left for the train split"):
        assign_splits(refs, scfg(test_subjects=[1, 2], val_subjects=[3, 4]))


@pytest.mark.parametrize(
    "n, tf, vf, expect",
    [
        (30, 0.2, 0.1, (6, 2)),  # round(0.2*30)=6, round(0.1*24)=2
        (10, 0.25, 0.0, (3, 0)),  # 2.5 rounds half up
        (3, 0.1, 0.1, (1, 1)),  # at least one each while >= 2 remain
        (2, 0.1, 0.1, (1, 0)),  # a single remaining unit stays in train
        (1, 0.5, 0.5, (0, 0)),
        (4, 0.9, 0.0, (3, 0)),  # never empties train
        (5, 0.0, 0.0, (0, 0)),
    ],
)
def test_fraction_counts(n, tf, vf, expect):
    refs = refs_for(range(1, n + 1), sessions=1)
    by = subjects_by_split(refs, assign_splits(refs, scfg(test_fraction=tf, val_fraction=vf)))
    assert (len(by["test"]), len(by["val"])) == expect
    assert len(by["train"]) == n - sum(expect) >= 1


def test_seeded_determinism():
    refs = refs_for(range(1, 31))
    a = assign_splits(refs, scfg(seed=3))
    assert a == assign_splits(list(reversed(refs)), scfg(seed=3))  # order of refs does not matter
    assert a == assign_splits(refs, scfg(seed=3))
    others = [assign_splits(refs, scfg(seed=s)) for s in range(4, 9)]
    assert any(o != a for o in others)


def test_recording_method():
    one_each = [RecordingRef(f"rec{i}", f"p{i}", "", f"rec{i}.csv", "", 10) for i in range(10)]
    a = assign_splits(one_each, scfg(method="recording", test_fraction=0.2, val_fraction=0.25))
    assert sorted(a.values()).count("test") == 2 and sorted(a.values()).count("val") == 2
    # a subject whose recordings land in two splits is refused
    many = refs_for(range(1, 4), sessions=4)
    with pytest.raises(DataError, match=r"subject \d+ appears in both the \w+ and the \w+ split"):
        assign_splits(many, scfg(method="recording", test_fraction=0.3, val_fraction=0.0))
    with pytest.raises(DataError, match="random_split_codes"):
        assign_splits(many, scfg(method="random"))


def test_check_subject_disjoint():
    check_subject_disjoint({"train": {"1", "2"}, "val": {"3"}, "test": {"4"}})
    with pytest.raises(DataError, match=r"subject 3 appears in both the val and the test split"):
        check_subject_disjoint({"train": {"1"}, "val": {"3"}, "test": {"3", "4"}})
    with pytest.raises(DataError, match=r"subject 2 appears in both the train and the test split \(and 1 more\)"):
        check_subject_disjoint({"train": {"2", "10"}, "val": set(), "test": {"10", "2"}})


def test_random_split_codes_pure_and_proportional():
    cfg = scfg(method="random", test_fraction=0.2, val_fraction=0.25, seed=7)
    offsets = np.arange(0, 64 * 20000, 64, dtype=np.int64)
    codes = random_split_codes("subject01_session0", offsets, cfg)
    assert codes.dtype == np.int8 and codes.shape == offsets.shape and set(np.unique(codes)) <= {0, 1, 2}
    frac = np.bincount(codes, minlength=3) / codes.size
    np.testing.assert_allclose(frac, [0.6, 0.2, 0.2], atol=0.015)
    # streamable: any chunking / order of offsets gives the same code per offset
    perm = np.random.default_rng(0).permutation(offsets.size)
    assert np.array_equal(random_split_codes("subject01_session0", offsets[perm], cfg), codes[perm])
    assert np.array_equal(random_split_codes("subject01_session0", offsets[:10], cfg), codes[:10])
    assert not np.array_equal(random_split_codes("subject01_session1", offsets, cfg), codes)
    assert not np.array_equal(random_split_codes("subject01_session0", offsets, scfg(method="random", seed=8)), codes)
    assert (random_split_codes("r", offsets, scfg(method="random", test_fraction=0.0, val_fraction=0.0)) == 0).all()


def test_label_fraction_subset_stratified_and_seeded():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(1000, 0), np.full(300, 1), np.full(20, 2), np.full(3, 5), np.full(500, -1)])
    labels = labels[rng.permutation(labels.size)]
    idx = label_fraction_subset(labels, 0.05, seed=1)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert (labels[idx] >= 0).all()
    counts = {c: int((labels[idx] == c).sum()) for c in (0, 1, 2, 5)}
    assert counts == {0: 50, 1: 15, 2: 1, 5: 1}  # round(0.05 n_c), at least 1 per class
    assert np.array_equal(idx, label_fraction_subset(labels, 0.05, seed=1))
    assert not np.array_equal(idx, label_fraction_subset(labels, 0.05, seed=2))
    full = label_fraction_subset(labels, 1.0, seed=1)
    assert np.array_equal(full, np.flatnonzero(labels >= 0))
    assert label_fraction_subset(np.full(5, -1), 0.1, 0).size == 0
    with pytest.raises(ValueError):
        label_fraction_subset(labels, 0.0, 0)


def test_label_fraction_subsets_are_nested():
    labels = np.random.default_rng(3).integers(-1, 6, size=5000)
    for seed in (0, 1):
        s1, s5, s10 = (set(label_fraction_subset(labels, f, seed).tolist()) for f in (0.01, 0.05, 0.1))
        assert s1 <= s5 <= s10
        assert len(s1) < len(s5) < len(s10)
