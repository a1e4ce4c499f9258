"""The fused CPU attention kernel (timemae_dist/kernels/cpu_fused.py), built for real with the
system compiler: forward and backward against the eager ops (self- and cross-attention, with and
without dropout, every supported head width), its dropout mask against the C dropout kernel's,
thread-count independence, the shapes and dtypes that fall back, one OpenMP runtime, the
``TIMEMAE_CPU_FUSED`` switch and the no-compiler fallback/error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from timemae_dist.kernels import cpu_fused, cpu_dropout
from timemae_dist.model.layers import MultiHeadAttention, ResidualNorm, keep_threshold

pytestmark = pytest.mark.skipif(not cpu_fused.available("auto"),
                                reason=f"fused CPU kernels unavailable here: {cpu_fused.KERNEL.why}")


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "on")
    return cpu_fused


def _eager_core(q, k, v, mask=None):
    """Reference: (B, H, N, Dh) heads -> (B, Q, H * Dh) output."""
    p = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    if mask is not None:
        p = p * mask
    o = p @ v
    B, H, Q, Dh = o.shape
    return o.transpose(1, 2).reshape(B, Q, H * Dh)


def _heads(qkv, H):
    B, N, three_d = qkv.shape
    D = three_d // 3
    q, k, v = qkv.view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    return q, k, v


def _cross_heads(q_src, kv_src, H):
    B, Q, D = q_src.shape
    K = kv_src.shape[1]
    q = q_src.view(B, Q, H, D // H).transpose(1, 2)
    k, v = kv_src.view(B, K, 2, H, D // H).permute(2, 0, 3, 1, 4)
    return q, k, v


@pytest.mark.parametrize("B,N,H,Dh", [(5, 7, 4, 16), (3, 16, 2, 32), (2, 9, 1, 48), (4, 1, 2, 64), (2, 12, 3, 16)])
def test_self_attention_matches_eager_forward_and_backward(fused, B, N, H, Dh):
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * Dh, requires_grad=True)
    ref_in = qkv.detach().clone().requires_grad_()
    g = torch.randn(B, N, H * Dh)
    out = cpu_fused.attention_core(qkv, None, H, 0.0, False)
    ref = _eager_core(*_heads(ref_in, H))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(qkv.grad, ref_in.grad, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("B,Q,K,H,Dh", [(4, 9, 7, 4, 16), (3, 40, 16, 2, 32), (2, 1, 3, 2, 64), (2, 64, 5, 1, 16)])
def test_cross_attention_matches_eager_forward_and_backward(fused, B, Q, K, H, Dh):
    torch.manual_seed(1)
    q_src = torch.randn(B, Q, H * Dh, requires_grad=True)
    kv_src = torch.randn(B, K, 2 * H * Dh, requires_grad=True)
    rq, rkv = (t.detach().clone().requires_grad_() for t in (q_src, kv_src))
    g = torch.randn(B, Q, H * Dh)
    out = cpu_fused.attention_core(q_src, kv_src, H, 0.0, False)
    ref = _eager_core(*_cross_heads(rq, rkv, H))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(q_src.grad, rq.grad, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(kv_src.grad, rkv.grad, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_dropout_mask_is_the_c_dropout_kernels_mask_for_the_same_seed(fused, cross, monkeypatch):
    """Training with p=0.2: output and gradients equal the eager math with the mask that
    keep_mask_f32 draws for a (B, H, Q, K) tensor after the same torch.manual_seed."""
    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", "on")
    B, Q, K, H, Dh, p = 6, 9, 7, 4, 16, 0.2
    torch.manual_seed(2)
    if cross:
        srcs = (torch.randn(B, Q, H * Dh), torch.randn(B, K, 2 * H * Dh))
    else:
        srcs = (torch.randn(B, K, 3 * H * Dh), None)
        Q = K
    ins = [None if s is None else s.clone().requires_grad_() for s in srcs]
    refs = [None if s is None else s.clone().requires_grad_() for s in srcs]
    g = torch.randn(B, Q, H * Dh)
    torch.manual_seed(7)
    out = cpu_fused.attention_core(ins[0], ins[1], H, p, True)
    torch.manual_seed(7)
    thr = keep_threshold(p)
    mask = cpu_dropout.keep_mask_f32(torch.empty(B, H, Q, K), thr, 2**15 / thr)
    heads = _cross_heads(refs[0], refs[1], H) if cross else _heads(refs[0], H)
    ref = _eager_core(*heads, mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    dropped = (mask == 0).float().mean().item()
    assert 0.15 < dropped < 0.25, dropped
    out.backward(g)
    ref.backward(g)
    for a, b in zip(ins, refs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=5e-6, rtol=1e-5)
    torch.manual_seed(8)  # another seed: another mask
    assert not torch.equal(cpu_fused.attention_core(srcs[0], srcs[1], H, p, True), out.detach())


def test_results_do_not_depend_on_the_thread_count(fused):
    torch.manual_seed(3)
    qkv = torch.randn(64, 7, 192, requires_grad=True)
    g = torch.randn(64, 7, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            qkv.grad = None
            torch.manual_seed(4)
            out = cpu_fused.attention_core(qkv, None, 4, 0.2, True)
            out.backward(g)
            results.append((out.detach(), qkv.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_no_grad_forward_equals_the_grad_forward(fused):
    torch.manual_seed(5)
    q, kv = torch.randn(8, 9, 64), torch.randn(8, 7, 128)
    torch.manual_seed(6)
    with torch.no_grad():
        a = cpu_fused.attention_core(q, kv, 4, 0.2, True)
    torch.manual_seed(6)
    b = cpu_fused.attention_core(q.requires_grad_(), kv, 4, 0.2, True)
    assert torch.equal(a, b.detach())


def test_module_takes_the_fused_path_and_matches_the_eager_one(monkeypatch):
    """MultiHeadAttention (eval: no dropout) through the kernel and through the eager ops: same
    output and parameter gradients; the kernel's autograd node shows which path ran."""
    torch.manual_seed(9)
    m = MultiHeadAttention(64, 4, 0.2).eval()
    x, q = torch.randn(16, 7, 64), torch.randn(16, 9, 64)
    for args in ((x, x), (q, x)):
        runs = {}
        for path in ("on", "off"):
            monkeypatch.setenv("TIMEMAE_CPU_FUSED", path)
            m.zero_grad()
            out = m(*args)
            fused = any("_AttentionCore" in type(n).__name__ for n in _graph(out.grad_fn))
            assert fused == (path == "on")
            out.square().sum().backward()
            runs[path] = (out.detach(), [p.grad.clone() for p in m.parameters()])
        torch.testing.assert_close(runs["on"][0], runs["off"][0], atol=2e-6, rtol=1e-5)
        for a, b in zip(runs["on"][1], runs["off"][1]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _graph(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return seen
    seen.add(fn)
    for nxt, _ in fn.next_functions:
        _graph(nxt, seen)
    return seen


@pytest.mark.parametrize("case", ["17 keys", "head width 8", "float64", "bf16 autocast", "switched off"])
def test_unsupported_inputs_take_the_eager_path(case, monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "off" if case == "switched off" else "auto")
    x = torch.randn(2, 17 if case == "17 keys" else 7, 64, dtype=torch.float64 if case == "float64" else torch.float32)
    head_dim = 8 if case == "head width 8" else 16
    if case == "bf16 autocast":
        with torch.autocast("cpu", torch.bfloat16):
            assert not cpu_fused.applies(x, x.shape[1], head_dim)
    else:
        assert not cpu_fused.applies(x, x.shape[1], head_dim)
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "auto")
    assert cpu_fused.applies(torch.randn(2, 7, 64), 7, 16)
    # and such a module still works (eager): 17 keys, 8-wide heads
    m = MultiHeadAttention(64, 8, 0.1).train()
    y = torch.randn(2, 17, 64)
    assert m(y, y).shape == (2, 17, 64)


# ------------------------------------------------------------------------------ residual LayerNorm


def _residual(enable_a: bool, training: bool, D: int = 64) -> ResidualNorm:
    torch.manual_seed(10)
    r = ResidualNorm(D, enable_a, 0.2).train(training)
    with torch.no_grad():
        if enable_a:
            r.a.fill_(0.7)  # not the 1e-8 init, so y's path matters
        r.norm.weight.normal_()
        r.norm.bias.normal_()
    return r


def _residual_run(r, x, y, g, path, monkeypatch, seed=5):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", path)
    for t in (x, y):
        t.grad = None
    r.zero_grad()
    torch.manual_seed(seed)
    out = r(x, y, 0.2)
    fused = any("_ResidualNorm" in type(n).__name__ for n in _graph(out.grad_fn))
    assert fused == (path == "on")
    out.backward(g)
    return [out.detach(), x.grad, y.grad] + [p.grad for p in r.parameters()]


@pytest.mark.parametrize("enable_a", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("D", [64, 16, 1024])
def test_residual_norm_matches_eager_with_the_same_mask(monkeypatch, enable_a, training, D):
    """ResidualNorm through the kernel and through the eager ops (C dropout masks, which draw the
    same seed and stream): same output, input and parameter gradients (x, y, a, weight, bias)."""
    monkeypatch.setenv("TIMEMAE_CPU_DROPOUT", "on")
    r = _residual(enable_a, training, D)
    x, y = torch.randn(33, 3, D, requires_grad=True), torch.randn(33, 3, D, requires_grad=True)
    g = torch.randn(33, 3, D)
    fused = _residual_run(r, x, y, g, "on", monkeypatch)
    eager = _residual_run(r, x, y, g, "off", monkeypatch)
    assert len(fused) == (6 if enable_a else 5)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if training:  # and the mask really drops (a different seed gives another output)
        other = _residual_run(r, x, y, g, "on", monkeypatch, seed=6)
        assert not torch.equal(other[0], fused[0])


def test_residual_norm_results_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "on")
    r = _residual(True, True)
    x, y = torch.randn(300, 64, requires_grad=True), torch.randn(300, 64, requires_grad=True)
    g = torch.randn(300, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_residual_run(r, x, y, g, "on", monkeypatch))
            results[-1] = [t.clone() for t in results[-1]]
    finally:
        torch.set_num_threads(threads)
    for res in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res, results[0]))


