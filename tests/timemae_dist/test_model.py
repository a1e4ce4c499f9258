"""TimeMAE model: parity with an eager transcription of the equations, EMA, target encoder
separation, persistence, shapes and config errors. Tiny shapes: the whole file runs in seconds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.typedconfig import ConfigError, from_dict
from timemae_dist.model import TimeMAE, TimeMAEConfig, build_model, random_masks
from timemae_dist.model.layers import ResidualNorm

torch.set_num_threads(1)


def tiny_cfg(**kw) -> TimeMAEConfig:
    base = dict(in_channels=3, seq_len=64, wave_length=8, d_model=16, num_layers=2, num_heads=2, reg_layers=2,
                vocab_size=12, kernel_backend="eager")
    base.update(kw)
    return TimeMAEConfig(**base)


# ---------------------------------------------------------------------------------------------
# Eager transcription of the TimeMAE equations (independent of timemae_dist.model.layers).


def _linear(x, lin):
    return x @ lin.weight.T + lin.bias


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attention(xq, xkv, attn, num_heads):
    B, Nq, D = xq.shape
    Nk = xkv.shape[1]
    dh = D // num_heads
    q = _linear(xq, attn.q_proj).view(B, Nq, num_heads, dh).transpose(1, 2)
    k = _linear(xkv, attn.k_proj).view(B, Nk, num_heads, dh).transpose(1, 2)
    v = _linear(xkv, attn.v_proj).view(B, Nk, num_heads, dh).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)
    o = (p @ v).transpose(1, 2).reshape(B, Nq, D)
    return _linear(o, attn.out_proj)


def _residual(x, y, res):  # post-LN: norm(x + a * y), dropout off
    return _layer_norm(x + res.a * y, res.norm)


def _ffn(x, ffn):
    return _linear(_gelu(_linear(x, ffn.linear1)), ffn.linear2)


def _encoder(x, enc, num_heads):
    for blk in enc.layers:
        x = _residual(x, _attention(x, x, blk.attn, num_heads), blk.res1)
        x = _residual(x, _ffn(x, blk.ffn), blk.res2)
    return x


def _regressor(q, visible, reg, num_heads):
    for blk in reg.layers:  # queries read the visible reps only (no query self-attention)
        q = _residual(q, _attention(q, visible, blk.attn, num_heads), blk.res1)
        q = _residual(q, _ffn(q, blk.ffn), blk.res2)
    return q


def eager_timemae(model, x, perm, gumbel_BMK):
    """Official pretrain_forward with a fixed per-batch permutation ``perm`` and fixed noise."""
    cfg = model.config
    w = cfg.wave_length
    T = x.shape[-1]
    x = F.pad(x, (0, (-T) % w))
    B, C, Tp = x.shape
    L = Tp // w
    # Conv1d with kernel = stride = w, written as a matmul over windows.
    win_BLCw = x.view(B, C, L, w).permute(0, 2, 1, 3).reshape(B, L, C * w)
    emb = win_BLCw @ model.patch_embed.weight.reshape(cfg.d_model, C * w).T + model.patch_embed.bias
    x_pos = emb + model.pos_embed
    M = int(cfg.mask_ratio * L)
    v_idx, m_idx = perm[:-M], perm[-M:]
    tokens = (_linear(emb, model.tokenizer)[:, m_idx] + gumbel_BMK).argmax(-1)
    rep_visible = _encoder(x_pos[:, v_idx], model.encoder, cfg.num_heads)
    target = _encoder(x_pos[:, m_idx], model.target_encoder, cfg.num_heads)
    queries = model.mask_token + model.pos_embed[m_idx].expand(B, -1, -1)
    pred = _regressor(queries, rep_visible, model.regressor, cfg.num_heads)
    logits = _linear(pred, model.tokenizer)
    mse = ((pred - target) ** 2).mean()
    logp = torch.log_softmax(logits, -1)
    eps = cfg.label_smoothing
    nll = -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ce = ((1 - eps) * nll + eps * (-logp.mean(-1))).mean()
    return dict(rep_visible=rep_visible, target=target, pred=pred, logits=logits, codewords=tokens,
                loss_mrr=mse, loss_mcc=ce, loss=cfg.alpha * mse + cfg.beta * ce)


def _randomise(model, seed=0):
    """Make the parity test sensitive: residual scales away from 1e-8, target != online."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, ResidualNorm):
                mod.a.copy_(0.5 + torch.rand((), generator=g))
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g))
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _codeword_noise(shape, generator):
    """The Gumbel noise ``draw_codewords`` adds for ``generator``: the C kernel's stream where it
    applies (``TIMEMAE_CPU_FUSED``), else ``-log(-log(rand))``."""
    from timemae_dist.kernels import cpu_fused

    if cpu_fused.applies_gumbel(torch.zeros(shape)):
        noise = torch.empty(shape)
        cpu_fused.gumbel_argmax(torch.zeros(shape), generator, noise_out=noise)
        return noise
    return -torch.log(-torch.log(torch.rand(shape, generator=generator)))


