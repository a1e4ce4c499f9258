"""BERT encoder backend: a Hugging Face ``BertModel`` over window embeddings.

``BertModel`` embeds integer token ids by default; windows are float vectors, so the patch
embedding (``Conv1d(C, hidden_size)``, i.e. the projection to BERT's hidden size) is fed as
``inputs_embeds`` together with ``position_ids`` = the true window indices of the tokens given
(visible windows for the online encoder, masked windows for the target encoder). BERT then adds
its own position (and token-type 0) embeddings, LayerNorm and dropout, so positions stay correct
under masking. TimeMAE's own learnable position table is *not* added to BERT inputs (it would
double-count positions); it is still used for the regressor queries (mask token + position).

Unused BERT parts are dropped so every parameter receives a gradient (DDP/ZeRO friendly) and the
EMA copies only what is used: the pooler (``add_pooling_layer=False``) and the word-embedding
table (``inputs_embeds`` bypasses it).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BertEncoder", "build_bert_encoder", "load_pretrained_bert", "bert_weight_files"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report / progress bars (we check the loading info ourselves)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class BertEncoder(nn.Module):
    """``(B, N, hidden)`` window embeddings + ``(B, N)`` window indices -> ``(B, N, hidden)``."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        # inputs_embeds bypasses the token table: drop it (30k x hidden parameters without gradient).
        self.bert.embeddings.word_embeddings = None

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    @property
    def num_positions(self) -> int:
        return self.bert.config.max_position_embeddings

    def bert_config_dict(self) -> dict[str, Any]:
        return self.bert.config.to_dict()

    def forward(self, x_BND: torch.Tensor, positions_BN: torch.Tensor | None = None) -> torch.Tensor:
        if positions_BN is None:
            B, N, _ = x_BND.shape
            positions_BN = torch.arange(N, device=x_BND.device).expand(B, N)
        return self.bert(inputs_embeds=x_BND, position_ids=positions_BN).last_hidden_state


def _new_bert(config) -> nn.Module:
    from transformers import BertModel

    with _quiet_transformers():
        return BertModel(config, add_pooling_layer=False)


def build_bert_encoder(
    d_model: int, num_layers: int, num_heads: int, d_ffn: int, dropout: float, num_positions: int
) -> BertEncoder:
    """A randomly initialised BERT (BERT's own init) shaped from TimeMAE's config."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=1,  # the token table is dropped anyway
        hidden_size=d_model,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=d_ffn,
        hidden_act="gelu",
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=num_positions,
        type_vocab_size=1,
    )
    return BertEncoder(_new_bert(config))


def bert_from_config_dict(config_dict: dict[str, Any]) -> BertEncoder:
    """Rebuild the architecture saved by :meth:`BertEncoder.bert_config_dict` (weights loaded later)."""
    from transformers import BertConfig

    return BertEncoder(_new_bert(BertConfig.from_dict(config_dict)))


def bert_weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return [folder / n for n in _WEIGHT_FILES if (folder / n).is_file()]


def _fail(folder: Path, problem: str, fix: str) -> ValueError:
    return ValueError(f"encoder.pretrained={str(folder)!r}: {problem}; {fix}")


def load_pretrained_bert(folder: str | Path, num_positions: int) -> BertEncoder:
    """Load a local Hugging Face BERT checkpoint (architecture + weights), offline.

    Raises ``ValueError`` naming the folder and the fix when it is not a BERT checkpoint, its
    weights do not match its ``config.json``, or it has fewer positions than windows.
    """
    folder = Path(folder).expanduser()
    fix_folder = (
        "point encoder.pretrained at a local Hugging Face BERT folder (config.json + "
        "model.safetensors or pytorch_model.bin), or set encoder.pretrained=null"
    )
    if not folder.is_dir():
        raise _fail(folder, "is not a directory", fix_folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise _fail(folder, "has no config.json, so it is not a Hugging Face checkpoint", fix_folder)
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(folder, f"config.json is not valid JSON ({e})", fix_folder) from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "bert":
        raise _fail(
            folder,
            f"is a {model_type!r} checkpoint, not BERT (config.json model_type must be 'bert')",
            fix_folder + " or use encoder.type=native",
        )
    if not bert_weight_files(folder):
        raise _fail(folder, "holds no model.safetensors or pytorch_model.bin", fix_folder)
    max_pos = int(raw.get("max_position_embeddings", 0))
    if max_pos < num_positions:
        raise _fail(
            folder,
            f"has max_position_embeddings={max_pos} but the model needs L={num_positions} window positions",
            "shorten model.seq_len or raise model.wave_length so seq_len / wave_length <= "
            f"{max_pos}, or use a checkpoint with more positions",
        )

    from transformers import BertModel

    try:
        with _quiet_transformers():
            # ignore_mismatched_sizes: report mismatches ourselves (below) with a clear message
            # instead of transformers' multi-line report; nothing mismatched is ever used.
            bert, info = BertModel.from_pretrained(
                str(folder),
                local_files_only=True,
                add_pooling_layer=False,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                dtype=torch.float32,
            )
    except Exception as e:  # corrupt files, unreadable weights, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _fail(
            folder,
            f"could not be loaded ({type(e).__name__}: {first[:300]})",
            "re-export the checkpoint with save_pretrained, or point encoder.pretrained at a readable BERT folder",
        ) from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("embeddings.word_embeddings"))
    mismatched = sorted(
        (m for m in info.get("mismatched_keys", ()) if not str(m[0]).startswith("embeddings.word_embeddings")),
        key=lambda m: str(m[0]),
    )
    if mismatched:
        key, ckpt_shape, cfg_shape = mismatched[0]
        raise _fail(
            folder,
            f"weights do not match its config.json: {len(mismatched)} tensors differ in shape, e.g. "
            f"{key} is {tuple(ckpt_shape)} in the weights but {tuple(cfg_shape)} per config.json",
            "re-export the checkpoint with save_pretrained so config.json and weights agree, or point "
            "encoder.pretrained at a consistent BERT folder",
        )
    if missing:
        raise _fail(
            folder,
            f"weights do not match its config.json: {len(missing)} BERT tensors are missing "
            f"(e.g. {', '.join(missing[:3])})",
            "use a complete BertModel checkpoint (config.json + all encoder weights)",
        )
    return BertEncoder(bert)