@pytest.mark.parametrize("case", ["width 24", "width 2048", "float64", "shapes differ", "bf16 autocast"])
def test_residual_norm_unsupported_inputs_take_the_eager_path(case, monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "auto")
    D = {"width 24": 24, "width 2048": 2048}.get(case, 64)
    dtype = torch.float64 if case == "float64" else torch.float32
    x = torch.randn(4, D, dtype=dtype)
    y = torch.randn(4, 1, D) if case == "shapes differ" else torch.randn(4, D, dtype=dtype)
    if case == "bf16 autocast":
        with torch.autocast("cpu", torch.bfloat16):
            assert not cpu_fused.applies_residual(x, y)
    else:
        assert not cpu_fused.applies_residual(x, y)
    assert cpu_fused.applies_residual(torch.randn(4, 64), torch.randn(4, 64))
    r = ResidualNorm(D, True, 0.2).train().to(dtype)
    assert r(x, torch.randn(4, D, dtype=dtype), 0.2).shape == (4, D)


# ------------------------------------------------------------------------------------------ GELU


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4095, 4097, 1152 * 256])
def test_gelu_matches_torch_forward_and_backward(fused, n):
    torch.manual_seed(11)
    h = torch.randn(n) * 3
    h[: min(n, 6)] = torch.tensor([0.0, -0.0, 9.0, -9.0, 30.0, -30.0])[: min(n, 6)]
    h.requires_grad_()
    r = h.detach().clone().requires_grad_()
    g = torch.randn(n)
    out = cpu_fused.gelu(h)
    ref = torch.nn.functional.gelu(r)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(h.grad, r.grad, atol=2e-6, rtol=1e-6)


