"""Fine-tuning: encoder + linear head on the mean-pooled output, trained end to end with Adam.

Each epoch ends with an evaluation on the **validation** split; the kept model is the epoch
with the best val accuracy (ties: lower val loss, then the earlier epoch) and training stops
after ``patience`` epochs without improvement. The test split is not an argument of
:func:`finetune`: callers score it once, with :func:`predict`, after selection.
The same loop on a randomly initialised model of the same architecture is the
supervised-from-scratch baseline (:func:`build_classifier` with ``pretrained=None``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from timemae_dist.eval.config import FinetuneConfig
from timemae_dist.eval.errors import EvalError

__all__ = ["FinetuneResult", "build_classifier", "head_from_probe", "init_head_from_probe", "finetune", "predict",
           "class_index"]


def class_index(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Positions of labels ``y`` in the sorted ``classes`` (-1 for a label not in ``classes``)."""
    pos = np.searchsorted(classes, y)
    pos = np.clip(pos, 0, len(classes) - 1)
    return np.where(classes[pos] == y, pos, -1).astype(np.int64)


def build_classifier(model_config, num_classes: int, pretrained: nn.Module | None, seed: int) -> nn.Module:
    """A TimeMAE with a ``num_classes`` head: pretrained weights (head fresh) or random init."""
    from timemae_dist.model import TimeMAE

    cfg = dataclasses.replace(copy.deepcopy(model_config), num_classes=int(num_classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # head (and, for scratch, every weight) init is a function of seed
        clf = TimeMAE(cfg)
    if pretrained is not None:
        state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
        missing, unexpected = clf.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise EvalError(
                f"the checkpoint's weights do not fit its own architecture (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); re-export it with `timemae export`"
            )
    return clf


def head_from_probe(probe, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W (K, D), b (K,))`` of a linear head equal to a fitted multinomial probe on raw features.

    ``probe`` is :func:`~timemae_dist.eval.linear.fit_probe`'s StandardScaler + LogisticRegression
    fit on class positions ``0..K-1``; the scaler folds into the weights
    (``W z_std + b = (W / s) z + (b - W m / s)``), so ``head(z)`` gives the probe's logits up to a
    per-window constant (the same softmax). A class absent from the probe's train set gets zero
    weights and a bias below every other class's.
    """
    scaler, lr = probe[0], probe[-1]
    if not hasattr(lr, "coef_") or lr.coef_.ndim != 2:
        raise EvalError("head_init=probe needs a fitted multinomial LogisticRegression probe")
    coef, icpt = np.asarray(lr.coef_, np.float64), np.asarray(lr.intercept_, np.float64)
    if coef.shape[0] == 1:  # binary: sklearn keeps one logit (class 1 vs class 0); split it symmetrically
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
    mean = np.asarray(scaler.mean_, np.float64)
    scale = np.asarray(scaler.scale_, np.float64)
    W_seen = coef / scale[None, :]
    b_seen = icpt - W_seen @ mean
    W = np.zeros((num_classes, coef.shape[1]))
    b = np.full(num_classes, float(b_seen.min()) - 10.0)
    rows = np.asarray(lr.classes_, np.int64)
    W[rows], b[rows] = W_seen, b_seen
    return W.astype(np.float32), b.astype(np.float32)


def init_head_from_probe(model: nn.Module, probe) -> None:
    """Set ``model.head`` (``nn.Linear(D, K)``) to the probe's linear map (LP-FT's start)."""
    head = model.head
    W, b = head_from_probe(probe, head.out_features)
    if W.shape != tuple(head.weight.shape):
        raise EvalError(f"the probe was fit on {W.shape[1]}-d features but the head takes {head.in_features}")
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(W))
        head.bias.copy_(torch.from_numpy(b))


@dataclass
class FinetuneResult:
    """What selection on val decided, and the per-epoch val curve (the test split is not here)."""

    best_epoch: int
    val_accuracy: float
    val_loss: float
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        out = [model.classify(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.num_classes)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted class positions (argmax of the head) for windows ``x`` ``(N, C, T)``."""
    device = next(model.parameters()).device
    return _logits(model, torch.as_tensor(x), batch_size, device).argmax(dim=1).numpy()


def finetune(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    cfg: FinetuneConfig,
    seed: int,
    eval_batch_size: int = 256,
) -> FinetuneResult:
    """Train ``model.classify`` on ``(x_train, y_train)`` (class positions), select on val, in place.

    On return ``model`` holds the weights of the selected epoch (eval mode). Deterministic for a
    given seed and device: batch order from a seeded generator, dropout under a forked RNG.
    """
    if len(y_val) == 0:
        raise EvalError("the validation split has no labelled windows; early stopping needs them")
    if len(y_train) == 0:
        raise EvalError("the train split has no labelled windows to fine-tune on")
    device = next(model.parameters()).device
    xt, yt = torch.as_tensor(x_train), torch.as_tensor(y_train, dtype=torch.long)
    xv, yv = torch.as_tensor(x_val), torch.as_tensor(y_val, dtype=torch.long)
    n = len(yt)
    reps = max(1, math.ceil(cfg.min_steps_per_epoch * cfg.batch_size / n))  # tiny fractions: repeat
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)

    best_state, best_key, best_epoch = None, None, -1
    best_acc, best_loss = float("nan"), float("nan")
    history: list[dict] = []
    since_best = 0
    stopped_early = False
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # dropout
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])
            total, steps = torch.zeros((), device=device), 0
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                logits = model.classify(xt[idx].to(device, non_blocking=True))
                loss = F.cross_entropy(logits.float(), yt[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach()
                steps += 1
            logits_v = _logits(model, xv, eval_batch_size, device)
            val_loss = float(F.cross_entropy(logits_v, yv))
            val_acc = float((logits_v.argmax(1) == yv).float().mean())
            train_loss = float(total) / max(1, steps)  # one host sync per epoch
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc})
            key = (val_acc, -val_loss)
            if best_key is None or key > best_key:
                best_key, best_epoch, best_acc, best_loss = key, epoch, val_acc, val_loss
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                since_best = 0
            else:
                since_best += 1
                if cfg.patience and since_best >= cfg.patience:
                    stopped_early = True
                    break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return FinetuneResult(
        best_epoch=best_epoch,
        val_accuracy=best_acc,
        val_loss=best_loss,
        epochs_run=len(history),
        stopped_early=stopped_early,
        history=history,
    )
