"""The pretraining loop: ``train`` -> ``train_step`` -> ``forward_backward``.

One loop serves both paths. It drives an *engine* with DeepSpeed's surface (``engine(x)``,
``backward``, ``step``, ``get_lr``, ``get_global_grad_norm``, ``save_checkpoint``,
``load_checkpoint``): a real ``DeepSpeedEngine`` in Ray workers, or :class:`PlainEngine`
(torch AdamW + the same warmup/cosine schedule) for ``timemae pretrain --single-process``.

The momentum target encoder lives outside the engine (replicated, float32, no grad) and is
updated after every optimizer step from the online encoder's full parameters (gathered under
ZeRO-3). Host syncs happen on logging steps only (marked ``# host sync``).

``run.eval_every``: every that many steps and at the end, rank 0 fits a linear probe on the
online encoder (``timemae_dist.eval.linear_probe_val_accuracy``: <= 2048 windows of the train
and validation splits, never test) and logs ``eval/linear_val_acc``. Under ZeRO-3 every rank
joins one ``GatheredParameters`` collective and rank 0 probes a plain float32 replica built
from the gathered weights (so no ZeRO-3 hook runs on rank 0 alone); the same replica is used
for bf16/fp16 engines. The probe's wall time is excluded from the throughput figures.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from timemae_dist.model import TimeMAE
from timemae_dist.train.config import PretrainConfig
from timemae_dist.train.flat import FlatParameters, flat_view
from timemae_dist.train.metrics import MetricsWriter, StepClock, collapse_warning, memory_metrics

__all__ = ["TrainState", "PlainEngine", "Trainer", "clip_grad_norm", "clip_flat_grad_", "EmaUpdate", "warmup_cosine_ratio", "total_steps"]


def total_steps(cfg: PretrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps`` or ``epochs`` passes over the split."""
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    return max(1, cfg.trainer.epochs * batches_per_epoch // cfg.trainer.grad_accum)


def warmup_cosine_ratio(it: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of DeepSpeed's ``WarmupCosineLR`` (linear warm-up from 0) at iteration ``it``."""
    if it < 0:
        return 0.0
    warmup = max(2, warmup)
    if it < warmup:
        return it / warmup
    progress = min(1.0, (it - warmup + 1) / max(1, total - warmup))
    return max(0.0, min_ratio + (1.0 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


@dataclass
class TrainState:
    """Trainer counters (resumable)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current loader epoch
    windows: int = 0  # windows consumed by all ranks together

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "windows": self.windows}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.step, self.epoch, self.windows = int(sd["step"]), int(sd["epoch"]), int(sd["windows"])


def clip_grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """The 2-norm of the parameters' gradients (foreach kernels); with ``clip > 0`` the gradients
    are first scaled by ``min(1, clip / (norm + 1e-6))`` (torch's and DeepSpeed's rule)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))


def clip_flat_grad_(grad: torch.Tensor, clip: float) -> torch.Tensor:
    """:func:`clip_grad_norm` for one flat gradient tensor (two kernels, no host sync)."""
    norm = torch.linalg.vector_norm(grad)
    if clip > 0:
        grad.mul_((clip / (norm + 1e-6)).clamp_(max=1.0))
    return norm


class EmaUpdate:
    """``target = m * target + (1 - m) * online`` for every parameter of the online encoder, in place.

    Under ZeRO-3 the online parameters are gathered first (``deepspeed.zero.GatheredParameters``).
    When they lie back to back in one buffer (``trainer.flat_params``,
    :mod:`timemae_dist.train.flat`), the target's parameters are laid out the same way and the update
    is two kernels over the whole encoder, the same arithmetic as the per-tensor foreach of
    :meth:`TimeMAE.momentum_update_`."""

    def __init__(self, target: nn.Module, online_encoder: nn.Module, momentum: float, zero3: bool = False):
        self.target, self.online_encoder, self.momentum, self.zero3 = target, online_encoder, momentum, zero3
        self.flat: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        flat_online = None if zero3 else flat_view(list(online_encoder.parameters()))
        if flat_online is not None:
            targets = list(target.parameters())
            flat_target = flat_view(targets)
            if flat_target is None:
                flat_target = FlatParameters(targets).param.detach()
            if flat_target.shape == flat_online.shape:
                self.flat = (flat_target, flat_online)

    @torch.no_grad()
    def __call__(self) -> None:
        params = list(self.online_encoder.parameters())
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                TimeMAE.momentum_update_(self.target, params, self.momentum)
        elif self.flat is not None and self._flat_intact(params):
            flat_target, flat_online = self.flat
            flat_target.mul_(self.momentum)
            flat_target.add_(flat_online, alpha=1.0 - self.momentum)
        else:
            TimeMAE.momentum_update_(self.target, params, self.momentum)

    def _flat_intact(self, online: list[torch.Tensor]) -> bool:
        """The flat views still span both encoders' parameters (a ``.data`` re-assignment or a move
        would end that; ``load_state_dict`` copies in place and keeps it)."""

        def spans(tensors: list[torch.Tensor], flat: torch.Tensor) -> bool:
            end = tensors[-1].data_ptr() + tensors[-1].numel() * tensors[-1].element_size()
            return tensors[0].data_ptr() == flat.data_ptr() and end == flat.data_ptr() + flat.numel() * flat.element_size()

        return spans(list(self.target.parameters()), self.flat[0]) and spans(online, self.flat[1])


class PlainEngine:
    """The part of DeepSpeedEngine's surface the loop uses, for one process without DeepSpeed."""

    def __init__(self, module: nn.Module, cfg: PretrainConfig, num_steps: int):
        ds = cfg.deepspeed
        self.module = module
        # trainer.flat_params: the optimizer steps one buffer that the parameters are views of
        self.flat = FlatParameters([p for p in module.parameters() if p.requires_grad]) if cfg.trainer.flat_params else None
        # fused=True: one kernel over all parameters (CPU and CUDA); ~5x faster than the default
        # per-parameter loop on CPU for this many small tensors.
        self.optimizer = torch.optim.AdamW(
            [self.flat.param] if self.flat is not None else module.parameters(), lr=ds.lr, betas=tuple(ds.betas), eps=ds.eps, weight_decay=ds.weight_decay, fused=True
        )
        self._lr0 = ds.lr
        self._sched = dict(warmup=ds.warmup_steps, total=num_steps, min_ratio=ds.min_lr_ratio)
        self.last_iteration = -1
        self._set_lr()
        self.grad_accum = cfg.trainer.grad_accum
        self.clip = ds.clip
        self.bf16 = ds.precision == "bf16"
        self.micro_steps = 0
        self._grad_norm: Optional[torch.Tensor] = None

    def _set_lr(self) -> None:
        lr = self._lr0 * warmup_cosine_ratio(self.last_iteration, **self._sched)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = torch.autocast(next(self.module.parameters()).device.type, torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.flat is not None:
            self._grad_norm = clip_flat_grad_(self.flat.gather_grads(), self.clip)
            self.optimizer.step()
            self.flat.release_grad()
        else:
            self._grad_norm = clip_grad_norm([p for p in self.module.parameters() if p.grad is not None], self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.last_iteration += 1
        self._set_lr()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[torch.Tensor]:
        return self._grad_norm

    def save_checkpoint(self, save_dir: str | Path, tag: str, client_state: dict) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "last_iteration": self.last_iteration,
                "micro_steps": self.micro_steps,
                "client_state": client_state,
            },
            d / "plain_engine.pt",
        )
        (Path(save_dir) / "latest").write_text(tag)

    def load_checkpoint(self, load_dir: str | Path) -> tuple[str, dict]:
        tag = (Path(load_dir) / "latest").read_text().strip()
        sd = torch.load(Path(load_dir) / tag / "plain_engine.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(sd["module"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.last_iteration = int(sd["last_iteration"])
        self.micro_steps = int(sd["micro_steps"])
        self._set_lr()
        return str(Path(load_dir) / tag), sd["client_state"]


class Trainer:
    """Runs pretraining on one rank: data -> engine -> EMA -> metrics -> checkpoints."""

    def __init__(
        self,
        cfg: PretrainConfig,
        engine: Any,
        target: nn.Module,
        loader: Any,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        num_steps: int,
        writer: MetricsWriter,
        save_checkpoint: Callable[["Trainer", dict[str, float]], Optional[str]],
        zero3: bool = False,
        trace_path: Optional[Path] = None,
    ):
        self.cfg = cfg
        self.engine = engine
        self.target = target  # float32 EMA master copy, outside the engine
        self.loader = loader
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_steps = num_steps
        self.writer = writer
        self._save_checkpoint = save_checkpoint
        self.zero3 = zero3
        self.state = TrainState(epoch=loader.epoch)
        self.clock = StepClock()
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: Optional[str] = None
        self._warned_collapse = False
        self._trace = open(trace_path, "a") if trace_path is not None else None
        # The encoder the forward uses as target: the master itself in fp32, a low-precision
        # shadow (refreshed after each EMA step) when the engine computes in bf16/fp16.
        compute_dtype = next(engine.module.parameters()).dtype
        if compute_dtype == torch.float32:
            self.target_compute = target
        else:
            self.target_compute = copy.deepcopy(target).to(compute_dtype)
        self.input_dtype = compute_dtype
        self.online_encoder = engine.module.encoder
        self.momentum = cfg.model.momentum
        self._ema = EmaUpdate(target, self.online_encoder, self.momentum, zero3=zero3)
        self.tokens_per_window = cfg.model.num_windows  # (pos_embed is partitioned under ZeRO-3)

    def resumed(self, checkpoint: str, meta: dict) -> None:
        """After ``load_checkpoint``: a run that has nothing left to do still reports that
        checkpoint and its metrics in the summary (instead of no checkpoint and NaN losses)."""
        self.last_checkpoint = str(checkpoint)
        self.last_metrics = {k: float(v) for k, v in meta.get("metrics", {}).items()}

    # -------------------------------------------------------------------------------------
    # the loop

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches forever, advancing the loader's epoch (resumes mid-epoch)."""
        while True:
            loader = self.loader
            if loader.epoch == self.state.epoch and loader.batches_consumed >= loader.num_batches:
                self.state.epoch += 1  # the epoch ended (possibly right before a checkpoint)
            loader.set_epoch(self.state.epoch)
            yield from loader

    def train(self) -> dict[str, Any]:
        """Run until ``num_steps`` optimizer steps; returns the final summary."""
        cfg = self.cfg
        start_step = self.state.step
        t_start = time.perf_counter()
        self.engine.train()
        batches = self.batches()
        self.clock.reset()
        every_ckpt = cfg.run.checkpoint_every
        stop = self.num_steps if cfg.trainer.stop_after is None else min(cfg.trainer.stop_after, self.num_steps)
        while self.state.step < stop:
            out = self.train_step(batches)
            step = self.state.step
            log_now = step % cfg.run.log_every == 0 or step == stop
            if log_now:
                self.last_metrics = self.log_metrics(out)
                self._check_finite(step, self.last_metrics)
            if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == stop):
                self.evaluate()
            if (every_ckpt and step % every_ckpt == 0) or step == stop:
                if not self.last_metrics or not log_now:
                    self.last_metrics = {**self.last_metrics, **self.reduce_losses(out)}
                    grad_norm = self.engine.get_global_grad_norm()
                    norm = {} if grad_norm is None else {"optim/grad_norm": float(grad_norm)}  # global: same on all ranks
                    self._check_finite(step, {**self.last_metrics, **norm})  # never save a diverged model
                self.last_checkpoint = self._save_checkpoint(self, self.last_metrics)
        elapsed = time.perf_counter() - t_start
        done = self.state.step - start_step
        windows = done * cfg.trainer.global_batch
        summary = {
            "steps": self.state.step,
            "steps_this_run": done,
            "windows_per_s": windows / elapsed if elapsed > 0 else float("nan"),
            "final_loss": self.last_metrics.get("loss/total", float("nan")),
            "final_loss_mrr": self.last_metrics.get("loss/mrr", float("nan")),
            "final_loss_mcc": self.last_metrics.get("loss/mcc", float("nan")),
            "checkpoint": self.last_checkpoint,
            "elapsed_s": elapsed,
        }
        if self._trace is not None:
            self._trace.close()
            # Debugging/tests: each rank's EMA target encoder, to compare ranks and ZeRO stages.
            trace_dir = Path(self._trace.name).parent
            torch.save(
                {k: v.detach().float().cpu() for k, v in self.target.state_dict().items()},
                trace_dir / f"target_rank_{self.rank:05d}.pt",
            )
        return summary

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimizer step: ``grad_accum`` micro-batches, engine step, EMA of the target."""
        out: dict[str, torch.Tensor] = {}
        for _ in range(self.cfg.trainer.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            x_BCT = batch["x"].to(self.device, dtype=self.input_dtype, non_blocking=True)
            self.clock.data_wait(time.perf_counter() - t0)
            if self._trace is not None:  # debugging/tests only: the loader's indices are host tensors
                self._trace.write(json.dumps({"step": self.state.step, "index": batch["index"].tolist()}) + "\n")
            out = self.forward_backward(x_BCT)
            self.engine.step()  # DeepSpeed steps the optimizer on the accumulation boundary
        self.ema_update()
        self.state.step += 1
        self.state.windows += self.cfg.trainer.global_batch
        self.clock.step_done(self.cfg.trainer.micro_batch_size * self.cfg.trainer.grad_accum)
        return out

    def forward_backward(self, x_BCT: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.engine(x_BCT, target_encoder=self.target_compute)
        self.engine.backward(out["loss"])
        return out

    def ema_update(self) -> None:
        """``target = m * target + (1 - m) * online`` from the online encoder's full parameters."""
        self._ema()
        if self.target_compute is not self.target:
            torch._foreach_copy_(list(self.target_compute.parameters()), list(self.target.parameters()))

    # -------------------------------------------------------------------------------------
    # periodic linear probe (eval steps only)

    def evaluate(self) -> Optional[float]:
        """Log ``eval/linear_val_acc`` (rank 0) on the validation split; returns it on rank 0."""
        t0 = time.perf_counter()
        model = self._probe_model()  # a collective under ZeRO-3: every rank calls it
        acc = None
        if self.rank == 0:
            from timemae_dist.eval import linear_probe_val_accuracy

            acc = linear_probe_val_accuracy(model, self.cfg.data.store, max_windows=2048,
                                            normalize=self.cfg.data.normalize)
            self.writer.log_eval(self.state.step, {"eval/linear_val_acc": acc})
        self.clock.exclude(time.perf_counter() - t0)
        return acc

    def _probe_model(self) -> Optional[nn.Module]:
        """Rank 0: the online model to probe (the engine's, or a float32 replica); None elsewhere."""
        module = self.engine.module
        if not self.zero3 and self.input_dtype == torch.float32:
            return module if self.rank == 0 else None
        state = None
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if self.rank == 0:
                    state = {n: p.detach().float().clone() for n, p in module.named_parameters()}
        elif self.rank == 0:
            state = {n: p.detach().float().clone() for n, p in module.named_parameters()}
        if self.rank != 0:
            return None
        if getattr(self, "_probe_replica", None) is None:
            with torch.random.fork_rng(devices=[]):  # building must not move the training RNG
                replica = TimeMAE(module.config)
            replica.detach_target_encoder()
            self._probe_replica = replica.to(self.device)
        missing, unexpected = self._probe_replica.load_state_dict(state, strict=False)
        if unexpected or any(k in dict(self._probe_replica.named_parameters()) for k in missing):
            raise RuntimeError(f"linear probe replica does not match the model: {missing[:4]} {unexpected[:4]}")
        return self._probe_replica

    def _check_finite(self, step: int, metrics: dict[str, float]) -> None:
        """Stop a diverged run with one clear error before it logs or saves a non-finite model.

        Runs on logging and checkpoint steps only (their losses are already on the host and
        all-reduced, so every rank stops together); the checkpoints already saved are kept."""
        # fp16's dynamic loss scaling makes an inf gradient norm routine (that step is skipped)
        keys = ("loss/",) if self.cfg.deepspeed.precision == "fp16" else ("loss/", "optim/grad_norm")
        bad = {k: v for k, v in metrics.items() if k.startswith(keys) and not math.isfinite(v)}
        if not bad:
            return
        from timemae_dist.train.errors import PretrainError

        last = self.last_checkpoint or "none yet"
        raise PretrainError(
            f"step {step}: training diverged ({', '.join(f'{k}={v}' for k, v in bad.items())}) and was stopped "
            f"before saving; the last good checkpoint is {last}. Lower deepspeed.lr "
            f"(now {self.cfg.deepspeed.lr:g}), keep deepspeed.clip > 0 (now {self.cfg.deepspeed.clip:g}), lengthen "
            f"deepspeed.warmup_steps or train in fp32, then re-run the command (it resumes from that checkpoint)"
        )

    # -------------------------------------------------------------------------------------
    # metrics (logging steps only: these sync with the host)

    def reduce_losses(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        vals = torch.stack([out["loss"].detach(), out["loss_mrr"].detach(), out["loss_mcc"].detach()]).float()
        if self.world_size > 1:
            dist.all_reduce(vals)
            vals /= self.world_size
        total, mrr, mcc = vals.tolist()  # host sync (checkpoint steps only)
        return {"loss/total": total, "loss/mrr": mrr, "loss/mcc": mcc}

    def log_metrics(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        m = TimeMAE.pretrain_metrics(out)  # host sync (logging step)
        vals = torch.tensor(
            [m["loss"], m["loss_mrr"], m["loss_mcc"], m["mcc_top1"], m["mcc_ndcg10"], m["repr_spread"]],
            device=self.device,
        )
        if self.world_size > 1:
            dist.all_reduce(vals)
            vals /= self.world_size
        total, mrr, mcc, top1, ndcg, spread = vals.tolist()  # host sync (logging step)
        scalars = {
            "loss/total": total,
            "loss/mrr": mrr,
            "loss/mcc": mcc,
            "mcc/top1": top1,
            "mcc/ndcg10": ndcg,
            "repr/spread": spread,
            "optim/lr": float(self.engine.get_lr()[0]),
        }
        warning = collapse_warning(self.state.step, spread, top1, self.cfg.model.vocab_size)
        if warning is not None and not self._warned_collapse:
            self._warned_collapse = True
            self.writer.summary(warning)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["optim/grad_norm"] = float(grad_norm)  # host sync (logging step)
        scalars.update(self.clock.window(self.world_size, self.tokens_per_window))
        scalars.update(memory_metrics(self.device))
        scalars["progress/epoch"] = float(self.state.epoch)
        self.writer.log(self.state.step, scalars)
        self.clock.reset()
        return scalars
