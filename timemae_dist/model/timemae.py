"""TimeMAE: decoupled masked autoencoder for time series (defaults = the official code).

Pretraining forward (``x_BCT`` -> losses), with ``L`` windows, ``V`` visible, ``M`` masked:

1. ``emb_BLD = Conv1d(C, D, kernel=stride=wave_length)(pad(x))`` (T zero-padded at the end).
2. Codewords: ``argmax(tokenizer(emb) + gumbel noise)`` of the masked windows (no gradient;
   equals the official ``argmax(gumbel_softmax(tokenizer(emb)))`` in distribution for any tau;
   :func:`draw_codewords`, one C pass on CPU).
3. Masks: ``per_sample`` (argsort of uniform noise per window) or ``per_batch`` (one ``randperm``
   for the batch, as the official code); or explicit ``ids_keep`` / ``ids_mask``.
4. ``fused_mask_gather``: visible = emb[keep] + pos[keep]; target_in = emb[mask] + pos[mask];
   queries = mask_token + pos[mask].
5. ``rep_visible = encoder(visible)``; ``target = target_encoder(target_in)`` (momentum copy,
   no grad); ``pred = regressor(queries, rep_visible)`` (cross-attention only);
   ``logits = tokenizer(pred)``.
6. ``loss = alpha * MSE(pred, target) + beta * CE_ls(logits, codewords)`` in float32.

Target encoder and ZeRO/DeepSpeed: by default the momentum target encoder is a registered
submodule (``model.target_encoder``, ``requires_grad=False``) so ``.to()``, ``state_dict`` and
single-process training just work. A distributed trainer calls ``model.detach_target_encoder()``
which unregisters it and returns it (the trainer then owns its device/dtype; the model keeps a
plain, unregistered reference, so ``forward`` still finds it unless ``target_encoder=`` is
passed). The EMA step is ``TimeMAE.momentum_update_(target, online_params, momentum)``, usable
with gathered ZeRO-3 parameters; ``model.momentum_update()`` is the single-process shortcut.

The model never imports Ray or DeepSpeed and never syncs with the host in ``forward``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.typedconfig import ConfigError, from_dict, to_dict
from timemae_dist.kernels import cpu_fused
from timemae_dist.model.config import TimeMAEConfig
from timemae_dist.model.layers import Regressor, TransformerEncoder, init_linear_official
from timemae_dist.model.objectives import codeword_ndcg, codeword_top1, representation_spread, timemae_loss

__all__ = ["TimeMAE", "build_model", "draw_codewords", "gumbel_noise", "random_masks"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_FORMAT_VERSION = 1


class _Unregistered:
    """A plain holder: ``nn.Module`` does not register (or move, or save) modules kept in it."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module


def random_masks(
    batch_size: int,
    num_windows: int,
    num_masked: int,
    masking: str = "per_sample",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_keep_BV, ids_mask_BM)`` int64; visible = first L - M of a random permutation."""
    if masking == "per_sample":
        ids_BL = torch.rand(batch_size, num_windows, device=device, generator=generator).argsort(dim=-1)
    elif masking == "per_batch":
        ids_BL = torch.randperm(num_windows, device=device, generator=generator).expand(batch_size, -1)
    else:
        raise ValueError(f"masking must be 'per_sample' or 'per_batch', got {masking!r}")
    num_visible = num_windows - num_masked
    return ids_BL[:, :num_visible].contiguous(), ids_BL[:, num_visible:].contiguous()


def gumbel_noise(shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(U))``, ``U ~ rand`` (float32).

    About 4x cheaper on CPU than ``-log(Exponential(1))`` via ``exponential_``. ``rand`` can
    return exactly 0, which gives ``-inf`` (that codeword cannot win the argmax; probability
    2**-24 per element); its largest value, ``1 - 2**-24``, gives 16.6.
    """
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    return u.log_().neg_().log_().neg_()


