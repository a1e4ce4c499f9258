"""The evaluation protocol behind ``timemae evaluate linear|finetune``.

For every (model, label fraction, seed):

1. the train set is the stratified seeded ``label_fraction_subset`` of the labelled train
   windows (seed = the run's seed);
2. everything that is chosen -- the probe's ``C``, the fine-tuning epoch kept by early
   stopping -- is chosen on the validation split; the functions that choose
   (:func:`~timemae_dist.eval.linear.select_probe`, :func:`~timemae_dist.eval.finetune.finetune`)
   never receive test data;
3. the test split is read only after that and scored once with the selected model.

Models: ``pretrained`` (the checkpoint) and, with ``baselines``, ``random_init`` (same
architecture, fresh seeded weights, same protocol) and ``scratch`` (supervised from scratch:
random init + head trained end to end with the fine-tuning loop).
Results are summarised as mean +- std over seeds per (model, protocol, fraction).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from data_pipeline.splits import label_fraction_subset
from data_pipeline.store import Store
from data_pipeline.typedconfig import to_dict
from timemae_dist.eval.baselines import random_init_encoder, scratch_classifier
from timemae_dist.eval.config import EvalConfig
from timemae_dist.eval.errors import EvalError
from timemae_dist.eval.features import (
    check_compatible,
    encode_split,
    labelled_indices,
    load_encoder,
    open_eval_store,
    read_windows,
    resolve_device,
)
from timemae_dist.eval.finetune import build_classifier, class_index, finetune, init_head_from_probe, predict
from timemae_dist.eval.linear import select_probe
from timemae_dist.eval.metrics import classification_metrics, mean_std
from timemae_dist.eval.report import environment, checkpoint_sha256, manifest_sha256

__all__ = ["EvalData", "run_evaluation", "model_plan", "summarise", "headline"]

Kind = Literal["linear", "finetune"]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class EvalData:
    """Labelled windows of the store's splits; test is read only when first asked for."""

    def __init__(self, store: Store, cfg: EvalConfig):
        self.store, self.cfg = store, cfg
        self.train_labels_all = store.read_column(cfg.train_split, "label")
        self.train_idx, self.y_train = labelled_indices(store, cfg.train_split)
        self.val_idx, self.y_val = labelled_indices(store, cfg.val_split)
        for split, idx in ((cfg.train_split, self.train_idx), (cfg.val_split, self.val_idx)):
            if idx.size == 0:
                raise EvalError(
                    f"split {split!r} of store {str(store.path)!r} has no labelled windows; evaluation "
                    "needs labelled train and val windows (check the data config's label column/policy)"
                )
        # Classes the classifier knows: train + val labels (never test).
        self.classes = np.union1d(self.y_train, self.y_val).astype(np.int64)
        self._windows: dict[str, np.ndarray] = {}
        self._test: tuple[np.ndarray, np.ndarray] | None = None

    def subset_positions(self, fraction: float, seed: int) -> np.ndarray:
        """Rows of the labelled train arrays in the stratified seeded ``fraction`` subset."""
        sub = label_fraction_subset(self.train_labels_all, fraction, seed)
        return np.searchsorted(self.train_idx, sub)

    def windows(self, which: Literal["train", "val"]) -> np.ndarray:
        if which not in self._windows:
            split, idx = (
                (self.cfg.train_split, self.train_idx) if which == "train" else (self.cfg.val_split, self.val_idx)
            )
            self._windows[which] = read_windows(self.store, split, idx, self.cfg.normalize)
        return self._windows[which]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, labels)`` of the labelled test windows (called after selection only)."""
        if self._test is None:
            idx, y = labelled_indices(self.store, self.cfg.test_split)
            if idx.size == 0:
                raise EvalError(f"split {self.cfg.test_split!r} has no labelled windows to report on")
            self._test = (idx, y)
        return self._test

    def test_windows(self) -> np.ndarray:
        if "test" not in self._windows:
            self._windows["test"] = read_windows(self.store, self.cfg.test_split, self.test()[0], self.cfg.normalize)
        return self._windows["test"]

    def report_labels(self) -> list[int]:
        return [int(c) for c in np.union1d(self.classes, self.test()[1])]


def model_plan(kind: Kind, baselines: bool, scratch: bool = True) -> list[tuple[str, Kind]]:
    """``(model, protocol)`` pairs a command evaluates."""
    plan: list[tuple[str, Kind]] = [("pretrained", kind)]
    if baselines:
        if kind == "linear":
            plan.append(("random_init", "linear"))
        if scratch or kind == "finetune":
            plan.append(("scratch", "finetune"))  # random init + fine-tuning == supervised from scratch
    return plan


class _FeatureCache:
    """Representations per encoder (pretrained: once; random-init: per seed)."""

    def __init__(self, data: EvalData, cfg: EvalConfig):
        self.data, self.cfg, self._cache = data, cfg, {}

    def get(self, key, model, which: str) -> np.ndarray:
        if (key, which) not in self._cache:
            d, c = self.data, self.cfg
            split, idx = {
                "train": (c.train_split, d.train_idx),
                "val": (c.val_split, d.val_idx),
                "test": (c.test_split, d.test()[0] if which == "test" else None),
            }[which]
            self._cache[(key, which)] = encode_split(
                model, d.store, split, idx, batch_size=c.batch_size, normalize=c.normalize
            )
        return self._cache[(key, which)]

    def drop(self, key) -> None:
        for k in [k for k in self._cache if k[0] == key]:
            del self._cache[k]


def _linear_run(data, feats, cfg, name, model, fraction, seed, device) -> dict:
    key = "pretrained" if name == "pretrained" else (name, seed)
    encoder = model if name == "pretrained" else random_init_encoder(model.config, seed, device)
    pos = data.subset_positions(fraction, seed)
    sel = select_probe(
        feats.get(key, encoder, "train")[pos], data.y_train[pos],
        feats.get(key, encoder, "val"), data.y_val,
        cfg.linear.C_grid, cfg.linear.max_iter, cfg.linear.extend_edges, cfg.linear.multi_class,
    )
    # selection done: now (and only now) the test split is read and scored once
    y_pred = sel.probe.predict(np.asarray(feats.get(key, encoder, "test"), np.float64))
    if name != "pretrained":
        feats.drop(key)
    return {"num_train": int(pos.size), "selection": sel.to_dict(), "val_accuracy": sel.val_accuracy, "y_pred": y_pred}


def _probe_for_head(cfg, z_tr, y_tr, z_va, y_va):
    """The multinomial probe (C chosen on val) on the frozen encoder's train-subset representations."""
    return select_probe(z_tr, y_tr, z_va, y_va, cfg.linear.C_grid, cfg.linear.max_iter, cfg.linear.extend_edges,
                        ("multinomial",))