@pytest.mark.parametrize("fused", ["auto", "off"])
@pytest.mark.parametrize("backend", ["eager", "torch", "auto"])
@pytest.mark.parametrize("seq_len", [64, 61])
def test_parity_with_eager_transcription(backend, seq_len, fused, monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", fused)
    torch.manual_seed(0)
    cfg = tiny_cfg(seq_len=seq_len, dropout=0.0, reg_dropout=0.0, masking="per_batch", kernel_backend=backend)
    model = TimeMAE(cfg)
    _randomise(model)
    x = torch.randn(4, 3, seq_len)
    L = model.num_windows
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(3))
    M = cfg.num_masked
    out = model(x, ids_keep=perm[:-M], ids_mask=perm[-M:], generator=torch.Generator().manual_seed(7))
    gumbel = _codeword_noise((4, M, cfg.vocab_size), torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = eager_timemae(model, x, perm, gumbel)
    assert torch.equal(out["codewords"], ref["codewords"])
    for key in ("rep_visible", "target", "pred", "logits", "loss_mrr", "loss_mcc", "loss"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    assert out["loss"].dtype == torch.float32


def test_kernel_backends_agree_forward_and_backward():
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64)
    ids_keep, ids_mask = random_masks(3, 8, 4, "per_sample", generator=torch.Generator().manual_seed(0))
    grads = {}
    for backend in ("eager", "torch"):
        torch.manual_seed(1)
        model = TimeMAE(tiny_cfg(dropout=0.0, reg_dropout=0.0, kernel_backend=backend))
        out = model(x, ids_keep, ids_mask, generator=torch.Generator().manual_seed(2))
        out["loss"].backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["torch"].keys()
    for n in grads["eager"]:
        torch.testing.assert_close(grads["torch"][n], grads["eager"][n], rtol=1e-5, atol=1e-6, msg=n)


def test_triton_backend_in_interpreter_matches_eager(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = TimeMAE(tiny_cfg(dropout=0.0, reg_dropout=0.0, kernel_backend="triton"))
    x = torch.randn(2, 3, 64)
    ids_keep, ids_mask = random_masks(2, 8, 4, generator=torch.Generator().manual_seed(0))
    out_t = model(x, ids_keep, ids_mask, generator=torch.Generator().manual_seed(1))
    model.config.kernel_backend = "eager"
    out_e = model(x, ids_keep, ids_mask, generator=torch.Generator().manual_seed(1))
    for key in ("rep_visible", "pred", "target", "loss"):
        torch.testing.assert_close(out_t[key], out_e[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# masking


def test_masks_per_sample_and_per_batch():
    g = torch.Generator().manual_seed(0)
    keep, mask = random_masks(16, 10, 6, "per_sample", generator=g)
    assert keep.shape == (16, 4) and mask.shape == (16, 6) and keep.dtype == torch.long
    both = torch.cat([keep, mask], 1).sort(1).values
    assert torch.equal(both, torch.arange(10).expand(16, 10))
    assert len({tuple(r) for r in mask.tolist()}) > 1  # samples get different masks
    keep_b, mask_b = random_masks(16, 10, 6, "per_batch", generator=g)
    assert (mask_b == mask_b[0]).all() and (keep_b == keep_b[0]).all()
    a = random_masks(4, 10, 6, generator=torch.Generator().manual_seed(5))
    b = random_masks(4, 10, 6, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_forward_uses_config_masking_and_counts():
    model = TimeMAE(tiny_cfg(masking="per_batch", mask_ratio=0.6))
    out = model(torch.randn(5, 3, 64))
    assert out["ids_mask"].shape == (5, int(0.6 * 8)) and out["ids_keep"].shape == (5, 8 - int(0.6 * 8))
    assert (out["ids_mask"] == out["ids_mask"][0]).all()
    assert out["logits"].shape == (5, 4, 12) and out["codewords"].shape == (5, 4)
    assert all(isinstance(v, torch.Tensor) for v in out.values())


# ---------------------------------------------------------------------------------------------
# momentum target encoder


def test_target_starts_equal_and_gets_no_grad():
    model = TimeMAE(tiny_cfg())
    for (n, p), t in zip(model.encoder.named_parameters(), model.target_encoder.parameters()):
        assert torch.equal(p, t) and p.data_ptr() != t.data_ptr(), n
        assert not t.requires_grad
    model(torch.randn(2, 3, 64))["loss"].backward()
    assert all(t.grad is None for t in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert model.mask_token.grad is not None and model.pos_embed.grad is not None
    assert model.tokenizer.weight.grad is not None


def test_momentum_update_math():
    model = TimeMAE(tiny_cfg(momentum=0.9))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in model.target_encoder.parameters()]
    online = [p.clone() for p in model.encoder.parameters()]
    model.momentum_update()
    for t0, o, t in zip(before, online, model.target_encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o, rtol=0, atol=1e-6)
    # static form with explicit params (as a ZeRO-3 trainer would pass gathered ones), bf16 source
    target = model.detach_target_encoder()
    before = [t.clone() for t in target.parameters()]
    src = [p.detach().to(torch.bfloat16) for p in model.encoder.parameters()]
    TimeMAE.momentum_update_(target, src, 0.5)
    for t0, s, t in zip(before, src, target.parameters()):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s.float(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="parameters"):
        TimeMAE.momentum_update_(target, src[:-1], 0.5)
    with pytest.raises(ValueError, match="ZeRO-3"):
        TimeMAE.momentum_update_(target, [torch.empty(0)] * len(src), 0.5)


def test_detach_target_encoder_separates_it():
    model = TimeMAE(tiny_cfg())
    n_all = len(list(model.parameters()))
    target = model.detach_target_encoder()
    assert model.target_encoder is target and not model.target_encoder_attached
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("target_encoder") for n in names)
    assert len(names) == n_all - len(list(target.parameters()))
    assert not any(k.startswith("target_encoder") for k in model.state_dict())
    assert model.detach_target_encoder() is target  # idempotent
    x = torch.randn(2, 3, 64)
    ids = random_masks(2, 8, 4, generator=torch.Generator().manual_seed(0))
    model.eval()
    out = model(x, *ids)
    assert not target.training  # mode follows the model
    other_model = TimeMAE(tiny_cfg())
    _randomise(other_model)  # residual scales of 1e-8 would make any encoder ~ LayerNorm(x)
    other = other_model.encoder  # explicit target_encoder= wins
    out2 = model(x, *ids, target_encoder=other)
    assert not torch.allclose(out["target"], out2["target"])
    model.momentum_update()  # still works on the held target
    model.attach_target_encoder()
    assert model.target_encoder_attached and len(list(model.parameters())) == n_all


# ---------------------------------------------------------------------------------------------
# downstream + persistence


def test_encode_classify_and_padding():
    torch.manual_seed(0)
    model = TimeMAE(tiny_cfg(seq_len=61, num_classes=5)).eval()
    x = torch.randn(3, 3, 61)
    z = model.encode(x)
    assert z.shape == (3, 16)
    assert model.classify(x).shape == (3, 5)
    torch.testing.assert_close(z, model.encode(F.pad(x, (0, 3))))  # zero-padded at the end
    assert model.embed(x).shape == (3, 8, 16)
    with pytest.raises(ValueError, match="seq_len"):
        model.encode(torch.randn(3, 3, 80))
    with pytest.raises(ValueError, match="C=3"):
        model.encode(torch.randn(3, 4, 61))
    with pytest.raises(ConfigError, match="num_classes"):
        TimeMAE(tiny_cfg()).classify(torch.randn(3, 3, 64))


@pytest.mark.parametrize("seq_len", [64, 61])
def test_embed_matmul_equals_the_conv1d(seq_len):
    """On CPU ``embed`` computes the patch convolution as one matmul over windows; values and the
    weight, bias and input gradients equal ``nn.Conv1d``'s (T zero-padded to whole windows)."""
    torch.manual_seed(0)
    model = TimeMAE(tiny_cfg(seq_len=seq_len))
    x = torch.randn(4, 3, seq_len, requires_grad=True)
    g = torch.randn(4, 8, 16)
    emb = model.embed(x)
    (emb * g).sum().backward()
    fast = (emb.detach(), x.grad.clone(), model.patch_embed.weight.grad.clone(), model.patch_embed.bias.grad.clone())
    x.grad = None
    model.zero_grad()
    conv = model.patch_embed(F.pad(x, (0, 64 - seq_len))).transpose(1, 2)
    (conv * g).sum().backward()
    ref = (conv.detach(), x.grad, model.patch_embed.weight.grad, model.patch_embed.bias.grad)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert emb.is_contiguous() and emb.shape == (4, 8, 16)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TimeMAE(tiny_cfg(num_classes=4)).eval()
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.mul_(0.5)  # target differs from online: must be saved too
    model.detach_target_encoder()
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors", "config.json"}
    loaded = TimeMAE.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    x = torch.randn(2, 3, 64)
    ids = random_masks(2, 8, 4, generator=torch.Generator().manual_seed(0))
    a = model(x, *ids, generator=torch.Generator().manual_seed(1))
    b = loaded(x, *ids, generator=torch.Generator().manual_seed(1))
    for key in ("loss", "pred", "target"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.testing.assert_close(model.classify(x), loaded.classify(x), rtol=0, atol=0)
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / "ckpt" / "model.safetensors").values())
    with pytest.raises(ValueError, match="save_pretrained"):
        TimeMAE.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# config


def test_config_defaults_match_official():
    cfg = TimeMAEConfig()
    assert (cfg.wave_length, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.reg_layers) == (8, 64, 8, 4, 4)
    assert (cfg.mask_ratio, cfg.momentum, cfg.vocab_size, cfg.alpha, cfg.beta) == (0.6, 0.99, 192, 5.0, 1.0)
    assert cfg.label_smoothing == 0.2 and cfg.enable_res_parameter and cfg.encoder.type == "native"


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(mask_ratio=0.05), "mask_ratio"),  # int(0.05 * 8) = 0 masked
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(seq_len=8), "mask_ratio"),  # L = 1: nothing visible
        (dict(d_model=10, num_heads=4), "num_heads"),
        (dict(dropout=1.0), "dropout"),
        (dict(wave_length=0), "wave_length"),
        (dict(momentum=1.5), "momentum"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    cfg = tiny_cfg(**kw)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.key == field


def test_config_from_yaml_dict_and_data_shape():
    cfg = from_dict(TimeMAEConfig, {"d_model": 32, "encoder": {"type": "native"}})
    assert cfg.in_channels is None
    with pytest.raises(ConfigError, match="in_channels"):
        TimeMAE(cfg)
    model = build_model(cfg, in_channels=2, seq_len=40)
    assert model.config.in_channels == 2 and model.num_windows == 5
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TimeMAEConfig, {"d_modle": 32})
    with pytest.raises(ConfigError) as e:
        from_dict(TimeMAEConfig, {"encoder": {"type": "native", "pretrained": "/x"}})
    assert e.value.key == "encoder.pretrained"
    with pytest.raises(ConfigError) as e:
        from_dict(TimeMAEConfig, {"seq_len": 16, "mask_ratio": 0.4})
    assert e.value.key == "mask_ratio" and "masks 0 of L=2" in str(e.value)
    tiny_cfg(mask_ratio=0.99, seq_len=800).validate()  # 99 of 100 masked: allowed
    with pytest.raises(ConfigError, match="data has 3"):
        dataclasses.replace(cfg, in_channels=2).with_data_shape(3, 40)


# ---------------------------------------------------------------------------------------------
# numerics + learning


def test_losses_float32_under_bf16_autocast():
    model = TimeMAE(tiny_cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64))
    assert out["loss"].dtype == out["loss_mrr"].dtype == out["loss_mcc"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_losses_decrease_on_tiny_synthetic_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, T = 64, 64
    t = torch.arange(T).float()
    freq = 0.05 + 0.3 * torch.rand(n, 1, 1, generator=g)
    phase = 6.28 * torch.rand(n, 2, 1, generator=g)
    data = torch.sin(freq * t + phase)  # (n, 2, T)
    model = TimeMAE(tiny_cfg(in_channels=2, d_model=32, num_heads=4, vocab_size=16, dropout=0.0, reg_dropout=0.0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    hist = []
    for step in range(50):
        idx = torch.randint(0, n, (16,), generator=g)
        out = model(data[idx], generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.momentum_update()
        hist.append([out["loss"].item(), out["loss_mrr"].item(), out["loss_mcc"].item()])
    h = torch.tensor(hist)
    first, last = h[:5].mean(0), h[-5:].mean(0)
    assert (last < first).all(), (first, last)
    assert last[0] < 0.8 * first[0]
    metrics = model.pretrain_metrics(out)
    assert set(metrics) == {"loss", "loss_mrr", "loss_mcc", "mcc_top1", "mcc_ndcg10", "repr_spread"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0.0 <= metrics["mcc_top1"] <= metrics["mcc_ndcg10"] <= 1.0
    assert metrics["repr_spread"] > 0.05  # a model that learns has not collapsed


def test_representation_spread_detects_collapse():
    from timemae_dist.model import representation_spread
    from timemae_dist.train.metrics import COLLAPSE_SPREAD, collapse_warning

    g = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=g) + 3.0
    healthy = centre + torch.randn(64, 5, 16, generator=g)  # windows differ by O(|centre|)
    collapsed = centre + 1e-6 * torch.randn(64, 5, 16, generator=g)
    # per-window means over 5 windows: spread ~ sqrt(16 / 5) / |centre|
    expect = (16 / 5) ** 0.5 / centre.norm().item()
    assert abs(representation_spread(healthy).item() - expect) < 0.25 * expect
    assert representation_spread(collapsed).item() < 1e-5
    assert representation_spread(centre.expand(8, 5, 16)).item() == 0.0
    assert collapse_warning(100, 0.7, 0.5, 192) is None
    assert collapse_warning(100, float("nan"), 0.5, 192) is None
    w = collapse_warning(1000, 1.2e-5, 0.004, 192)
    assert w is not None and "step 1000" in w and "collapsed" in w and "at chance" in w
    assert COLLAPSE_SPREAD > 1.2e-5


# ---------------------------------------------------------------------------------------------
# random draws: dropout masks and gumbel noise (distribution tests on many draws)


@pytest.mark.parametrize("path", ["on", "off"])  # the C kernel (kernels/cpu_dropout.py) and the eager mask
@pytest.mark.parametrize("p", [0.1, 0.2, 0.36, 0.5])
def test_keep_mask_is_inverted_bernoulli_dropout(p, path, monkeypatch):
    from timemae_dist.model.layers import keep_mask, keep_threshold

    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", path)

    torch.manual_seed(0)
    n = 1 << 21
    mask = keep_mask(torch.empty(n // 64, 8, 8), p)
    assert mask.shape == (n // 64, 8, 8) and mask.dtype == torch.float32
    thr = keep_threshold(p)
    keep = thr / 2**15
    assert abs(keep - (1 - p)) <= 1.6e-5
    vals = mask.unique()
    assert torch.equal(vals, torch.tensor([0.0, 2**15 / thr]))
    # every one of the four 16-bit pieces of a 64-bit draw keeps with probability `keep`
    # (5 sigma of a binomial over n/4 elements)
    kept = (mask.flatten() > 0).view(-1, 4).double().mean(0)
    sigma = math.sqrt(keep * (1 - keep) / (n / 4))
    assert (kept - keep).abs().max().item() < 5 * sigma, kept
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / keep
    # consecutive masks differ (fresh draws), low precision keeps the same values
    assert not torch.equal(keep_mask(torch.empty(64, 64), p), keep_mask(torch.empty(64, 64), p))
    half = keep_mask(torch.empty(4096, dtype=torch.bfloat16), p)
    assert half.dtype == torch.bfloat16 and set(half.float().unique().tolist()) <= {0.0, float(torch.tensor(2**15 / thr).bfloat16())}


def test_gumbel_noise_moments_and_sampling():
    from timemae_dist.model import gumbel_noise

    g = gumbel_noise((1 << 20,), generator=torch.Generator().manual_seed(0)).double()
    assert torch.isfinite(g).all()
    # standard Gumbel: mean = Euler-Mascheroni, variance = pi^2 / 6 (5 sigma bounds)
    n = g.numel()
    assert abs(g.mean().item() - 0.5772156649) < 5 * math.sqrt(math.pi**2 / 6 / n)
    assert abs(g.var().item() - math.pi**2 / 6) < 0.02
    # argmax(logits + gumbel) samples softmax(logits) (the codeword draw of the forward)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    draws = (logits + gumbel_noise((200_000, 4), generator=torch.Generator().manual_seed(1))).argmax(-1)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    probs = torch.softmax(logits.double(), 0)
    assert (freq - probs).abs().max().item() < 5 * math.sqrt(0.25 / draws.numel())
    # same generator seed -> same noise
    a = gumbel_noise((8, 3), generator=torch.Generator().manual_seed(5))
    b = gumbel_noise((8, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
