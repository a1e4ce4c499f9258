"""Checks that run in the driver before any worker starts: every user error becomes one line.

:func:`resolve` opens the store, fills ``model.in_channels`` / ``model.seq_len`` from it, makes
paths absolute (workers may run elsewhere, e.g. under ``ray job submit``) and checks that the
batch sizes fit the split. :func:`check_cluster` checks the Ray cluster can place the workers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from data_pipeline.loader import select_windows
from data_pipeline.typedconfig import ConfigError
from timemae_dist.train.config import PretrainConfig
from timemae_dist.train.errors import PretrainError, open_store_or_fail

__all__ = ["resolve", "check_cluster", "StorePlan"]


@dataclasses.dataclass
class StorePlan:
    """What the driver learned from the store."""

    num_windows: int  # the windows an epoch reads (the labelled ones with data.labelled_only)
    batches_per_epoch: int
    channels: list[str]
    window: int
    labelled_only: bool = False

    def describe(self, split: str) -> str:
        """``"N windows in split 'train'"`` (``"N labelled windows ..."`` with data.labelled_only)."""
        return f"{self.num_windows} {'labelled ' if self.labelled_only else ''}windows in split {split!r}"


def resolve(cfg: PretrainConfig) -> tuple[PretrainConfig, StorePlan]:
    """A copy of ``cfg`` ready for workers, and the store facts; PretrainError on bad input."""
    cfg = dataclasses.replace(cfg)
    cfg.data = dataclasses.replace(cfg.data, store=str(Path(cfg.data.store).expanduser().resolve()))
    cfg.run = dataclasses.replace(cfg.run, storage_path=str(Path(cfg.run.storage_path).expanduser().resolve()))
    store = open_store_or_fail(cfg.data.store)
    if cfg.data.split not in store.splits:
        raise PretrainError(
            f"data.split: store {cfg.data.store!r} has no split {cfg.data.split!r}; "
            f"choose one of {', '.join(store.splits)}"
        )
    C, T = len(store.channels), int(store.window)
    try:
        cfg.model = cfg.model.with_data_shape(C, T)
    except ConfigError as e:
        raise PretrainError(
            f"model.{e.key}: {e.detail} (store {cfg.data.store!r} holds windows of "
            f"{C} channels x {T} samples)"
        ) from None
    if cfg.data.normalize:
        try:
            store.normalization()
        except Exception as e:
            raise PretrainError(f"data.normalize: {e}") from None
    n = store.num_windows(cfg.data.split)
    if cfg.data.labelled_only:  # the windows the loader will read
        n = len(select_windows(store.read_column(cfg.data.split, "label"), labelled_only=True))
        if n == 0:
            raise PretrainError(
                f"data.labelled_only: split {cfg.data.split!r} of store {cfg.data.store!r} has no "
                "labelled windows; set data.labelled_only=false"
            )
    tr = cfg.trainer
    per_rank = n // tr.num_workers
    batches = per_rank // tr.micro_batch_size if cfg.data.remainder == "drop" else -(-per_rank // tr.micro_batch_size)
    if n < tr.num_workers * tr.micro_batch_size:
        raise PretrainError(
            f"trainer.micro_batch_size: {tr.micro_batch_size} windows per worker x {tr.num_workers} "
            f"workers do not fit the {n} windows of split {cfg.data.split!r}; lower "
            "trainer.micro_batch_size or trainer.num_workers"
        )
    if tr.max_steps == 0 and tr.epochs * batches < tr.grad_accum:
        raise PretrainError(
            f"trainer.grad_accum: {tr.grad_accum} micro-batches per step exceed the {tr.epochs * batches} "
            "micro-batches of the run; lower trainer.grad_accum or set trainer.max_steps"
        )
    return cfg, StorePlan(
        num_windows=n, batches_per_epoch=batches, channels=list(store.channels), window=T,
        labelled_only=cfg.data.labelled_only,
    )


def check_cluster(cfg: PretrainConfig, resources: dict[str, Any], nodes: list[dict[str, Any]]) -> None:
    """Fail fast (instead of waiting forever) when Ray cannot place the requested workers."""
    tr = cfg.trainer
    need_cpu = tr.num_workers * tr.cpus_per_worker
    have_cpu = float(resources.get("CPU", 0))
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    per_node = [float(n.get("Resources", {}).get("CPU", 0)) for n in alive]
    largest = max(per_node, default=0.0)
    summary = f"Ray cluster resources: CPU={have_cpu:g}, GPU={float(resources.get('GPU', 0)):g} on {len(alive)} node(s)"
    if need_cpu > have_cpu:
        raise PretrainError(
            f"trainer.num_workers: {tr.num_workers} workers x trainer.cpus_per_worker={tr.cpus_per_worker} "
            f"need {need_cpu} CPUs but {summary}; lower trainer.num_workers / trainer.cpus_per_worker "
            "or add nodes to the cluster"
        )
    if tr.cpus_per_worker > largest:
        raise PretrainError(
            f"trainer.cpus_per_worker: {tr.cpus_per_worker} CPUs per worker but the largest node has "
            f"{largest:g} ({summary}); lower trainer.cpus_per_worker"
        )
    if tr.use_gpu:
        have_gpu = float(resources.get("GPU", 0))
        if tr.num_workers > have_gpu:
            raise PretrainError(
                f"trainer.use_gpu: {tr.num_workers} workers need {tr.num_workers} GPUs but {summary}; "
                "lower trainer.num_workers or set trainer.use_gpu=false"
            )