def _finetune_run(data, feats, cfg, name, model, fraction, seed, device) -> dict:
    pos = data.subset_positions(fraction, seed)
    K = len(data.classes)
    x_tr, y_tr = data.windows("train")[pos], class_index(data.classes, data.y_train[pos])
    x_va, y_va = data.windows("val"), class_index(data.classes, data.y_val)
    head_inits = list(cfg.finetune.head_init) if name == "pretrained" else ["random"]
    probe = None
    best = None
    tried: list[dict] = []
    models: list = []
    for head_init in head_inits:
        if head_init == "probe" and probe is None:
            probe = _probe_for_head(cfg, feats.get("pretrained", model, "train")[pos], y_tr,
                                    feats.get("pretrained", model, "val"), y_va)
        for lr in cfg.finetune.lrs:  # each a full run from the same init; val keeps one
            if name == "pretrained":
                clf = build_classifier(model.config, K, pretrained=model, seed=seed).to(device)
                if head_init == "probe":
                    init_head_from_probe(clf, probe.probe)
            else:
                clf = scratch_classifier(model.config, K, seed, device)
            res = finetune(
                clf, x_tr, y_tr, x_va, y_va,
                dataclasses.replace(cfg.finetune, lr=lr), seed, eval_batch_size=cfg.batch_size,
            )
            tried.append({"head_init": head_init, "lr": float(lr), "val_accuracy": res.val_accuracy,
                          "val_loss": res.val_loss})
            models.append(clf)
            if best is None or (res.val_accuracy, -res.val_loss) > (best[1].val_accuracy, -best[1].val_loss):
                best = (clf, res, lr, head_init)
    clf, res, lr, head_init = best
    by_lr = {repr(t["lr"]): t["val_accuracy"] for t in tried if t["head_init"] == head_init}
    selection = {**res.to_dict(), "lr": float(lr), "val_accuracy_by_lr": by_lr, "head_init": head_init,
                 "tried": tried}
    if probe is not None:
        selection["head_probe"] = {"C": probe.C, "val_accuracy": probe.val_accuracy}
    # selection done: now (and only now) the test split is read and scored once
    y_pred = data.classes[predict(clf, data.test_windows(), cfg.batch_size)]
    if len(models) > 1:  # what the choice did, for the report (after it was made; never an input to it)
        y_test = data.test()[1]
        for t, m in zip(tried, models):
            pred = y_pred if m is clf else data.classes[predict(m, data.test_windows(), cfg.batch_size)]
            t["test_accuracy_after_selection"] = float(np.mean(pred == y_test))
    return {"num_train": int(pos.size), "selection": selection, "val_accuracy": res.val_accuracy, "y_pred": y_pred}


