"""Choosing a pretraining checkpoint on the validation split.

The official TimeMAE code keeps the pretraining checkpoint whose linear probe scores best on
the *test* set. Here every candidate checkpoint of a run gets the linear-probe protocol on
**train -> val** only (all labelled train windows, ``C`` and the multi-class scheme chosen on val exactly as
``timemae evaluate linear`` does), and the one with the best val accuracy is kept (ties: the
later step, i.e. more pretraining). The test split is never opened: a store without one works.

    timemae evaluate select RUN_DIR|CHECKPOINT ... --store STORE [--json] [--out DIR]
    timemae evaluate linear RUN_DIR --select-checkpoint --store STORE ...   (select, then evaluate)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from timemae_dist.eval.config import EvalConfig
from timemae_dist.eval.errors import EvalError
from timemae_dist.eval.features import (
    _is_export_dir,
    check_compatible,
    encode_split,
    load_encoder,
    open_eval_store,
    resolve_device,
)
from timemae_dist.eval.linear import select_probe
from timemae_dist.eval.protocol import EvalData, _stderr
from timemae_dist.eval.report import checkpoint_sha256, manifest_sha256

__all__ = ["Candidate", "candidate_checkpoints", "best_candidate", "select_checkpoint", "selection_table", "write_selection"]

SELECTION_NAME = "selection.json"


@dataclass(frozen=True)
class Candidate:
    path: Path
    step: int | None  # the training step (from checkpoint_<step>), None for an export folder


def _step_of(p: Path) -> int | None:
    """The step in a training checkpoint's meta.json; None for an export folder."""
    from timemae_dist.train.checkpoint import META

    try:
        return int(json.loads((p / META).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def candidate_checkpoints(paths: Sequence[str | Path]) -> list[Candidate]:
    """Every checkpoint named: a run folder expands to all its complete ``checkpoint_<step>`` folders."""
    from timemae_dist.train.checkpoint import META, list_checkpoints

    out: list[Candidate] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.is_dir():
            raise EvalError(
                f"checkpoint {str(p)!r} is not a folder; pass a run folder (<storage_path>/<run>), "
                "checkpoint folders (<run>/checkpoint_<step>) or export folders"
            )
        if (p / META).is_file() or _is_export_dir(p):
            out.append(Candidate(p, _step_of(p)))
            continue
        found = list_checkpoints(p)
        if not found:
            raise EvalError(
                f"{str(p)!r} holds no checkpoint_<step> folder with {META} and is no export folder; pass "
                "a run folder written by `timemae pretrain` (keep more of its checkpoints with "
                "run.keep_checkpoints=N) or checkpoint / export folders"
            )
        out.extend(Candidate(path, step) for step, path in found)
    seen: set[Path] = set()
    unique = []
    for c in out:
        if c.path.resolve() not in seen:
            seen.add(c.path.resolve())
            unique.append(c)
    return unique


def best_candidate(rows: Sequence[dict]) -> int:
    """Index of the best ``val_accuracy``; ties: the later ``step`` (no step counts as -1), then the later row."""
    return max(range(len(rows)), key=lambda i: (
        rows[i]["val_accuracy"], -1 if rows[i]["step"] is None else rows[i]["step"], i))


def select_checkpoint(
    paths: Sequence[str | Path],
    store,
    cfg: EvalConfig,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Linear-probe every candidate on train -> val; the best val accuracy wins (ties: later step).

    Returns the ``selection.json`` object: ``checkpoint`` (the chosen path), ``step``,
    ``val_accuracy``, ``C``, ``selected_on`` ("val") and ``candidates`` (one entry each).
    Reads only ``cfg.train_split`` and ``cfg.val_split``.
    """
    t_start = time.perf_counter()
    cands = candidate_checkpoints(paths)
    st = open_eval_store(store, (cfg.train_split, cfg.val_split))
    device = resolve_device(cfg.device)
    data = EvalData(st, cfg)  # labelled train/val windows (it reads test only when asked: never here)
    tr_idx, y_tr, va_idx, y_va = data.train_idx, data.y_train, data.val_idx, data.y_val
    rows = []
    for k, c in enumerate(cands):
        t0 = time.perf_counter()
        model = load_encoder(c.path, device)
        check_compatible(model, st)
        z_tr = encode_split(model, st, cfg.train_split, tr_idx, batch_size=cfg.batch_size, normalize=cfg.normalize)
        z_va = encode_split(model, st, cfg.val_split, va_idx, batch_size=cfg.batch_size, normalize=cfg.normalize)
        if not (np.isfinite(z_tr).all() and np.isfinite(z_va).all()):
            raise EvalError(
                f"checkpoint {str(c.path)!r} gives non-finite representations (NaN/inf weights?); "
                "drop it from the candidates"
            )
        sel = select_probe(z_tr, y_tr, z_va, y_va, cfg.linear.C_grid, cfg.linear.max_iter, cfg.linear.extend_edges,
                           cfg.linear.multi_class)
        rows.append({
            "checkpoint": str(c.path), "step": c.step, "val_accuracy": sel.val_accuracy, "C": sel.C,
            "multi_class": sel.multi_class,
            "converged": sel.converged, "seconds": round(time.perf_counter() - t0, 3),
        })
        step = "-" if c.step is None else c.step
        log(f"[evaluate select] {k + 1}/{len(cands)} step {step:>7} val_acc={sel.val_accuracy:.4f} "
            f"C={sel.C:g} {sel.multi_class} ({rows[-1]['seconds']:.1f}s) {c.path}")
    chosen = rows[best_candidate(rows)]
    return {
        "checkpoint": chosen["checkpoint"],
        "step": chosen["step"],
        "val_accuracy": chosen["val_accuracy"],
        "C": chosen["C"],
        "multi_class": chosen["multi_class"],
        "selected_on": cfg.val_split,
        "split": cfg.val_split,
        "protocol": "linear probe on all labelled train windows, C and multi-class scheme chosen on val",
        "checkpoint_sha256": checkpoint_sha256(chosen["checkpoint"]),
        "candidates": rows,
        "data": {"store": str(st.path), "manifest_sha256": manifest_sha256(st.path),
                 "num_labelled": {cfg.train_split: int(tr_idx.size), cfg.val_split: int(va_idx.size)}},
        "linear": {"C_grid": list(cfg.linear.C_grid), "multi_class": list(cfg.linear.multi_class),
                   "max_iter": cfg.linear.max_iter, "extend_edges": cfg.linear.extend_edges},
        "seconds": round(time.perf_counter() - t_start, 3),
    }


def selection_table(sel: dict) -> str:
    """Markdown table: one row per candidate, the chosen one in bold."""
    lines = ["| checkpoint | step | val acc | C | multi-class |", "|---|---:|---:|---:|---|"]
    for r in sel["candidates"]:
        mark = "**" if r["checkpoint"] == sel["checkpoint"] else ""
        step = "-" if r["step"] is None else r["step"]
        lines.append(f"| {mark}{Path(r['checkpoint']).name}{mark} | {step} | {mark}{r['val_accuracy']:.4f}{mark} | {r['C']:g} | {r['multi_class']} |")
    return "\n".join(lines) + "\n"


def write_selection(sel: dict, out_dir: str | Path) -> Path:
    """``OUT/selection.json`` (written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SELECTION_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sel, indent=2) + "\n")
    tmp.replace(path)
    return path
