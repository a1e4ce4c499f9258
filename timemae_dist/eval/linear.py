"""Linear probe: frozen mean-pooled representations -> StandardScaler + LogisticRegression.

As the official TimeMAE linear evaluation (which fits a one-vs-rest LogisticRegression with
``C = 1``), except that the regularisation strength ``C`` and the multi-class scheme (one-vs-rest
or multinomial) are chosen on the **validation** split only; the test split is scored once
with the chosen probe.
:func:`linear_probe_val_accuracy` is the cheap version the trainer calls on rank 0 during
pretraining (logged as ``eval/linear_val_acc``): fixed ``C``, bounded train/val subsets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from data_pipeline.splits import label_fraction_subset
from data_pipeline.store import Store
from timemae_dist.eval.config import MULTI_CLASS
from timemae_dist.eval.errors import EvalError

__all__ = ["MULTI_CLASS", "ProbeSelection", "fit_probe", "probe_iterations", "select_probe", "linear_probe_val_accuracy"]


def fit_probe(Z: np.ndarray, y: np.ndarray, C: float, max_iter: int = 2000, multi_class: str = "multinomial") -> Pipeline:
    """StandardScaler + LogisticRegression (LBFGS, deterministic) fit on ``(Z, y)``.

    ``multi_class``: ``"multinomial"`` (one softmax over the classes) or ``"ovr"`` (one binary
    logistic regression per class, the official TimeMAE probe's ``multi_class='ovr'``; newer
    scikit-learn spells it ``OneVsRestClassifier``).
    """
    if multi_class not in MULTI_CLASS:
        raise EvalError(f"linear.multi_class: {multi_class!r} is not one of {', '.join(MULTI_CLASS)}")
    if np.unique(y).size < 2:
        raise EvalError(
            f"the probe's train set has {np.unique(y).size} class(es); it needs at least 2 "
            "(raise the label fraction or check the store's labels)"
        )
    lr = LogisticRegression(C=float(C), max_iter=int(max_iter))
    clf = make_pipeline(StandardScaler(), lr if multi_class == "multinomial" else OneVsRestClassifier(lr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as converged=False instead
        clf.fit(np.asarray(Z, np.float64), y)
    return clf


def probe_iterations(probe: Pipeline) -> int:
    """LBFGS iterations of a fitted probe (the most any of its binary problems took, for ovr)."""
    est = probe[-1]
    parts = est.estimators_ if isinstance(est, OneVsRestClassifier) else [est]
    return int(max(np.max(e.n_iter_) for e in parts))


@dataclass
class ProbeSelection:
    """The probe chosen on val: its C and multi-class scheme, val accuracies tried, the fitted pipeline."""

    C: float
    val_accuracy: float
    val_accuracy_by_C: dict[str, float]  # of the chosen multi_class
    probe: Pipeline = field(repr=False)
    converged: bool = True
    multi_class: str = "multinomial"
    val_accuracy_by_multi_class: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "C": self.C,
            "multi_class": self.multi_class,
            "val_accuracy": self.val_accuracy,
            "val_accuracy_by_C": self.val_accuracy_by_C,
            "val_accuracy_by_multi_class": self.val_accuracy_by_multi_class,
            "converged": self.converged,
        }


def select_probe(
    Z_train: np.ndarray,
    y_train: np.ndarray,
    Z_val: np.ndarray,
    y_val: np.ndarray,
    C_grid: Sequence[float],
    max_iter: int = 2000,
    extend_edges: int = 0,
    multi_class: Sequence[str] = ("multinomial",),
) -> ProbeSelection:
    """Fit one probe per (``multi_class``, ``C``) on train, keep the best val accuracy.

    Ties: the earlier ``multi_class`` in its list, then the first ``C`` in ``C_grid``.
    ``extend_edges``: when the best ``C`` of a scheme is the grid's largest (smallest), also try
    up to that many values beyond it, each 10x larger (smaller), stopping at the first that does
    not improve val accuracy; a choice at the edge of a grid means the grid was too narrow. A
    grid of one ``C`` is a fixed choice and is never extended.
    Only train and val representations are arguments: the test split cannot influence the choice.
    """
    if len(y_val) == 0:
        raise EvalError("the validation split has no labelled windows; model selection needs them")
    if not multi_class:
        raise EvalError("linear.multi_class: list at least one of multinomial, ovr")
    Z_val64 = np.asarray(Z_val, np.float64)
    overall: ProbeSelection | None = None
    by_mc: dict[str, dict[str, float]] = {}
    for mc in multi_class:
        best: ProbeSelection | None = None
        by_c: dict[str, float] = {}

        def try_c(C: float) -> bool:
            """Fit and score one C; True when it is the new best of this scheme."""
            nonlocal best
            probe = fit_probe(Z_train, y_train, C, max_iter, mc)
            acc = float(np.mean(probe.predict(Z_val64) == y_val))
            by_c[repr(float(C))] = acc
            if best is None or acc > best.val_accuracy:
                best = ProbeSelection(float(C), acc, by_c, probe, probe_iterations(probe) < max_iter, mc)
                return True
            return False

        for C in C_grid:
            try_c(C)
        assert best is not None
        for edge, factor in ((max(C_grid), 10.0), (min(C_grid), 0.1)):
            if best.C != float(edge) or len(C_grid) < 2:
                continue
            C = float(edge)
            for _ in range(extend_edges):
                C *= factor
                if not try_c(C):
                    break
        best.val_accuracy_by_C = by_c
        by_mc[mc] = by_c
        if overall is None or best.val_accuracy > overall.val_accuracy:
            overall = best
    assert overall is not None
    overall.val_accuracy_by_multi_class = by_mc
    return overall


def _bounded_labelled(store: Store, split: str, max_windows: int | None, seed: int) -> np.ndarray:
    labels = store.read_column(split, "label")
    num_labelled = int((labels >= 0).sum())
    if max_windows is None or num_labelled <= max_windows:
        return np.flatnonzero(labels >= 0).astype(np.int64)
    idx = label_fraction_subset(labels, max_windows / num_labelled, seed)  # stratified, seeded
    return idx[:max_windows] if idx.size > max_windows else idx


def linear_probe_val_accuracy(
    model,
    store: Store | str,
    max_windows: int | None = 2048,
    *,
    C: float = 1.0,
    normalize: bool = True,
    batch_size: int = 256,
    train_split: str = "train",
    val_split: str = "val",
    seed: int = 0,
    max_iter: int = 1000,
    multi_class: str = "multinomial",
) -> float:
    """Val accuracy of a linear probe on the current encoder (for ``eval/linear_val_acc``).

    Cheap and side-effect free: at most ``max_windows`` labelled windows of each split (a
    stratified seeded subset, the same every call), a fixed ``C`` (no selection, so the number
    is an honest val estimate), ``model.encode`` under ``no_grad`` in eval mode with the
    model's train/eval mode restored, global RNGs untouched. Call it on rank 0 with the bare
    model or its DeepSpeed/DDP wrapper. Returns NaN if a split has no labels.
    """
    from timemae_dist.eval.features import encode_split, open_eval_store

    st = open_eval_store(store, (train_split, val_split))
    tr = _bounded_labelled(st, train_split, max_windows, seed)
    va = _bounded_labelled(st, val_split, max_windows, seed)
    y_tr = st.read_column(train_split, "label")[tr]
    y_va = st.read_column(val_split, "label")[va]
    if tr.size == 0 or va.size == 0 or np.unique(y_tr).size < 2:
        return float("nan")
    Z_tr = encode_split(model, st, train_split, tr, batch_size=batch_size, normalize=normalize)
    Z_va = encode_split(model, st, val_split, va, batch_size=batch_size, normalize=normalize)
    if not (np.isfinite(Z_tr).all() and np.isfinite(Z_va).all()):
        return float("nan")
    probe = fit_probe(Z_tr, y_tr, C, max_iter, multi_class)
    return float(np.mean(probe.predict(np.asarray(Z_va, np.float64)) == y_va))
