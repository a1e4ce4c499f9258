"""Outputs of an evaluation: ``results.json``, a Markdown table, and PNG plots.

``results.json`` holds every number (per run and mean +- std per model/fraction), the eval
config, the checkpoint's sha256 and the data manifest's sha256, so a table can be traced back
to the exact weights and data it came from. Plots (``--plot``): the headline confusion matrix
and the label-fraction curve (test accuracy vs fraction, mean +- std over seeds, per model).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

__all__ = [
    "sha256_file",
    "checkpoint_sha256",
    "manifest_sha256",
    "environment",
    "markdown_table",
    "write_results",
    "plot_confusion",
    "plot_label_fraction_curve",
]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder: over sorted ``relpath\\0sha256(file)\\n`` lines of its files."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def manifest_sha256(store_path: str | Path) -> str:
    """sha256 of ``STORE/manifest.json`` (which itself lists the sha256 of every data file)."""
    return sha256_file(Path(store_path) / "manifest.json")


def environment(device) -> dict:
    import sklearn
    import torch

    return {
        "device": str(device),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {std:.4f}"


def markdown_table(results: dict) -> str:
    """One row per (model, protocol, label fraction): val and test numbers, mean ± std over seeds."""
    lines = [
        f"Evaluation `{results.get('command')}`: checkpoint `{results['checkpoint']['path']}` "
        f"(sha256 `{results['checkpoint']['sha256'][:12]}`), store `{results['data']['store']}` "
        f"(manifest sha256 `{results['data']['manifest_sha256'][:12]}`). Selection on val, test reported once.",
        "",
        "| model | protocol | label fraction | train windows | seeds | val acc | test acc | test macro-F1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["summary"]:
        n = s["num_seeds"]
        lines.append(
            f"| {s['model']} | {s['protocol']} | {s['label_fraction']:g} | {s['num_train']} | {n} | "
            f"{_pm(s['val_accuracy_mean'], s['val_accuracy_std'], n)} | "
            f"{_pm(s['accuracy_mean'], s['accuracy_std'], n)} | {_pm(s['macro_f1_mean'], s['macro_f1_std'], n)} |"
        )
    return "\n".join(lines) + "\n"


def plot_confusion(cm: list[list[int]], labels: list[int], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.asarray(cm, dtype=np.int64)
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=120)
    ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(k), [str(c) for c in labels])
    ax.set_yticks(range(k), [str(c) for c in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    thresh = a.max() / 2 if a.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(a[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if a[i, j] > thresh else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_label_fraction_curve(summary: list[dict], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    groups: dict[str, list[dict]] = {}
    for s in summary:
        groups.setdefault(f"{s['model']} ({s['protocol']})", []).append(s)
    for name, ss in groups.items():
        ss = sorted(ss, key=lambda s: s["label_fraction"])
        x = [s["label_fraction"] for s in ss]
        y = np.array([s["accuracy_mean"] for s in ss])
        e = np.array([s["accuracy_std"] for s in ss])
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
    if len({s["label_fraction"] for s in summary}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("fraction of labelled train windows")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_results(results: dict, out_dir: str | Path, plot: bool = False) -> dict[str, str]:
    """Write results.json + results.md (+ PNGs with ``plot``) into ``out_dir``; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    if plot:
        paths["confusion_matrix"] = out / "confusion_matrix.png"
        paths["label_fraction_curve"] = out / "label_fraction_curve.png"
    results = {**results, "outputs": {k: str(v) for k, v in paths.items()}}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown_table(results))
    if plot:
        cmd = results.get("command", "")
        plot_confusion(
            results["confusion_matrix"], results["confusion_labels"], paths["confusion_matrix"],
            f"{cmd}: pretrained, fraction {results['label_fraction']:g}, seed {results['confusion_seed']} (test)",
        )
        plot_label_fraction_curve(results["summary"], paths["label_fraction_curve"], f"{cmd}: test accuracy vs labels")
    return {k: str(v) for k, v in paths.items()}
