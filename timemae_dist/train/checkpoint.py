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
        meta = {
            "step": step,
            "epoch": trainer.state.epoch,
            "windows": trainer.state.windows,
            "world_size": trainer.world_size,
            "zero_stage": trainer.cfg.deepspeed.zero_stage,
            "engine": "plain" if type(trainer.engine).__name__ == "PlainEngine" else "deepspeed",
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
