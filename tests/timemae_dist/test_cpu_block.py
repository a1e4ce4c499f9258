"""A whole block as one autograd node on CPU (timemae_dist/kernels/cpu_block.py), built for real:
forward and every gradient against the per-op fused path (same kernels, same dropout draws) and,
without dropout, against the eager ops; the bias-folding kernels (GELU of h + b, the residual's
bias of y) against eager math; the inputs and parameters that keep the per-op path; the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from timemae_dist.kernels import cpu_block, cpu_fused
from timemae_dist.model.layers import CrossAttentionBlock, TransformerBlock

pytestmark = pytest.mark.skipif(not cpu_fused.available("auto"),
                                reason=f"fused CPU kernels unavailable here: {cpu_fused.KERNEL.why}")


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "on")


def _block(cross: bool, enable_a: bool, d_model=64, heads=4, d_ffn=256, dropout=0.2):
    torch.manual_seed(0)
    blk = (CrossAttentionBlock if cross else TransformerBlock)(d_model, heads, d_ffn, enable_a, dropout)
    with torch.no_grad():  # make every parameter matter (the official init sets a = 1e-8, biases 0.1)
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if enable_a:
            blk.res1.a.fill_(0.7)
            blk.res2.a.fill_(-0.4)
    return blk


def _inputs(cross: bool, B=6, N=9, K=7, D=64):
    torch.manual_seed(1)
    x = torch.randn(B, N, D, requires_grad=True)
    kv = torch.randn(B, K, D, requires_grad=True) if cross else None
    return x, kv


def _run(blk, x, kv, seed=5):
    """Output, gradients of (x, kv, *parameters) for a fixed upstream gradient, and the generator
    state after the forward (which random draws it made)."""
    torch.manual_seed(seed)
    out = blk(x) if kv is None else blk(x, kv)
    rng = torch.get_rng_state()
    ins = [x] + ([kv] if kv is not None else []) + list(blk.parameters())
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return out.detach(), torch.autograd.grad(out, ins, g), rng


def _assert_grads_close(got, want, names):
    # k_proj.bias's gradient is zero in exact arithmetic (a softmax is blind to a per-row constant):
    # both paths give float noise there, so every tensor is compared at the scale of all gradients
    scale = max(w.abs().max().item() for w in want)
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("enable_a", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_block_node_matches_the_per_op_fused_path(cross, enable_a, training):
    blk = _block(cross, enable_a).train(training)
    x, kv = _inputs(cross)
    assert cpu_block.applies(blk, x, kv)
    out, grads, rng = _run(blk, x, kv)
    with cpu_block.disabled():
        assert not cpu_block.applies(blk, x, kv)
        ref_out, ref_grads, ref_rng = _run(blk, x, kv)
    assert torch.equal(rng, ref_rng)  # the same random draws (attention, then the two residuals)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    names = ["x"] + (["kv"] if cross else []) + [n for n, _ in blk.named_parameters()]
    _assert_grads_close(grads, ref_grads, names)
    if training:  # dropout is on: another seed gives another output
        assert not torch.allclose(_run(blk, x, kv, seed=6)[0], out)


@pytest.mark.parametrize("cross", [False, True])
def test_block_node_matches_the_eager_ops_without_dropout(cross, monkeypatch):
    blk = _block(cross, True).eval()
    x, kv = _inputs(cross)
    out, grads, _ = _run(blk, x, kv)
    monkeypatch.setenv("TIMEMAE_CPU_FUSED", "off")
    assert not cpu_block.applies(blk, x, kv)
    ref_out, ref_grads, _ = _run(blk, x, kv)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    names = ["x"] + (["kv"] if cross else []) + [n for n, _ in blk.named_parameters()]
    _assert_grads_close(grads, ref_grads, names)


@pytest.mark.parametrize("cross", [False, True])
def test_no_grad_forward_equals_the_grad_forward(cross):
    """The target encoder's path: nothing saved, the same output and draws."""
    blk = _block(cross, True).train()
    x, kv = _inputs(cross)
    out, _, rng = _run(blk, x, kv)
    torch.manual_seed(5)
    with torch.no_grad():
        out_ng = blk(x) if kv is None else blk(x, kv)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(out_ng, out)
    assert out_ng.grad_fn is None