def test_gelu_feed_forward_takes_the_kernel_and_threads_do_not_matter(fused, monkeypatch):
    from timemae_dist.model.layers import FeedForward

    torch.manual_seed(12)
    ffn = FeedForward(64, 256, 0.2)
    x = torch.randn(50, 7, 64, requires_grad=True)
    out = ffn.inner(x)
    assert any("_Gelu" in type(n).__name__ for n in _graph(out.grad_fn))
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "off")
    ref = ffn.inner(x)
    assert not any("_Gelu" in type(n).__name__ for n in _graph(ref.grad_fn))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "on")
    h = torch.randn(3, 5000)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(cpu_fused.gelu(h))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("case", ["float64", "bf16 autocast", "switched off"])
def test_gelu_unsupported_inputs_take_torchs_path(case, monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "off" if case == "switched off" else "auto")
    h = torch.randn(40, dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "bf16 autocast":
        with torch.autocast("cpu", torch.bfloat16):
            assert not cpu_fused.applies_gelu(h)
    else:
        assert not cpu_fused.applies_gelu(h)
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "auto")
    assert cpu_fused.applies_gelu(torch.randn(40))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_loading_the_library_adds_no_openmp_runtime():
    """The library links libgomp.so.1 by soname, so it shares torch's already-loaded runtime (one
    thread pool) instead of loading a second one (checked in a fresh process: the OpenMP
    libraries mapped before and after loading it are the same)."""
    code = """
        import torch
        def omp():
            return sorted({l.split()[-1] for l in open("/proc/self/maps") if "gomp" in l or "omp5" in l})
        before = omp()
        from timemae_dist.kernels import cpu_fused
        assert cpu_fused.available("on")
        x = torch.randn(4, 7, 192)
        cpu_fused.attention_core(x, None, 4, 0.0, False)
        print(before, omp())
        assert omp() == before, (before, omp())
    """
    proc = _run(code, dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_no_compiler_falls_back_or_fails_clearly(run_without_compiler):
    code = """
        import warnings, torch
        from timemae_dist.model.layers import MultiHeadAttention
        from timemae_dist.kernels import cpu_fused
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            x = torch.randn(2, 7, 64)
            assert MultiHeadAttention(64, 4, 0.0)(x, x).shape == (2, 7, 64)
        print("WARN", [str(x.message) for x in w])
        print(cpu_fused.describe())
    """
    auto = run_without_compiler(code, TIMEMAE_CPU_FUSED="auto")
    assert auto.returncode == 0, auto.stderr
    assert "using the eager attention" in auto.stdout and "no C compiler" in auto.stdout
    assert "fused CPU kernels (attention core, residual LayerNorm, GELU, codeword draw): eager torch ops (C kernel unavailable" in auto.stdout
    on = run_without_compiler(code, TIMEMAE_CPU_FUSED="on")
    assert on.returncode != 0
    assert "TIMEMAE_CPU_FUSED=on" in on.stderr and "no C compiler" in on.stderr, on.stderr
    assert "TIMEMAE_CPU_FUSED=off" in on.stderr
    bad = run_without_compiler(code, TIMEMAE_CPU_FUSED="yes")
    assert bad.returncode != 0 and "TIMEMAE_CPU_FUSED='yes' is not one of auto|on|off" in bad.stderr
    assert not run_without_compiler.cache.exists() or not list(run_without_compiler.cache.glob("*.so"))


# ---------------------------------------------------------------------------------------------
# codewords: argmax of Gumbel-perturbed logits in one pass


def _reference_gumbel(seed: int, rows: int, K: int):
    """The kernel's noise in float64 numpy: SplitMix64 at counter r * ceil(K/2) + k // 2 + 1, the
    low 32-bit half for even k, its top 23 bits as U = (u + 0.5) / 2^23, G = -log(-log U)."""
    import numpy as np

    r = np.arange(rows, dtype=np.uint64)[:, None]
    k = np.arange(K, dtype=np.uint64)[None, :]
    c = r * np.uint64((K + 1) // 2) + k // np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + c * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    half = np.where(k % np.uint64(2) == 0, z & np.uint64(0xFFFFFFFF), z >> np.uint64(32))
    u = ((half >> np.uint64(9)).astype(np.float64) + 0.5) / 2**23
    return torch.from_numpy(-np.log(-np.log(u)))


@pytest.mark.parametrize("K", [1, 5, 16, 17, 192])
def test_gumbel_argmax_is_the_reference_stream(fused, K):
    rows = 37
    logits = torch.randn(rows, K, generator=torch.Generator().manual_seed(K))
    noise = torch.empty(rows, K)
    codes = fused.gumbel_argmax(logits, torch.Generator().manual_seed(5), noise_out=noise)
    seed = torch.empty(1, dtype=torch.int64).random_(generator=torch.Generator().manual_seed(5)).item()
    torch.testing.assert_close(noise.double(), _reference_gumbel(seed, rows, K), rtol=2e-6, atol=2e-6)
    assert codes.shape == (rows,) and codes.dtype == torch.int64
    assert torch.equal(codes, (logits + noise).argmax(-1))  # the same float32 sums, the first maximum
    batched = fused.gumbel_argmax(logits.view(1, rows, K), torch.Generator().manual_seed(5))
    assert torch.equal(batched, codes.view(1, rows))  # leading dimensions are rows


def test_gumbel_argmax_samples_the_softmax(fused):
    import math

    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -30.0])
    n = 400_000
    noise = torch.empty(n, 5)
    draws = fused.gumbel_argmax(logits.expand(n, 5), torch.Generator().manual_seed(1), noise_out=noise)
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.softmax(logits.double(), 0)
    sigma = torch.sqrt(p * (1 - p) / n)
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    g = noise.double().flatten()  # standard Gumbel: mean Euler-Mascheroni, variance pi^2/6; finite
    assert abs(g.mean().item() - 0.5772156649) < 5 * math.sqrt(math.pi**2 / 6 / g.numel())
    assert abs(g.var().item() - math.pi**2 / 6) < 0.01
    assert -2.82 < g.min().item() and g.max().item() < 16.7