def draw_codewords(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``argmax(logits + Gumbel noise, dim=-1)``: one sample of ``softmax(logits)`` per row.

    On CPU in one C pass where the fused kernels apply (:func:`timemae_dist.kernels.cpu_fused.
    gumbel_argmax`: its own counter-based stream, one seed drawn from ``generator``); elsewhere
    :func:`gumbel_noise` + ``argmax``. Same distribution, different random streams."""
    if cpu_fused.applies_gumbel(logits):
        return cpu_fused.gumbel_argmax(logits, generator)
    return (logits + gumbel_noise(logits.shape, logits.device, generator)).argmax(dim=-1)


def _gather_eager(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM, add_pos: bool):
    """Plain indexing version of the masking gather (``kernel_backend: eager`` and BERT)."""
    D = emb_BLD.shape[-1]
    visible = emb_BLD.gather(1, ids_keep_BV.unsqueeze(-1).expand(-1, -1, D))
    target_in = emb_BLD.gather(1, ids_mask_BM.unsqueeze(-1).expand(-1, -1, D)).detach()
    pos_mask_BMD = pos_LD[ids_mask_BM]
    if add_pos:
        visible = visible + pos_LD[ids_keep_BV]
        target_in = target_in + pos_mask_BMD.detach()
    queries = mask_token_D + pos_mask_BMD
    return visible, target_in, queries


class TimeMAE(nn.Module):
    """TimeMAE model. ``TimeMAE(cfg)``; see the module docstring for the forward equations."""

    def __init__(self, config: TimeMAEConfig, *, _bert_config: Optional[dict] = None):
        super().__init__()
        config.require_data_shape()
        config.validate()
        config = copy.deepcopy(config)
        num_windows = config.num_windows
        enc = config.encoder

        # --- encoder (online); BERT fixes d_model / num_layers when it comes from a checkpoint
        if enc.type == "bert":
            from timemae_dist.model import bert as bert_mod

            if _bert_config is not None:
                encoder = bert_mod.bert_from_config_dict(_bert_config)
            elif enc.pretrained is not None:
                encoder = bert_mod.load_pretrained_bert(enc.pretrained, num_windows)
            else:
                encoder = bert_mod.build_bert_encoder(
                    config.d_model, config.num_layers, config.num_heads,
                    config.ffn_mult * config.d_model, config.dropout, num_windows,
                )
            config.d_model = encoder.hidden_size
            config.num_layers = encoder.bert.config.num_hidden_layers
            if encoder.num_positions < num_windows:
                raise ConfigError("seq_len", f"L={num_windows} windows exceed BERT's {encoder.num_positions} positions")
            if config.d_model % config.num_heads:
                raise ConfigError(
                    "num_heads",
                    f"the regressor needs BERT's hidden size {config.d_model} divisible by num_heads={config.num_heads}",
                )
        else:
            encoder = TransformerEncoder(
                config.d_model, config.num_layers, config.num_heads, config.ffn_mult * config.d_model,
                config.enable_res_parameter, config.dropout,
            )
        self.config = config
        D = config.d_model

        self.patch_embed = nn.Conv1d(config.in_channels, D, kernel_size=config.wave_length, stride=config.wave_length)
        self.pos_embed = nn.Parameter(torch.randn(num_windows, D))  # official: nn.Embedding init N(0, 1)
        self.mask_token = nn.Parameter(torch.randn(D))
        self.encoder = encoder
        self.tokenizer = nn.Linear(D, config.vocab_size)
        self.regressor = Regressor(
            D, config.reg_layers, config.num_heads, config.ffn_mult * D, config.enable_res_parameter, config.reg_dropout
        )
        self.head = nn.Linear(D, config.num_classes) if config.num_classes else None

        # Official init on our own Linear layers; BERT keeps its own (or pretrained) weights.
        for m in (self.tokenizer, self.regressor, self.head):
            if m is not None:
                m.apply(init_linear_official)
        if enc.type == "native":
            self.encoder.apply(init_linear_official)

        self._target_holder: Optional[_Unregistered] = None
        target = copy.deepcopy(self.encoder)
        target.requires_grad_(False)
        self._modules["target_encoder"] = target  # (add_module would trip over the property)

    # ------------------------------------------------------------------------------------
    # target encoder (momentum copy) management

    @property
    def target_encoder(self) -> nn.Module:  # type: ignore[override]
        """The momentum target encoder, registered or (after detach) held unregistered."""
        mod = self._modules.get("target_encoder")
        if mod is None:
            holder = self.__dict__.get("_target_holder")
            mod = holder.module if holder is not None else None
        if mod is None:
            raise AttributeError("TimeMAE has no target encoder yet")
        return mod

    @property
    def target_encoder_attached(self) -> bool:
        return self._modules.get("target_encoder") is not None

    def detach_target_encoder(self) -> nn.Module:
        """Unregister the target encoder (no longer in parameters()/state_dict()/.to()) and return it.

        The model keeps an unregistered reference so ``forward``/``momentum_update`` still work;
        the caller owns its device and dtype from now on (keep it float32 for the EMA).
        """
        mod = self._modules.pop("target_encoder", None)
        if mod is None:
            return self.target_encoder
        self.__dict__["_target_holder"] = _Unregistered(mod)
        return mod

    def attach_target_encoder(self, module: Optional[nn.Module] = None) -> None:
        """Register ``module`` (default: the held one) as the target encoder again."""
        if module is None:
            module = self.target_encoder
        online = [p.shape for p in self.encoder.parameters()]
        if [p.shape for p in module.parameters()] != online:
            raise ValueError("attach_target_encoder: the module's parameters do not match the online encoder's")
        module.requires_grad_(False)
        self.__dict__["_target_holder"] = None
        self._modules["target_encoder"] = module

    @torch.no_grad()
    def reset_target_encoder(self) -> None:
        """Copy the online encoder into the target encoder (as at construction)."""
        for t, o in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            t.copy_(o.detach())

    @staticmethod
    @torch.no_grad()
    def momentum_update_(target_encoder: nn.Module, online_params: Iterable[torch.Tensor], momentum: float) -> None:
        """EMA in place: ``t = momentum * t + (1 - momentum) * online`` for every parameter.

        ``online_params`` must follow ``online_encoder.parameters()`` order and be full tensors
        (gather ZeRO-3 partitions first); they are cast to the target's dtype/device.
        """
        targets = list(target_encoder.parameters())
        sources = [p.detach() for p in online_params]
        if len(targets) != len(sources):
            raise ValueError(
                f"momentum_update_: target encoder has {len(targets)} parameters but {len(sources)} online "
                "parameters were given; pass online_encoder.parameters()"
            )
        for i, (t, s) in enumerate(zip(targets, sources)):
            if t.shape != s.shape:
                raise ValueError(
                    f"momentum_update_: parameter {i} has shape {tuple(s.shape)} but the target's is "
                    f"{tuple(t.shape)}; under ZeRO-3 gather the online parameters first"
                )
        sources = [s if (s.dtype == t.dtype and s.device == t.device) else s.to(t) for t, s in zip(targets, sources)]
        if targets:
            torch._foreach_mul_(targets, momentum)
            torch._foreach_add_(targets, sources, alpha=1.0 - momentum)

    def momentum_update(self, momentum: Optional[float] = None) -> None:
        """EMA step of the target encoder from the online one; call after each optimizer step."""
        m = self.config.momentum if momentum is None else momentum
        self.momentum_update_(self.target_encoder, self.encoder.parameters(), m)

    # ------------------------------------------------------------------------------------
    # forward pieces

    @property
    def num_windows(self) -> int:
        return self.pos_embed.shape[0]

    def embed(self, x_BCT: torch.Tensor) -> torch.Tensor:
        """Patch embedding ``(B, C, T) -> (B, L, D)``; T is zero-padded to a multiple of wave_length."""
        cfg = self.config
        if x_BCT.dim() != 3 or x_BCT.shape[1] != cfg.in_channels:
            raise ValueError(
                f"TimeMAE expects x of shape (B, C={cfg.in_channels}, T), got {tuple(x_BCT.shape)}"
            )
        T = x_BCT.shape[-1]
        L = math.ceil(T / cfg.wave_length)
        if L != self.num_windows:
            raise ValueError(
                f"x has T={T} samples -> {L} windows of {cfg.wave_length}, but the model was built for "
                f"seq_len={cfg.seq_len} ({self.num_windows} windows); rebuild with model.seq_len={T}"
            )
        pad = L * cfg.wave_length - T
        if pad:
            x_BCT = F.pad(x_BCT, (0, pad))
        weight = self.patch_embed.weight
        if x_BCT.device.type == "cpu" and not cpu_fused.is_zero3_partition(weight):
            # kernel = stride: the convolution is one matmul over (B*L) windows of C*w samples; on CPU
            # ~2x faster forward+backward than Conv1d's (and no transpose copy after it). Not for
            # ZeRO-3 partitions, which only the module's own forward hook gathers.
            B, C, _ = x_BCT.shape
            w = cfg.wave_length
            win_BLCw = x_BCT.reshape(B, C, L, w).permute(0, 2, 1, 3).reshape(B, L, C * w)
            return F.linear(win_BLCw, weight.reshape(weight.shape[0], C * w), self.patch_embed.bias)
        return self.patch_embed(x_BCT).transpose(1, 2).contiguous()

    def _masked_inputs(self, emb_BLD, ids_keep_BV, ids_mask_BM):
        if self.config.encoder.type == "bert":
            # BERT adds its own position embeddings from position_ids; ours only feed the queries.
            return _gather_eager(emb_BLD, self.pos_embed, self.mask_token, ids_keep_BV, ids_mask_BM, add_pos=False)
        backend = self.config.kernel_backend
        if backend != "eager":
            try:
                from timemae_dist.kernels import fused_mask_gather
            except ImportError as e:
                if backend != "auto":
                    raise ImportError(
                        f"model.kernel_backend={backend} needs timemae_dist.kernels ({e}); use kernel_backend=eager"
                    ) from e
                backend = "eager"
        if backend == "eager":
            return _gather_eager(emb_BLD, self.pos_embed, self.mask_token, ids_keep_BV, ids_mask_BM, add_pos=True)
        return fused_mask_gather(
            emb_BLD, self.pos_embed, self.mask_token, ids_keep_BV, ids_mask_BM,
            backend=None if backend == "auto" else backend,
        )

    def _as_ids(self, ids: torch.Tensor, B: int, name: str, device) -> torch.Tensor:
        if ids.dim() == 1:  # one set for the whole batch (per_batch)
            ids = ids.unsqueeze(0).expand(B, -1)
        if ids.dim() != 2 or ids.shape[0] != B or ids.shape[1] == 0:
            raise ValueError(f"{name} must be (B={B}, n>0) or (n,), got shape {tuple(ids.shape)}")
        return ids.to(device=device, dtype=torch.long).contiguous()

    def forward(
        self,
        x_BCT: torch.Tensor,
        ids_keep: Optional[torch.Tensor] = None,
        ids_mask: Optional[torch.Tensor] = None,
        target_encoder: Optional[nn.Module] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Pretraining forward. Returns a dict of tensors (no host sync):

        ``loss``, ``loss_mrr``, ``loss_mcc`` (float32 scalars); ``logits`` (B, M, vocab) codeword
        logits of the predicted masked representations; ``codewords`` (B, M) int64; ``pred`` and
        ``target`` (B, M, D); ``rep_visible`` (B, V, D); ``ids_keep`` (B, V); ``ids_mask`` (B, M).

        ``ids_keep``/``ids_mask`` ((B, n) or (n,) int64) override the random masks; ``generator``
        drives the masks (when drawn) and then the gumbel noise of the codewords.
        """
        cfg = self.config
        emb_BLD = self.embed(x_BCT)
        B, L, D = emb_BLD.shape
        if (ids_keep is None) != (ids_mask is None):
            raise ValueError("pass both ids_keep and ids_mask, or neither")
        if ids_keep is None:
            ids_keep, ids_mask = random_masks(B, L, cfg.num_masked, cfg.masking, emb_BLD.device, generator)
        else:
            ids_keep = self._as_ids(ids_keep, B, "ids_keep", emb_BLD.device)
            ids_mask = self._as_ids(ids_mask, B, "ids_mask", emb_BLD.device)

        # Codewords of the masked windows: argmax of gumbel-perturbed tokenizer logits of the
        # patch embeddings (before positions). No gradient flows through them.
        with torch.no_grad():
            emb_BMD = emb_BLD.gather(1, ids_mask.unsqueeze(-1).expand(-1, -1, D))
            tok_BMK = self.tokenizer(emb_BMD).float()
            codewords_BM = draw_codewords(tok_BMK, generator)

        visible_BVD, target_in_BMD, queries_BMD = self._masked_inputs(emb_BLD, ids_keep, ids_mask)

        rep_visible_BVD = self.encoder(visible_BVD, ids_keep)
        target_enc = self.target_encoder if target_encoder is None else target_encoder
        if target_enc.training != self.training:  # detached targets miss model.train()/eval()
            target_enc.train(self.training)
        with torch.no_grad():
            target_BMD = target_enc(target_in_BMD.detach(), ids_mask)
        pred_BMD = self.regressor(queries_BMD, rep_visible_BVD)
        logits_BMK = self.tokenizer(pred_BMD)

        loss, loss_mrr, loss_mcc = timemae_loss(
            pred_BMD, target_BMD, logits_BMK, codewords_BM, cfg.alpha, cfg.beta, cfg.label_smoothing
        )
        return {
            "loss": loss,
            "loss_mrr": loss_mrr,
            "loss_mcc": loss_mcc,
            "logits": logits_BMK,
            "codewords": codewords_BM,
            "pred": pred_BMD,
            "target": target_BMD,
            "rep_visible": rep_visible_BVD,
            "ids_keep": ids_keep,
            "ids_mask": ids_mask,
        }

    @staticmethod
    def pretrain_metrics(out: dict[str, torch.Tensor]) -> dict[str, float]:
        """Host floats for logging: losses, MCC top-1 and NDCG@10, the spread of the visible
        windows' representations (``representation_spread``; one device->host sync)."""
        vals = torch.stack(
            [
                out["loss"].detach().float(),
                out["loss_mrr"].detach().float(),
                out["loss_mcc"].detach().float(),
                codeword_top1(out["logits"], out["codewords"]),
                codeword_ndcg(out["logits"], out["codewords"], k=10),
                representation_spread(out["rep_visible"].detach()),
            ]
        ).tolist()  # the one host sync, on logging steps only
        return dict(zip(("loss", "loss_mrr", "loss_mcc", "mcc_top1", "mcc_ndcg10", "repr_spread"), vals))

    # ------------------------------------------------------------------------------------
    # downstream

    def encode(self, x_BCT: torch.Tensor) -> torch.Tensor:
        """Mean over all L windows of the online encoder output (no masking): (B, d_model)."""
        emb_BLD = self.embed(x_BCT)
        if self.config.encoder.type == "bert":
            B, L, _ = emb_BLD.shape
            positions_BL = torch.arange(L, device=emb_BLD.device).expand(B, L)
            h_BLD = self.encoder(emb_BLD, positions_BL)
        else:
            h_BLD = self.encoder(emb_BLD + self.pos_embed)
        return h_BLD.mean(dim=1)

    def classify(self, x_BCT: torch.Tensor) -> torch.Tensor:
        """Fine-tuning logits (B, num_classes) from the mean-pooled encoder output."""
        if self.head is None:
            raise ConfigError("num_classes", "the model has no classification head; build it with model.num_classes=K")
        return self.head(self.encode(x_BCT))

    # ------------------------------------------------------------------------------------
    # persistence

    def _export_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        if not self.target_encoder_attached:
            for k, v in self.target_encoder.state_dict().items():
                state[f"target_encoder.{k}"] = v
        return {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state.items()
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (float32, online + target encoder) and ``config.json``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "model_type": "timemae",
            "format_version": _FORMAT_VERSION,
            "config": to_dict(self.config),
        }
        if self.config.encoder.type == "bert":
            meta["bert_config"] = self.encoder.bert_config_dict()
        for name, write in (
            (WEIGHTS_NAME, lambda p: save_file(self._export_state(), str(p), metadata={"format": "pt"})),
            (CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")),
        ):
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, out / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "TimeMAE":
        """Rebuild a model saved by :meth:`save_pretrained` (no Ray/DeepSpeed; BERT folder not needed)."""
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_file, w_file = d / CONFIG_NAME, d / WEIGHTS_NAME
        if not cfg_file.is_file() or not w_file.is_file():
            raise ValueError(
                f"{str(d)!r} is not a TimeMAE checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "pass a folder written by TimeMAE.save_pretrained"
            )
        meta = json.loads(cfg_file.read_text())
        if meta.get("model_type") != "timemae":
            raise ValueError(f"{str(cfg_file)!r} is not a TimeMAE config (model_type={meta.get('model_type')!r})")
        cfg = from_dict(TimeMAEConfig, meta["config"])
        model = cls(cfg, _bert_config=meta.get("bert_config"))
        state = load_file(str(w_file), device=str(map_location))
        has_target = any(k.startswith("target_encoder.") for k in state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if has_target or not k.startswith("target_encoder.")]
        if missing or unexpected:
            raise ValueError(
                f"{str(w_file)!r} does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        if not has_target:
            model.reset_target_encoder()
        return model.to(map_location)


def build_model(config: TimeMAEConfig, in_channels: Optional[int] = None, seq_len: Optional[int] = None) -> TimeMAE:
    """Build a TimeMAE, filling the data shape (from the store's manifest) when given."""
    if in_channels is not None or seq_len is not None:
        if in_channels is None or seq_len is None:
            raise ValueError("build_model: pass both in_channels and seq_len, or neither")
        config = config.with_data_shape(in_channels, seq_len)
    return TimeMAE(config)