def test_gelu_of_h_plus_bias_matches_torch():
    torch.manual_seed(0)
    h = torch.randn(200, 48, requires_grad=True)  # 200 rows: 4 chunks, the last one partial
    b = torch.randn(48, requires_grad=True)
    out = cpu_fused.gelu_bias_forward(h.detach(), b.detach())
    ref = F.gelu(h + b)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=2e-6)  # as the plain GELU kernel's test
    g = torch.randn(200, 48)
    dh, db = cpu_fused.gelu_bias_backward(h.detach(), b.detach(), g)
    ref_dh, ref_db = torch.autograd.grad(ref, (h, b), g)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(db, ref_db, rtol=1e-5, atol=2e-5)


def test_residual_with_a_bias_of_y_matches_eager_math():
    torch.manual_seed(0)
    x, y = torch.randn(130, 32, requires_grad=True), torch.randn(130, 32, requires_grad=True)
    yb, w, bias = (torch.randn(32, requires_grad=True) for _ in range(3))
    out, saved = cpu_fused.resnorm_forward(x.detach(), y.detach(), 0.6, w.detach(), bias.detach(), 1e-5, 0.0, True,
                                           yb.detach())
    ref = F.layer_norm(x + 0.6 * (y + yb), (32,), w, bias, 1e-5)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn(130, 32)
    dx, dy, da, dw, db, dyb = cpu_fused.resnorm_backward(g, saved)
    a = torch.tensor([0.6], requires_grad=True)
    ref = F.layer_norm(x + a * (y + yb), (32,), w, bias, 1e-5)
    want = torch.autograd.grad(ref, (x, y, a, w, bias, yb), g)
    for name, got, exp in zip(("dx", "dy", "da", "dweight", "dbias", "dy_bias"), (dx, dy, da, dw, db, dyb), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4, msg=name)


def _bf16_autocast(blk, x, kv):
    with torch.autocast("cpu", torch.bfloat16):
        return cpu_block.applies(blk, x, kv)


@pytest.mark.parametrize("case", ["zero3_partition", "autocast", "narrow_heads", "ffn_width", "float64", "switch_off",
                                  "wide_keys"])
def test_inputs_that_keep_the_per_op_path(case, monkeypatch):
    cross = case == "wide_keys"
    blk = _block(cross, True, heads=8 if case == "narrow_heads" else 4, d_ffn=200 if case == "ffn_width" else 256)
    x, kv = _inputs(cross, K=17 if case == "wide_keys" else 7)
    if case == "zero3_partition":
        blk.attn.q_proj.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    elif case == "float64":
        blk, x = blk.double(), x.double()
    elif case == "switch_off":
        monkeypatch.setenv("TIMEMAE_CPU_FUSED", "off")
    if case == "autocast":
        assert not _bf16_autocast(blk, x, kv)
    else:
        assert not cpu_block.applies(blk, x, kv)
    if case != "autocast":  # the block still runs (per-op path)
        out = blk(x) if kv is None else blk(x, kv)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_model_step_matches_the_per_op_path():
    """Official size: loss and gradients of a TimeMAE pretraining forward agree between the two paths."""
    from timemae_dist.model import TimeMAE, TimeMAEConfig

    torch.manual_seed(0)
    model = TimeMAE(TimeMAEConfig(in_channels=3, seq_len=128, d_model=64, num_layers=2, num_heads=4, reg_layers=2))
    model.train()
    x = torch.randn(16, 3, 128)

    def step():
        torch.manual_seed(3)
        out = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        return out["loss"].detach(), torch.autograd.grad(out["loss"], params)

    loss, grads = step()
    with cpu_block.disabled():
        ref_loss, ref_grads = step()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _assert_grads_close(grads, ref_grads, names)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("enable_a", [True, False])
