"""Checkpoints: the collection of every resumable thing's ``state_dict``.

Layout of one checkpoint directory (every rank writes its own files into it; under Ray Train
each rank writes a local directory and Ray merges them into ``<run>/checkpoint_<step>``)::

    engine/latest, engine/<tag>/...   DeepSpeed ``save_checkpoint`` (module, optimizer, LR
                                      scheduler; ZeRO shards one file per rank)
    target_encoder.pt                 float32 momentum target encoder (rank 0)
    rank_<r>.pt                       loader state, RNG states, trainer counters (each rank)
    meta.json                         step, epoch, world size, metrics, full config (rank 0)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from timemae_dist.train.ds_config import uses_flat_params

__all__ = ["save_checkpoint", "load_checkpoint", "find_latest_checkpoint", "list_checkpoints", "rng_state", "set_rng_state", "META"]

META = "meta.json"
ENGINE_DIR = "engine"
TARGET = "target_encoder.pt"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _engine_kind(engine: Any) -> str:
    return "plain" if type(engine).__name__ == "PlainEngine" else "deepspeed"


def save_checkpoint(trainer: Any, out_dir: str | Path, metrics: dict[str, float]) -> Path:
    """Write this rank's part of the checkpoint of ``trainer`` at its current step into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = trainer.state.step
    tag = f"step_{step:07d}"
    trainer.engine.save_checkpoint(str(out / ENGINE_DIR), tag=tag, client_state={"trainer": trainer.state.state_dict()})
    torch.save(
        {
            "trainer": trainer.state.state_dict(),
            "loader": trainer.loader.state_dict(),
            "rng": rng_state(),
            "rank": trainer.rank,
            "world_size": trainer.world_size,
        },
        out / _rank_file(trainer.rank),
    )
    if trainer.rank == 0:
        torch.save({k: v.detach().float().cpu() for k, v in trainer.target.state_dict().items()}, out / TARGET)
        engine = _engine_kind(trainer.engine)
        meta = {
            "step": step,
            "epoch": trainer.state.epoch,
            "windows": trainer.state.windows,
            "world_size": trainer.world_size,
            "zero_stage": trainer.cfg.deepspeed.zero_stage,
            "engine": engine,
            "flat_params": uses_flat_params(trainer.cfg, engine),
            "tag": tag,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "config": trainer.cfg.to_dict(),
        }
        (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load_checkpoint(trainer: Any, ckpt_dir: str | Path) -> dict:
    """Restore ``trainer`` (engine, target encoder, loader, RNG, counters) from ``ckpt_dir``."""
    d = Path(ckpt_dir)
    meta = json.loads((d / META).read_text())
    if meta["world_size"] != trainer.world_size:
        raise ValueError(
            f"checkpoint {str(d)!r} was written by {meta['world_size']} workers but this run has "
            f"{trainer.world_size}; resume with trainer.num_workers={meta['world_size']} (or start a new run.name)"
        )
    load_path, _client = trainer.engine.load_checkpoint(str(d / ENGINE_DIR))
    if load_path is None:
        raise ValueError(f"checkpoint {str(d)!r}: the engine state under {ENGINE_DIR}/ could not be loaded")
    target_sd = torch.load(d / TARGET, map_location="cpu", weights_only=True)
    trainer.target.load_state_dict(target_sd)
    if trainer.target_compute is not trainer.target:
        trainer.target_compute.load_state_dict(target_sd)
    own = torch.load(d / _rank_file(trainer.rank), map_location="cpu", weights_only=False)
    trainer.state.load_state_dict(own["trainer"])
    trainer.loader.load_state_dict(own["loader"])
    set_rng_state(own["rng"])
    return meta


# model keys that shape the parameters: a checkpoint resumes only into the same values
ARCHITECTURE_KEYS = (
    "in_channels", "seq_len", "wave_length", "d_model", "num_layers", "num_heads", "reg_layers", "ffn_mult",
    "vocab_size", "enable_res_parameter", "num_classes", "encoder.type",
)


def check_resumable(cfg: Any, ckpt_dir: str | Path, *, engine: str, world_size: int) -> None:
    """Fail before anything starts if ``cfg`` cannot resume ``ckpt_dir``: another architecture,
    another engine (``--single-process`` vs Ray Train + DeepSpeed), another number of workers or
    ZeRO stage. One :class:`~timemae_dist.train.errors.PretrainError` naming the keys and the fix."""
    from timemae_dist.train.errors import PretrainError

    d = Path(ckpt_dir)
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError) as e:
        raise PretrainError(f"checkpoint {str(d)!r}: {META} unreadable ({e}); delete that checkpoint folder "
                            "to resume from the one before, or start a new run.name") from None
    fix = f"use the run's settings to resume it, or a new run.name to start fresh (run.name={cfg.run.name} resumes {d.name})"
    if meta.get("engine") and meta["engine"] != engine:
        how = {"plain": "--single-process (plain PyTorch)", "deepspeed": "Ray Train + DeepSpeed"}
        raise PretrainError(f"checkpoint {str(d)!r} was written by {how.get(meta['engine'], meta['engine'])}, "
                            f"this run uses {how.get(engine, engine)}; {fix}")
    saved = meta.get("config", {}).get("model", {})
    now = cfg.to_dict()["model"]

    def get(m: dict, key: str) -> Any:
        for part in key.split("."):
            m = m.get(part, {}) if isinstance(m, dict) else {}
        return m if m != {} else None

    diff = [f"model.{k}={get(saved, k)!r} (this config: {get(now, k)!r})" for k in ARCHITECTURE_KEYS
            if get(saved, k) != get(now, k)]
    if engine == "deepspeed":
        if meta.get("world_size") not in (None, world_size):
            diff.append(f"trainer.num_workers={meta['world_size']} (this config: {world_size})")
        if meta.get("zero_stage") not in (None, cfg.deepspeed.zero_stage):
            diff.append(f"deepspeed.zero_stage={meta['zero_stage']} (this config: {cfg.deepspeed.zero_stage})")
    # the optimizer state of one flat buffer (trainer.flat_params) vs one state per parameter
    saved_flat, now_flat = bool(meta.get("flat_params", False)), uses_flat_params(cfg, engine)
    if saved_flat != now_flat:
        diff.append(f"trainer.flat_params={str(saved_flat).lower()} (this run: "
                    f"{'flat' if now_flat else 'per-parameter'} optimizer state)")
    if diff:
        raise PretrainError(f"checkpoint {str(d)!r} was trained with {', '.join(diff)}; {fix}")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``checkpoint_<step>`` directory of a run (with ``meta.json``), by step."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete ``checkpoint_<step>`` directory of a run (with ``meta.json``), if any."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None
