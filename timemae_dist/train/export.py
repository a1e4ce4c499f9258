"""``timemae export CHECKPOINT OUT_DIR``: a consolidated float32 TimeMAE from a training checkpoint.

Reads a checkpoint written by the Ray/DeepSpeed workers (ZeRO 0-3; ZeRO shards are gathered
with DeepSpeed's offline ``zero_to_fp32``) or by the single-process loop, adds the momentum
target encoder, and writes ``model.safetensors`` + ``config.json`` with
``TimeMAE.save_pretrained``. The result loads with ``TimeMAE.from_pretrained(OUT_DIR)`` without
Ray or DeepSpeed. Needs no process group and no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from data_pipeline.typedconfig import from_dict
from timemae_dist.model import TimeMAE
from timemae_dist.train.checkpoint import ENGINE_DIR, META, TARGET, find_latest_checkpoint
from timemae_dist.train.config import PretrainConfig
from timemae_dist.train.errors import PretrainError

__all__ = ["resolve_checkpoint", "consolidated_state_dict", "export_checkpoint"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    p = Path(path).expanduser()
    if (p / META).is_file():
        return p
    latest = find_latest_checkpoint(p)
    if latest is not None:
        return latest
    raise PretrainError(
        f"CHECKPOINT: {str(p)!r} is neither a checkpoint (no {META}) nor a run directory with "
        "checkpoint_* folders; pass <storage_path>/<run>/checkpoint_<step> or <storage_path>/<run>"
    )


def consolidated_state_dict(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The online model's full float32 state dict from the engine part of a checkpoint."""
    engine_dir = ckpt / ENGINE_DIR
    tag = (engine_dir / "latest").read_text().strip()
    if meta.get("engine") == "plain":
        sd = torch.load(engine_dir / tag / "plain_engine.pt", map_location="cpu", weights_only=False)["module"]
    elif int(meta.get("zero_stage", 0)) == 0:
        sd = torch.load(engine_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=tag)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, model_cfg_override: Optional[dict] = None) -> Path:
    """Write a ``TimeMAE.from_pretrained``-loadable folder; returns ``out_dir``."""
    ckpt = resolve_checkpoint(checkpoint)
    meta = json.loads((ckpt / META).read_text())
    cfg = from_dict(PretrainConfig, meta["config"])
    model = TimeMAE(cfg.model)
    online = consolidated_state_dict(ckpt, meta)
    target = torch.load(ckpt / TARGET, map_location="cpu", weights_only=True)
    state = {**online, **{f"target_encoder.{k}": v for k, v in target.items()}}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainError(
            f"CHECKPOINT: {str(ckpt)!r} does not match its model config (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}); was it written by another version?"
        )
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps(
            {"checkpoint": str(ckpt.resolve()), "step": meta["step"], "metrics": meta.get("metrics", {})},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    return out