def test_params_are_the_modules_own_parameter_objects(cross, enable_a):
    """``_params`` reads the modules' parameter dicts directly (no ``nn.Module.__getattr__``): the very
    objects the attribute path gives, in the node's argument order, ``a`` None when it is off."""
    blk = _block(cross, enable_a)
    at, ff, r1, r2 = blk.attn, blk.ffn, blk.res1, blk.res2
    want = [at.q_proj.weight, at.q_proj.bias, at.k_proj.weight, at.k_proj.bias, at.v_proj.weight, at.v_proj.bias,
            at.out_proj.weight, at.out_proj.bias, r1.norm.weight, r1.norm.bias, r1.a,
            ff.linear1.weight, ff.linear1.bias, ff.linear2.weight, ff.linear2.bias, r2.norm.weight, r2.norm.bias, r2.a]
    got = cpu_block._params(blk)
    assert len(got) == len(want) and all(g is w for g, w in zip(got, want))
    assert (got[10] is None and got[17] is None) == (not enable_a)
    blk.ffn.linear1.weight = torch.nn.Parameter(torch.zeros_like(blk.ffn.linear1.weight))  # a replaced parameter
    assert cpu_block._params(blk)[11] is blk.ffn.linear1.weight


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("how", ["no_grad", "frozen"])
def test_forward_with_nothing_to_differentiate_skips_the_node(cross, how):
    """Under ``torch.no_grad()``, or with no input and no parameter requiring a gradient (the momentum
    target encoder), the block runs its forward without ``autograd.Function.apply``: the same output
    and random draws as the recorded node, and no graph."""
    blk = _block(cross, True).train()
    x, kv = _inputs(cross)
    torch.manual_seed(5)
    want = cpu_block.block_forward(blk, x, kv)  # recorded: x requires grad
    want_rng = torch.get_rng_state()
    assert want.grad_fn is not None
    x, kv = x.detach(), None if kv is None else kv.detach()
    if how == "frozen":
        blk.requires_grad_(False)
    torch.manual_seed(5)
    if how == "no_grad":
        with torch.no_grad():
            got = cpu_block.block_forward(blk, x, kv)
    else:
        got = cpu_block.block_forward(blk, x, kv)
    assert got.grad_fn is None and not got.requires_grad
    assert torch.equal(got, want.detach()) and torch.equal(torch.get_rng_state(), want_rng)


# --- the node as one C call each way (GEMMs through PyTorch's own sgemm_) ------------------------


def test_one_call_is_in_use_where_torch_has_mkl():
    """PyTorch's x86 wheels export oneMKL's ``sgemm_``: blocks run as one C call there; ``torch_gemms()``
    switches back to the Python-driven node, and the log line says which."""
    ok, why = cpu_block.one_call_status()
    if not torch.backends.mkl.is_available():
        pytest.skip(f"this PyTorch has no MKL ({why})")
    assert ok, why
    blk = _block(False, True)
    x, _ = _inputs(False)
    assert cpu_block.one_call() and type(cpu_block.block_forward(blk, x).grad_fn).__name__ == "_OneCallBackward"
    with cpu_block.torch_gemms():
        assert not cpu_block.one_call()
        assert type(cpu_block.block_forward(blk, x).grad_fn).__name__ == "_BlockBackward"
    assert cpu_block.one_call()
    assert "blocks: one C call each way (GEMMs: sgemm_ of libtorch_cpu" in cpu_fused.describe()