def test_gumbel_argmax_seeded_and_thread_count_independent(fused):
    logits = torch.randn(1152, 192)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.gumbel_argmax(logits, torch.Generator().manual_seed(3))
        torch.set_num_threads(2)
        two = fused.gumbel_argmax(logits, torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.manual_seed(11)  # the default generator: torch.manual_seed decides, each call draws anew
    a, b = fused.gumbel_argmax(logits), fused.gumbel_argmax(logits)
    torch.manual_seed(11)
    assert torch.equal(fused.gumbel_argmax(logits), a) and not torch.equal(a, b)


def test_draw_codewords_follows_the_switch(monkeypatch):
    from timemae_dist.model import draw_codewords, gumbel_noise

    logits = torch.randn(64, 12)
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "off")  # eager: rand-based Gumbel noise + argmax
    eager = draw_codewords(logits, torch.Generator().manual_seed(4))
    assert torch.equal(eager, (logits + gumbel_noise(logits.shape, generator=torch.Generator().manual_seed(4))).argmax(-1))
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "on")
    fast = draw_codewords(logits, torch.Generator().manual_seed(4))
    assert torch.equal(fast, cpu_fused.gumbel_argmax(logits, torch.Generator().manual_seed(4)))
    assert not torch.equal(fast, eager)  # another stream (same distribution)
    assert not cpu_fused.applies_gumbel(logits.double())
    assert torch.equal(draw_codewords(logits.double(), torch.Generator().manual_seed(4)), eager)
