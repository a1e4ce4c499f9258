"""Loading an encoder and turning store windows into mean-pooled representations.

* :func:`load_encoder` accepts an export folder (``config.json`` + ``model.safetensors``, as
  written by ``TimeMAE.save_pretrained`` / ``timemae export``) or a training checkpoint
  folder (exported on the fly with ``timemae_dist.train.export`` when that module exists).
* :func:`read_windows` reads only the chunks that hold the requested windows (bounded memory
  on big stores) and applies the manifest's train-split normalisation.
* :func:`encode` runs ``model.encode`` in eval mode without gradients, in batches, and puts the
  model back in the mode it was in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipeline.errors import StoreError
from data_pipeline.store import Store, open_store
from timemae_dist.eval.errors import EvalError

__all__ = [
    "resolve_device",
    "open_eval_store",
    "load_encoder",
    "check_compatible",
    "labelled_indices",
    "read_windows",
    "encode",
    "encode_split",
    "unwrap",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def open_eval_store(path: str | Path | Store, splits: tuple[str, ...] = ()) -> Store:
    """Open a store and check it has ``splits``, with one clear line when it cannot be used."""
    if isinstance(path, Store):
        store = path
    else:
        p = Path(path).expanduser()
        if not (p / "manifest.json").is_file():
            raise EvalError(
                f"--store {str(p)!r} is not a store (no manifest.json); build one with "
                "`timemae data prepare CONFIG` and pass its output.path"
            )
        store = open_store(p)
    for split in splits:
        if split not in store.splits:
            raise EvalError(f"store {str(store.path)!r} has no split {split!r}; it has {', '.join(store.splits)}")
    return store


def unwrap(model: nn.Module) -> nn.Module:
    """The TimeMAE inside DDP / DeepSpeed / torch.compile wrappers (anything with ``.module``)."""
    seen = 0
    while not hasattr(model, "encode") and hasattr(model, "module") and seen < 8:
        model = model.module
        seen += 1
    if not hasattr(model, "encode"):
        raise TypeError(f"{type(model).__name__} has no encode(); pass a TimeMAE model")
    return getattr(model, "_orig_mod", model)


def _is_export_dir(p: Path) -> bool:
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def _export_training_checkpoint(p: Path, out: Path) -> None:
    try:
        from timemae_dist.train import export as export_mod  # written by the training engineer
    except ImportError:
        raise EvalError(
            f"{str(p)!r} is not an export folder ({CONFIG_NAME} + {WEIGHTS_NAME}) and this install "
            "cannot export training checkpoints; run `timemae export CHECKPOINT OUT_DIR` and pass OUT_DIR"
        ) from None
    fn = getattr(export_mod, "export_checkpoint", None) or getattr(export_mod, "export", None)
    if fn is None:
        raise EvalError(
            f"timemae_dist.train.export has no export_checkpoint(); run `timemae export {p} OUT_DIR` "
            "and pass OUT_DIR"
        )
    try:
        fn(str(p), str(out))
    except ValueError as e:  # PretrainError / ConfigError: already one line naming the fix
        raise EvalError(
            f"checkpoint {str(p)!r} is neither an export folder ({CONFIG_NAME} + {WEIGHTS_NAME}) nor "
            f"a training checkpoint that exports: {e}"
        ) from None


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """A TimeMAE from an export folder or a training checkpoint folder, in eval mode on ``device``."""
    from timemae_dist.model import TimeMAE

    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(
            f"checkpoint {str(p)!r} does not exist; pass a run folder (<storage_path>/<run>: its newest "
            "checkpoint), <storage_path>/<run>/checkpoint_<step>, or a folder written by `timemae export`"
        )
    if not p.is_dir():
        raise EvalError(f"checkpoint {str(p)!r} is a file; pass the checkpoint or export folder")
    try:
        if _is_export_dir(p):
            model = TimeMAE.from_pretrained(p, map_location="cpu")
        else:
            with tempfile.TemporaryDirectory(prefix="timemae-eval-export-") as tmp:
                _export_training_checkpoint(p, Path(tmp))
                if not _is_export_dir(Path(tmp)):
                    raise EvalError(f"exporting {str(p)!r} produced no {CONFIG_NAME} + {WEIGHTS_NAME}")
                model = TimeMAE.from_pretrained(tmp, map_location="cpu")
    except EvalError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise EvalError(f"checkpoint {str(p)!r} cannot be loaded: {e}") from None
    return model.to(device).eval()


def check_compatible(model: nn.Module, store: Store) -> None:
    """EvalError unless the model was built for the store's channels and window length."""
    cfg = unwrap(model).config
    if cfg.in_channels != store.num_channels or cfg.seq_len != store.window:
        raise EvalError(
            f"the checkpoint expects windows of {cfg.in_channels} channels x {cfg.seq_len} samples but "
            f"store {str(store.path)!r} holds {store.num_channels} x {store.window}; evaluate on the "
            "store the model was pretrained for (same channels and window.length)"
        )


def labelled_indices(store: Store, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, labels)`` of the labelled (label >= 0) windows of ``split``."""
    labels = store.read_column(split, "label")
    idx = np.flatnonzero(labels >= 0).astype(np.int64)
    return idx, labels[idx].astype(np.int64)


def read_windows(store: Store, split: str, indices: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Windows ``indices`` (sorted or not) of ``split`` as float32 ``(n, C, T)``, reading only their chunks."""
    indices = np.asarray(indices, dtype=np.int64)
    n_split = store.num_windows(split)
    if indices.size and (indices.min() < 0 or indices.max() >= n_split):
        raise IndexError(f"window index out of range for split {split!r} with {n_split} windows")
    out = np.empty((indices.size, store.num_channels, store.window), np.float32)
    if indices.size:
        bounds = store.chunk_bounds(split)
        chunk_of = np.searchsorted(bounds[:, 1], indices, side="right")
        for c in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == c)
            x = store.read_chunk(split, int(c), columns=["windows"])["windows"]
            out[where] = x[indices[where] - bounds[c, 0]]
    if normalize:
        try:
            mean, std = store.normalization()
        except StoreError as e:
            raise EvalError(f"{e} (or set normalize=false)") from None
        std = np.where(std > 0, std, 1.0).astype(np.float32)
        out -= mean[None, :, None]
        out /= std[None, :, None]
    return out


@torch.no_grad()
def encode(model: nn.Module, x_NCT: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """``model.encode`` over ``x`` in batches, eval mode, no grad -> float32 ``(N, d_model)``."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        device = next(m.parameters()).device
        x = torch.as_tensor(x_NCT)
        parts = []
        for s in range(0, x.shape[0], batch_size):
            z = m.encode(x[s : s + batch_size].to(device, torch.float32))
            parts.append(z.float().cpu())  # one transfer per batch: evaluation, not the hot path
        if not parts:
            return np.zeros((0, m.config.d_model), np.float32)
        return torch.cat(parts).numpy()
    finally:
        m.train(was_training)


def encode_split(
    model: nn.Module,
    store: Store,
    split: str,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    normalize: bool = True,
) -> np.ndarray:
    """Representations of windows ``indices`` (default: all) of ``split``, chunk-group by chunk-group."""
    if indices is None:
        indices = np.arange(store.num_windows(split), dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    step = max(batch_size, 4096)  # bound memory on big splits: read+encode a group at a time
    parts = [
        encode(model, read_windows(store, split, indices[s : s + step], normalize), batch_size)
        for s in range(0, indices.size, step)
    ]
    if not parts:
        return np.zeros((0, unwrap(model).config.d_model), np.float32)
    return np.concatenate(parts)