def _choice(selection: dict) -> str:
    """`` lr=... head=...`` for a fine-tuning run that chose among several (empty otherwise)."""
    if len(selection.get("tried", ())) < 2:
        return ""
    return f" lr={selection['lr']:g} head={selection['head_init']}"


def summarise(rows: list[dict]) -> list[dict]:
    """Mean +- std over seeds per (model, protocol, label fraction), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["protocol"], r["label_fraction"]), []).append(r)
    out = []
    for (model, protocol, fraction), rs in groups.items():
        entry = {"model": model, "protocol": protocol, "label_fraction": fraction, "num_seeds": len(rs),
                 "seeds": [r["seed"] for r in rs], "num_train": rs[0]["num_train"]}
        for metric in ("val_accuracy", "accuracy", "macro_f1"):
            m, s = mean_std([r[metric] for r in rs])
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = m, s
        out.append(entry)
    return out


def headline(rows: list[dict], summary: list[dict], kind: Kind) -> dict:
    """The pretrained model at label fraction 1.0 (else the first fraction), mean over seeds."""
    pre = [s for s in summary if s["model"] == "pretrained" and s["protocol"] == kind]
    top = next((s for s in pre if s["label_fraction"] == 1.0), pre[0])
    first = next(r for r in rows if r["model"] == "pretrained" and r["label_fraction"] == top["label_fraction"])
    return {
        "split": "test",
        "selected_on": "val",
        "protocol": kind,
        "model": "pretrained",
        "label_fraction": top["label_fraction"],
        "num_seeds": top["num_seeds"],
        "accuracy": top["accuracy_mean"],
        "accuracy_std": top["accuracy_std"],
        "macro_f1": top["macro_f1_mean"],
        "macro_f1_std": top["macro_f1_std"],
        "val_accuracy": top["val_accuracy_mean"],
        "per_class": first["test"]["per_class"],
        "confusion_matrix": first["test"]["confusion_matrix"],
        "confusion_labels": first["test"]["labels"],
        "confusion_seed": first["seed"],
    }


def run_evaluation(
    kind: Kind,
    checkpoint: str | Path,
    store: str | Path | Store,
    cfg: EvalConfig,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Run the whole protocol; returns the ``results.json`` object (headline keys at the top)."""
    t_start = time.perf_counter()
    st = open_eval_store(store, (cfg.train_split, cfg.val_split, cfg.test_split))
    device = resolve_device(cfg.device)
    model = load_encoder(checkpoint, device)
    check_compatible(model, st)
    data = EvalData(st, cfg)
    feats = _FeatureCache(data, cfg)
    rows: list[dict] = []
    for name, protocol in model_plan(kind, cfg.baselines, cfg.scratch_baseline):
        for fraction in cfg.label_fractions:
            for seed in cfg.seeds:
                t0 = time.perf_counter()
                if protocol == "linear":
                    run = _linear_run(data, feats, cfg, name, model, fraction, seed, device)
                else:
                    run = _finetune_run(data, feats, cfg, name, model, fraction, seed, device)
                y_test = data.test()[1]
                test = classification_metrics(y_test, run.pop("y_pred"), labels=data.report_labels())
                row = {
                    "model": name, "protocol": protocol, "label_fraction": float(fraction), "seed": seed,
                    **{k: v for k, v in run.items()},
                    "selected_on": "val", "split": "test",
                    "accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "test": test,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                rows.append(row)
                log(
                    f"[evaluate {kind}] {name:<11} {protocol:<8} fraction={fraction:<5g} seed={seed} "
                    f"n_train={row['num_train']:<6d} val_acc={row['val_accuracy']:.4f} "
                    f"test_acc={row['accuracy']:.4f} test_f1={row['macro_f1']:.4f} ({row['seconds']:.1f}s)"
                    + _choice(row["selection"])
                )
    summary = summarise(rows)
    return {
        **headline(rows, summary, kind),
        "command": kind,
        "summary": summary,
        "results": rows,
        "config": to_dict(cfg),
        "checkpoint": {"path": str(checkpoint), "sha256": checkpoint_sha256(checkpoint)},
        "data": {
            "store": str(st.path),
            "manifest_sha256": manifest_sha256(st.path),
            "splits": {s: st.num_windows(s) for s in (cfg.train_split, cfg.val_split, cfg.test_split)},
            "num_labelled": {cfg.train_split: int(data.train_idx.size), cfg.val_split: int(data.val_idx.size),
                             cfg.test_split: int(data.test()[0].size)},
            "classes": [int(c) for c in data.classes],
        },
        "model_config": to_dict(model.config),
        "environment": environment(device),
        "seconds": round(time.perf_counter() - t_start, 3),
    }
