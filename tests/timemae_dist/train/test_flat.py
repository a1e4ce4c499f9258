"""Flat parameters (trainer.flat_params): the module's parameters as views of one buffer, the
optimizer, clip and EMA as one kernel each, with the results of the per-tensor path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timemae_dist.model import TimeMAE
from timemae_dist.train.build import build_model
from timemae_dist.train.config import load_pretrain_config
from timemae_dist.train.flat import FlatParameters, flat_view
from timemae_dist.train.preflight import resolve
from timemae_dist.train.trainer import EmaUpdate, PlainEngine, clip_flat_grad_, clip_grad_norm

from .conftest import TINY_CONFIG, tiny_overrides


def test_parameters_become_views_of_one_buffer_with_their_values():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = list(m.parameters())
    flat = FlatParameters(params)
    assert flat.numel == sum(p.numel() for p in params) == flat.param.numel()
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert flat.is_intact() and flat_view(params).data_ptr() == flat.param.data_ptr()
    assert list(m.parameters()) == params and all(p.requires_grad and p.is_leaf for p in params)
    with torch.no_grad():  # writing the flat buffer writes the module's parameters
        flat.param.add_(1.0)
    assert torch.equal(m[0].weight, before["0.weight"] + 1)
    m.load_state_dict(before)  # load_state_dict copies in place: still views
    assert flat.is_intact() and torch.equal(flat.param[: 15].view(5, 3), before["0.weight"])
    m[2].weight.data = m[2].weight.data.clone()  # a re-homed parameter is noticed
    assert not flat.is_intact()


def test_gather_grads_concatenates_in_order_zero_fills_and_frees():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    flat = FlatParameters(list(m.parameters()))
    m(torch.randn(6, 3)).sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    m[1].bias.grad = None  # a parameter that took no part in the step: zeros
    expected[-2:] = 0
    g = flat.gather_grads()
    assert torch.equal(g, expected) and flat.param.grad is g
    assert all(p.grad is None for p in m.parameters())
    flat.release_grad()
    assert flat.param.grad is None


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no parameters"):
        FlatParameters([])
    a = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="listed twice"):
        FlatParameters([a, a])
    with pytest.raises(ValueError, match="parameter 1 is torch.float64"):
        FlatParameters([a, nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    t = torch.zeros(10)
    assert flat_view([t[:4], t[4:]]) is not None and flat_view([t[4:], t[:4]]) is None  # order matters
    assert flat_view([t[:4], t[5:]]) is None and flat_view([torch.zeros(2), torch.zeros(2)]) is None


def test_clip_flat_matches_the_per_tensor_clip():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in ((7, 3), (5,), (2, 2, 2))]
    for p in ps:
        p.grad = torch.randn_like(p) * 3
    flat_grad = torch.cat([p.grad.reshape(-1) for p in ps])
    for clip in (0.0, 1.0, 1e6):
        g = flat_grad.clone()
        copies = [nn.Parameter(p.detach().clone()) for p in ps]
        for c, p in zip(copies, ps):
            c.grad = p.grad.clone()
        n_flat, n_ref = clip_flat_grad_(g, clip), clip_grad_norm(copies, clip)
        torch.testing.assert_close(n_flat, n_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(g, torch.cat([c.grad.reshape(-1) for c in copies]), rtol=1e-6, atol=1e-7)
    assert clip_flat_grad_(flat_grad.clone(), 1.0) > 1.0  # the norm before clipping is reported


def _engine(tiny_store, tmp_path, flat: bool):
    cfg = load_pretrain_config(TINY_CONFIG, tiny_overrides(tiny_store, tmp_path, f"flat{flat}",
                                                          f"trainer.flat_params={str(flat).lower()}"))
    cfg, _ = resolve(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    target = model.detach_target_encoder()
    return model, target, PlainEngine(model, cfg, 20), EmaUpdate(target, model.encoder, cfg.model.momentum)


def test_flat_engine_trains_as_the_per_tensor_engine(tiny_store, tmp_path):
    """Same seed and data: the flat optimizer, clip and EMA give the per-tensor path's parameters,
    gradient norms and target encoder (the arithmetic is the same, summation order aside)."""
    (m_f, t_f, e_f, ema_f), (m_p, t_p, e_p, ema_p) = (_engine(tiny_store, tmp_path, f) for f in (True, False))
    assert e_f.flat is not None and e_p.flat is None
    assert ema_f.flat is not None and ema_p.flat is None
    assert flat_view(list(t_f.parameters())) is not None  # the target was laid out like the encoder
    x = torch.randn(16, 3, 32)
    t_init = [p.detach().clone() for p in t_f.parameters()]
    for step in range(6):
        norms = []
        for model, target, engine, ema in ((m_f, t_f, e_f, ema_f), (m_p, t_p, e_p, ema_p)):
            torch.manual_seed(100 + step)  # same masks, dropout and gumbel noise in both
            engine.backward(engine(x, target_encoder=target)["loss"])
            engine.step()
            ema()
            norms.append(engine.get_global_grad_norm())
        torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
    assert all(p.grad is None for p in m_f.parameters()) and e_f.flat.param.grad is None
    for (k, a), b in zip(m_f.state_dict().items(), m_p.state_dict().values()):
        # An attention key bias adds the same q.b to every score of a query, which the softmax
        # cancels: its gradient is rounding noise (~1e-11) that AdamW scales up to lr-sized steps,
        # so the two paths' summation orders make it differ by ~1e-6 of lr-sized values.
        atol = 1e-4 if k.endswith("k_proj.bias") else 1e-6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=k)
    for (k, a), b in zip(t_f.state_dict().items(), t_p.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 if k.endswith("k_proj.bias") else 1e-6, msg=k)
    assert any(not torch.equal(p, q) for p, q in zip(t_f.parameters(), t_init))  # the EMA ran
    assert e_f.flat.is_intact()


def test_ema_flat_is_the_foreach_update():
    torch.manual_seed(0)
    enc, tgt_flat, tgt_ref = (nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)) for _ in range(3))
    tgt_ref.load_state_dict(tgt_flat.state_dict())
    FlatParameters(list(enc.parameters()))
    ema = EmaUpdate(tgt_flat, enc, 0.9)
    assert ema.flat is not None
    for _ in range(3):
        ema()
        TimeMAE.momentum_update_(tgt_ref, enc.parameters(), 0.9)
    for a, b in zip(tgt_flat.parameters(), tgt_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert not torch.equal(tgt_flat[0].weight, enc[0].weight)