@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_block_gemm_matches_torch_mm(ta, tb, beta):
    """The row-major GEMM the C block calls (column-major ``sgemm_`` with the operands swapped), on
    strided operands: every transpose combination, with and without accumulation into C."""
    if not cpu_block.one_call_status()[0]:
        pytest.skip(cpu_block.one_call_status()[1])
    g = torch.Generator().manual_seed(0)
    m, n, k = 23, 40, 70
    a_big = torch.randn((k, m + 3) if ta else (m, k + 3), generator=g)  # leading dimension > columns
    b_big = torch.randn((n, k + 5) if tb else (k, n + 5), generator=g)
    c_big = torch.randn(m, n + 7, generator=g)
    a = a_big[:, :m] if ta else a_big[:, :k]
    b = b_big[:, :k] if tb else b_big[:, :n]
    want = c_big.clone()
    want[:, :n] = beta * c_big[:, :n] + (a.t() if ta else a) @ (b.t() if tb else b)
    cpu_fused.KERNEL.lib.timemae_block_mm(ta, tb, m, n, k, a_big.data_ptr(), a_big.stride(0), b_big.data_ptr(),
                                          b_big.stride(0), beta, c_big.data_ptr(), c_big.stride(0))
    torch.testing.assert_close(c_big, want, rtol=1e-5, atol=1e-5)  # the padding columns untouched too


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("B,enable_a", [(6, True), (20, True), (20, False)])  # 54 rows: one chunk; 180: three
def test_one_call_matches_the_python_driven_node(cross, training, B, enable_a):
    if not cpu_block.one_call_status()[0]:
        pytest.skip(cpu_block.one_call_status()[1])
    blk = _block(cross, enable_a).train(training)
    x, kv = _inputs(cross, B=B)
    out, grads, rng = _run(blk, x, kv)
    with cpu_block.torch_gemms():
        ref_out, ref_grads, ref_rng = _run(blk, x, kv)
    assert torch.equal(rng, ref_rng)  # one draw of the block's seeds: the same generator state
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)  # the same GEMMs and kernels
    names = ["x"] + (["kv"] if cross else []) + [n for n, _ in blk.named_parameters()]
    _assert_grads_close(grads, ref_grads, names)


def test_one_call_gradients_accumulate_over_backward_passes():
    """The node returns its parameters' gradients as views of a few buffers: autograd takes them as
    ``.grad`` on the first pass and adds the second pass's into them, per parameter."""
    blk = _block(True, True).train()
    x, kv = _inputs(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(5)
    once = torch.autograd.grad(blk(x, kv), list(blk.parameters()), g)
    for _ in range(2):
        torch.manual_seed(5)
        blk(x, kv).backward(g)
    for (name, p), want in zip(blk.named_parameters(), once):
        torch.testing.assert_close(p.grad, 2 * want, rtol=1e-6, atol=1e-7, msg=name)


def test_one_call_reports_scratch_it_cannot_allocate():
    """A call whose scratch cannot be allocated returns 1 before it reads or writes a tensor (the node
    then raises MemoryError) instead of crashing or leaving half-written outputs."""
    import ctypes

    if not cpu_block.one_call_status()[0]:
        pytest.skip(cpu_block.one_call_status()[1])
    lib = cpu_fused.KERNEL.lib
    fl, thr, _ = cpu_block._rates((4, 0.0, False, 0.0, 0.0, 1e-5, 1e-5))
    no_ptrs = cpu_block._PTRS()  # every pointer NULL: nothing may be touched
    huge_d = (ctypes.c_int64 * 8)(1, 1, 1, 1 << 30, 16, 4, 1, 1)  # 3 * D * D floats of stacked q|k|v weights
    assert lib.timemae_block_fwd(None, None, no_ptrs, huge_d, fl, thr, None, None, None, 1) == 1
    huge_b = (ctypes.c_int64 * 8)(1 << 50, 9, 9, 64, 256, 4, 1, 1)  # (B * N) x D gradients
    assert lib.timemae_block_bwd(None, None, None, no_ptrs, huge_b, fl, thr, None, None, None, None, None, None, None,
                                 None, None, 1) == 1
