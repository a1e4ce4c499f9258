"""Train/val/test assignment and label-scarce subsets, all pure functions of their inputs.

Every random choice is a hash of ``split.seed`` and a name (never a global RNG), so results
do not depend on numpy's generator streams, on the order of inputs, or on process count:

- :func:`assign_splits` (``method=subject|recording``): units (sorted subjects or recording
  names) listed in ``test_subjects``/``val_subjects`` go there; otherwise ``test`` takes
  ``round(test_fraction * n)`` units of the candidates (every unit not listed for val), then
  ``val`` takes ``round(val_fraction * n)`` of the units not in test. Each draw is at least 1
  unit when its fraction is > 0 and at least 2 candidates remain, and always leaves at least
  one unit for train. A unit's rank in a draw is ``sha256(seed, draw, unit)``.
- :func:`random_split_codes` (``method=random``): each window's split is a hash of
  ``(seed, recording name, offset)``, so it can be computed while streaming.
- :func:`label_fraction_subset`: stratified, seeded subsets of labelled windows; a window's
  rank in its class is a hash of ``(seed, index)``, so for one seed the subsets are nested
  (1 % inside 5 % inside 10 %).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import numpy as np

from data_pipeline.config import SplitConfig, canonical_subject
from data_pipeline.errors import DataError

__all__ = [
    "SPLITS",
    "assign_splits",
    "random_split_codes",
    "check_subject_disjoint",
    "label_fraction_subset",
]

SPLITS = ("train", "val", "test")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _key(*parts: object) -> np.uint64:
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def _uniform(key: np.uint64, values: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats, a pure function of ``key`` and each integer of ``values``."""
    h = _splitmix64(_splitmix64(np.asarray(values).astype(np.uint64)) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _natural(s: str) -> tuple:
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _count(fraction: float, n: int) -> int:
    if fraction <= 0 or n == 0:
        return 0
    k = math.floor(fraction * n + 0.5)
    if k == 0 and n >= 2:
        k = 1
    return min(k, n - 1)


def _draw(candidates: list[str], fraction: float, seed: int, draw: str) -> list[str]:
    k = _count(fraction, len(candidates))
    ranked = sorted(
        candidates, key=lambda u: hashlib.sha256(f"{seed}\x00{draw}\x00{u}".encode()).digest()
    )
    return ranked[:k]


def _listed(values: Iterable, known: set[str], field: str) -> list[str]:
    out = [canonical_subject(v) for v in values]
    missing = [s for s in out if s not in known]
    if missing:
        raise DataError(
            f"split.{field} lists subject(s) {missing} that no recording has; known subjects: "
            f"{sorted(known, key=_natural)}"
        )
    return out


def assign_splits(refs: list, cfg: SplitConfig) -> dict[str, str]:
    """Recording name -> ``"train" | "val" | "test"`` for ``split.method=subject|recording``."""
    if cfg.method not in ("subject", "recording"):
        raise DataError(
            f"assign_splits handles split.method=subject|recording, not {cfg.method!r} "
            "(random: random_split_codes; predefined: the window files' own splits)"
        )
    if not refs:
        return {}
    by_subject = cfg.method == "subject"
    unit_of = {r.name: (r.subject if by_subject else r.name) for r in refs}
    units = sorted(set(unit_of.values()), key=_natural)
    known = set(units)
    test = _listed(cfg.test_subjects or [], known, "test_subjects") if by_subject else []
    val = _listed(cfg.val_subjects or [], known, "val_subjects") if by_subject else []
    if not test:
        test = _draw([u for u in units if u not in set(val)], cfg.test_fraction, cfg.seed, "test")
    if not (by_subject and cfg.val_subjects):
        val = _draw([u for u in units if u not in set(test)], cfg.val_fraction, cfg.seed, "val")
    test_set, val_set = set(test), set(val)
    if test_set & val_set:
        raise DataError(f"subjects {sorted(test_set & val_set)} are listed for both test and val")
    split_of = {u: "test" if u in test_set else "val" if u in val_set else "train" for u in units}
    if "train" not in split_of.values():
        raise DataError(
            "no subject is left for the train split; list fewer split.test_subjects/"
            "val_subjects or lower split.test_fraction/val_fraction"
        )
    out = {r.name: split_of[unit_of[r.name]] for r in refs}
    subjects: dict[str, set[str]] = {s: set() for s in SPLITS}
    for r in refs:
        subjects[out[r.name]].add(r.subject)
    check_subject_disjoint(subjects)
    return out


def random_split_codes(recording_name: str, offsets: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """``method=random``: (N,) int8 codes 0/1/2 = train/val/test of the windows at ``offsets``.

    A pure function of ``(seed, recording name, offset)``: test with probability
    ``test_fraction``, val with ``(1 - test_fraction) * val_fraction``.
    """
    u = _uniform(_key("random_split", cfg.seed, recording_name), np.asarray(offsets, np.int64))
    t = cfg.test_fraction
    v = t + (1.0 - t) * cfg.val_fraction
    return np.where(u < t, 2, np.where(u < v, 1, 0)).astype(np.int8)


def check_subject_disjoint(subjects_by_split: dict[str, set[str]]) -> None:
    """DataError naming the subject and the splits if a subject appears in two splits."""
    names = list(subjects_by_split)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(set(subjects_by_split[a]) & set(subjects_by_split[b]), key=_natural)
            if both:
                raise DataError(
                    f"subject {both[0]} appears in both the {a} and the {b} split"
                    f"{f' (and {len(both) - 1} more)' if len(both) > 1 else ''}; splits must "
                    "keep subjects apart: use split.method=subject (or method=random if leaking "
                    "subjects across splits is acceptable)"
                )


def label_fraction_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 indices of a stratified ``fraction`` of the labelled (>= 0) entries.

    Per class ``c`` with ``n_c`` windows: ``round(fraction * n_c)`` but at least 1, chosen by a
    seeded hash of the index; nested across fractions for one seed.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    idx = np.flatnonzero(labels >= 0).astype(np.int64)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    cls = labels[idx].astype(np.int64)
    score = _uniform(_key("label_fraction", seed), idx)
    order = np.lexsort((idx, score, cls))
    cls_sorted = cls[order]
    _, starts, counts = np.unique(cls_sorted, return_index=True, return_counts=True)
    take = np.maximum(1, np.floor(fraction * counts + 0.5).astype(np.int64))
    take = np.minimum(take, counts)
    group = np.repeat(np.arange(counts.size), counts)
    rank = np.arange(cls_sorted.size) - starts[group]
    chosen = idx[order][rank < take[group]]
    return np.sort(chosen).astype(np.int64)
