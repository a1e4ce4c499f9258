"""A reproducible 2-D t-SNE map of test representations: pretrained vs random init, side by side.

What the official ``visualize.py`` does, made reproducible: a stratified seeded subsample of
the labelled test windows (at most ``max_points``), t-SNE with PCA init and a fixed
``random_state``, and the random-init encoder drawn from the same seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_pipeline.splits import label_fraction_subset
from data_pipeline.store import Store
from timemae_dist.eval.baselines import random_init_encoder
from timemae_dist.eval.config import EvalConfig
from timemae_dist.eval.errors import EvalError
from timemae_dist.eval.features import check_compatible, encode_split, load_encoder, open_eval_store, resolve_device

__all__ = ["tsne_2d", "run_embed"]


def tsne_2d(Z: np.ndarray, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """Standardised ``Z`` -> 2-D t-SNE (PCA init, fixed seed); perplexity capped at (n - 1) / 3."""
    from sklearn.manifold import TSNE

    Z = np.asarray(Z, np.float64)
    Z = (Z - Z.mean(0)) / np.where(Z.std(0) > 0, Z.std(0), 1.0)
    perp = float(min(perplexity, max(1.0, (len(Z) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, learning_rate="auto").fit_transform(Z)


def run_embed(checkpoint: str | Path, store: str | Path | Store, out_png: str | Path, cfg: EvalConfig) -> dict:
    """Write the side-by-side map to ``out_png``; returns what was plotted (points, seed, perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = open_eval_store(store, (cfg.test_split,))
    device = resolve_device(cfg.device)
    model = load_encoder(checkpoint, device)
    check_compatible(model, st)
    labels = st.read_column(cfg.test_split, "label")
    num_labelled = int((labels >= 0).sum())
    if num_labelled < 5:
        raise EvalError(f"split {cfg.test_split!r} has {num_labelled} labelled windows; t-SNE needs at least 5")
    frac = min(1.0, cfg.embed.max_points / num_labelled)
    idx = label_fraction_subset(labels, frac, cfg.seed)[: cfg.embed.max_points]
    y = labels[idx]
    maps = {}
    for name, enc in (("pretrained", model), ("random init", random_init_encoder(model.config, cfg.seed, device))):
        Z = encode_split(enc, st, cfg.test_split, idx, batch_size=cfg.batch_size, normalize=cfg.normalize)
        maps[name] = tsne_2d(Z, cfg.seed, cfg.embed.perplexity)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=120)
    classes = np.unique(y)
    cmap = plt.get_cmap("tab10" if classes.size <= 10 else "tab20")
    for ax, (name, P) in zip(axes, maps.items()):
        for k, c in enumerate(classes):
            m = y == c
            ax.scatter(P[m, 0], P[m, 1], s=6, alpha=0.8, color=cmap(k % cmap.N), label=str(c))
        ax.set_title(f"{name} encoder", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(title="class", fontsize=7, markerscale=2, loc="best")
    fig.suptitle(
        f"t-SNE of {cfg.test_split} representations ({len(idx)} windows, seed {cfg.seed})", fontsize=10
    )
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return {
        "plot": str(out),
        "split": cfg.test_split,
        "num_points": int(len(idx)),
        "classes": [int(c) for c in classes],
        "seed": cfg.seed,
        "perplexity": float(min(cfg.embed.perplexity, max(1.0, (len(idx) - 1) / 3))),
        "coordinates_sha256": {
            k: hashlib.sha256(np.round(v, 3).astype(np.float32).tobytes()).hexdigest() for k, v in maps.items()
        },
    }
