"""Classification metrics (scikit-learn): accuracy, macro-F1, per-class precision/recall, confusion."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

__all__ = ["classification_metrics", "mean_std"]


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int] | None = None
) -> dict:
    """JSON-able metrics of predictions ``y_pred`` against ``y_true``.

    ``labels`` fixes the class order (rows/columns of the confusion matrix, per-class entries);
    by default the sorted union of both. Classes never predicted get precision 0 (no warning).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D shapes")
    if y_true.size == 0:
        raise ValueError("no labelled windows to score")
    labels = [int(c) for c in (np.union1d(y_true, y_pred) if labels is None else labels)]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "num_samples": int(y_true.size),
        "labels": labels,
        "per_class": {
            str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) of a list of numbers."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
