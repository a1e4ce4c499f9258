"""Parity tests for timemae_dist.kernels (DESIGN style rule 7).

Triton on CPU: the Triton kernels run through Triton's interpreter. Triton 3.x reads
``TRITON_INTERPRET`` when ``triton.jit`` wraps a function, and ``timemae_dist.kernels`` wraps
its kernels lazily on the first triton call (one cached set per mode), so the ``interpret``
fixture's ``monkeypatch.setenv("TRITON_INTERPRET", "1")`` is enough whatever was imported
before -- no subprocess, no conftest side effect on other tests.

Shapes: a seeded grid (fixed edge cases + random draws from ``random.Random(SEED)``), kept
small because the interpreter runs each program in Python.
"""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from timemae_dist.kernels import fused_mask_gather

SEED = 20240611
BF16_ULP = 2.0**-7  # spacing of bf16 numbers relative to the lower end of their binade


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------------- helpers


def make_inputs(B, L, V, D, dtype, seed, param_dtype=None, transposed_emb=False):
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    if transposed_emb:  # what Conv1d(...).transpose(1, 2) gives: a non-contiguous (B, L, D) view
        emb = torch.randn(B, D, L, generator=g).to(dtype).transpose(1, 2)
    else:
        emb = torch.randn(B, L, D, generator=g).to(dtype)
    pos = torch.randn(L, D, generator=g).to(param_dtype)
    mt = torch.randn(D, generator=g).to(param_dtype)
    perm = torch.argsort(torch.rand(B, L, generator=g), dim=1)
    ids_keep, ids_mask = perm[:, :V].contiguous(), perm[:, V:].contiguous()
    return emb, pos, mt, ids_keep, ids_mask


def run(backend, emb, pos, mt, ids_keep, ids_mask, seed=0):
    """Forward + backward with fixed random upstream gradients; returns outputs and grads."""
    leaves = [t.detach().clone().requires_grad_() for t in (emb, pos, mt)]
    outs = fused_mask_gather(*leaves, ids_keep, ids_mask, backend=backend)
    g = torch.Generator().manual_seed(seed + 1)
    gv = torch.randn(outs[0].shape, generator=g).to(outs[0].dtype)
    gq = torch.randn(outs[2].shape, generator=g).to(outs[2].dtype)
    torch.autograd.backward([outs[0], outs[2]], [gv, gq])
    return [o.detach() for o in outs], [t.grad for t in leaves], (gv, gq)


def plain_indexing(emb, pos, mt, ids_keep, ids_mask):
    """The obvious eager formulation (gather + advanced indexing), autograd does the rest."""
    D = emb.shape[-1]
    take = lambda ids: emb.gather(1, ids.unsqueeze(-1).expand(-1, -1, D))  # noqa: E731
    visible = take(ids_keep) + pos[ids_keep]
    target_in = (take(ids_mask) + pos[ids_mask]).detach()
    queries = mt + pos[ids_mask]
    return visible, target_in, queries


# Edge cases (V=1, M=1, V=M=1, D not a power of two, D=1) + random draws.
EDGE = [(1, 2, 1, 48), (3, 5, 1, 96), (4, 6, 5, 100), (2, 16, 7, 64), (2, 3, 2, 1)]


def grid(n_random=4, seed=SEED):
    rng = random.Random(seed)
    cases = list(EDGE)
    for _ in range(n_random):
        L = rng.randint(2, 20)
        cases.append((rng.randint(1, 6), L, rng.randint(1, L - 1), rng.choice([3, 48, 96, 100, 130])))
    return cases


GRID = grid()


# ------------------------------------------------------------------ reference correctness


@pytest.mark.parametrize("transposed_emb", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("B,L,V,D", GRID)
def test_reference_matches_plain_indexing(B, L, V, D, transposed_emb):
    emb, pos, mt, keep, mask = make_inputs(B, L, V, D, torch.float64, seed=B * 1000 + L * 10 + D,
                                           transposed_emb=transposed_emb)
    outs, grads, (gv, gq) = run("torch", emb, pos, mt, keep, mask)
    leaves = [t.clone().requires_grad_() for t in (emb, pos, mt)]
    ref = plain_indexing(*leaves, keep, mask)
    torch.autograd.backward([ref[0], ref[2]], [gv, gq])
    # float64, same additions (one term per output element): exact forward; the pos/mask-token
    # gradients sum the same terms in another order, so allow float64 reassociation error.
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads, leaves):
        torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck_float64():
    emb, pos, mt, keep, mask = make_inputs(3, 7, 3, 5, torch.float64, seed=1)
    leaves = [t.requires_grad_() for t in (emb, pos, mt)]
    f = lambda e, p, m: fused_mask_gather(e, p, m, keep, mask, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, leaves)


def test_target_in_is_non_differentiable_and_dispatch_on_cpu():
    emb, pos, mt, keep, mask = make_inputs(2, 6, 3, 8, torch.float32, seed=2)
    emb.requires_grad_()
    pos.requires_grad_()
    visible, target_in, queries = fused_mask_gather(emb, pos, mt, keep, mask)  # backend=None
    assert not target_in.requires_grad  # feeds the no-grad momentum target encoder
    assert visible.requires_grad and queries.requires_grad
    assert "Torch" in type(visible.grad_fn).__name__  # CPU tensors -> eager reference


def test_duplicate_ids_accumulate():
    # Not produced by TimeMAE masking (a permutation), but must not silently drop gradient.
    emb, pos, mt, _, _ = make_inputs(2, 6, 3, 10, torch.float64, seed=3)
    keep = torch.tensor([[0, 0, 4], [5, 2, 5]])
    mask = torch.tensor([[1, 1], [3, 3]])
    leaves = [t.clone().requires_grad_() for t in (emb, pos, mt)]
    ref = plain_indexing(*leaves, keep, mask)
    g = torch.Generator().manual_seed(0)
    gv, gq = torch.randn(ref[0].shape, generator=g, dtype=torch.float64), torch.randn(
        ref[2].shape, generator=g, dtype=torch.float64)
    torch.autograd.backward([ref[0], ref[2]], [gv, gq])
    for backend in ("torch", "triton"):
        if backend == "triton":
            pytest.importorskip("triton")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("TRITON_INTERPRET", "1")
                _, grads, _ = _run_with_grads(backend, emb, pos, mt, keep, mask, gv, gq)
            # fp32 accumulators in the kernel: compare at fp32 precision.
            tol = dict(rtol=1e-6, atol=1e-6)
        else:
            _, grads, _ = _run_with_grads(backend, emb, pos, mt, keep, mask, gv, gq)
            tol = dict(rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, leaves):
            torch.testing.assert_close(a, b.grad, **tol)


def _run_with_grads(backend, emb, pos, mt, keep, mask, gv, gq):
    leaves = [t.detach().clone().requires_grad_() for t in (emb, pos, mt)]
    outs = fused_mask_gather(*leaves, keep, mask, backend=backend)
    torch.autograd.backward([outs[0], outs[2]], [gv.to(outs[0].dtype), gq.to(outs[2].dtype)])
    return outs, [t.grad for t in leaves], None


# ---------------------------------------------------------------- no (B, L, D) copies


class _LargeAllocs(TorchDispatchMode):
    """New storages (not views of `known` tensors) of >= `threshold` elements made by any op.

    Every tensor an op allocates passes through the dispatcher, so this sees all of them
    (including torch.empty/zeros in the Triton wrapper), unlike an allocator-level peak."""

    def __init__(self, threshold, known):
        super().__init__()
        self.threshold = threshold
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:
            # In-place ops (index_add_, copy_, and the set_/copy_ the Triton interpreter uses to
            # stage kernel arguments) write into existing storage: no new allocation.
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.threshold * t.element_size():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.known:
                    self.ops.setdefault(ptr, str(func))
        return out


def _count_large(fn, B, L, V, D, dtype=torch.float32, transposed_emb=False):
    emb, pos, mt, keep, mask = make_inputs(B, L, V, D, dtype, seed=4, transposed_emb=transposed_emb)
    # As in the model, a strided emb is a non-leaf view (Conv1d output transposed).
    base = (emb.transpose(1, 2) if transposed_emb else emb).detach().requires_grad_()
    leaves = [base, pos.requires_grad_(), mt.requires_grad_()]
    emb = base.transpose(1, 2) if transposed_emb else base
    with _LargeAllocs(B * L * D, known=leaves) as fwd:
        visible, _, queries = fn(emb, pos, mt, keep, mask)
    with _LargeAllocs(B * L * D, known=leaves) as bwd:
        # autograd.grad returns our backward's gradients as they are (no AccumulateGrad copy).
        torch.autograd.grad(visible.sum() + queries.sum(), [emb, pos, mt])
    return list(fwd.ops.values()), list(bwd.ops.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_BLD_materialisation(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    B, L, V, D = 4, 10, 4, 16  # V, M < L, so every legitimate output is smaller than (B, L, D)

    def fused(*a):
        return fused_mask_gather(*a, backend=backend)

    def unfused(emb, pos, mt, keep, mask):  # the official code: repeat to (B, L, D), then index
        pos_BLD = pos.unsqueeze(0).repeat(B, 1, 1)
        x, q = emb + pos_BLD, mt.repeat(B, L, 1) + pos_BLD
        take = lambda t, ids: t.gather(1, ids.unsqueeze(-1).expand(-1, -1, D))  # noqa: E731
        return take(x, keep), take(x, mask).detach(), take(q, mask)

    # The detector sees the official code's copies ...
    assert len(_count_large(unfused, B, L, V, D)[0]) >= 3
    # ... while the fused op allocates none in forward, and in backward only emb's gradient.
    for transposed_emb in (False, True):  # a strided emb (Conv1d output) is not copied either
        fwd_ops, bwd_ops = _count_large(fused, B, L, V, D, transposed_emb=transposed_emb)
        assert fwd_ops == [] and len(bwd_ops) == 1, (fwd_ops, bwd_ops)


# ---------------------------------------------------------------- validation


def test_validation_errors(monkeypatch):
    emb, pos, mt, keep, mask = make_inputs(2, 6, 3, 8, torch.float32, seed=5)
    bad = [
        ((emb[0], pos, mt, keep, mask), "emb_BLD must be"),
        ((emb, pos[:5], mt, keep, mask), "pos_LD must be"),
        ((emb, pos, mt[:7], keep, mask), "mask_token_D must have"),
        ((emb, pos, mt, keep[:1], mask), "ids_keep_BV must be"),
        ((emb, pos, mt, keep.int(), mask), "must be int64"),
        ((emb, pos, mt, keep, mask + 6), "outside"),
        ((emb, pos, mt, keep, -mask - 1), "outside"),
        ((emb.long(), pos, mt, keep, mask), "floating point"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fused_mask_gather(*args)
    with pytest.raises(ValueError, match="backend must be"):
        fused_mask_gather(emb, pos, mt, keep, mask, backend="cuda")
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused_mask_gather(emb, pos, mt, keep, mask, backend="triton")


# ---------------------------------------------------------------- Triton vs reference

# float32: forward is one fp32 add per element in both -> bit-identical. The emb gradient is a
# copy of the upstream gradient (unique ids) -> identical. pos / mask-token gradients sum B
# (resp. B*M) fp32 terms in a different order (atomics vs index_add_) -> reassociation error
# <= n * 2**-24 * sum|terms|, well inside rtol=atol=1e-5 for these sizes.
# bfloat16: both compute in fp32 and round once to bf16, but Triton's *interpreter* rounds
# fp32->bf16 toward zero while PyTorch (and Triton on a GPU) round to nearest even, so results
# may differ by one bf16 ulp: rtol = 2**-7. The reductions accumulate in fp32 in both (no
# B * 2**-8 bf16 accumulation error), plus a tiny atol for fp32 reassociation near zero.
TOL = {
    torch.float32: dict(fwd=dict(rtol=0, atol=0), bwd=dict(rtol=1e-5, atol=1e-5)),
    torch.bfloat16: dict(fwd=dict(rtol=BF16_ULP, atol=1e-6), bwd=dict(rtol=BF16_ULP, atol=1e-4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,L,V,D", GRID)
def test_triton_matches_reference(interpret, B, L, V, D, dtype):
    seed = B * 7919 + L * 31 + V * 7 + D
    inputs = make_inputs(B, L, V, D, dtype, seed=seed)
    outs_t, grads_t, _ = run("triton", *inputs, seed=seed)
    outs_r, grads_r, _ = run("torch", *inputs, seed=seed)
    for a, b in zip(outs_t, outs_r):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **TOL[dtype]["fwd"])
    for a, b in zip(grads_t, grads_r):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **TOL[dtype]["bwd"])


def test_triton_noncontiguous_and_mixed_dtypes(interpret):
    # Conv1d output transposed (strided emb) + bf16 activations with fp32 parameters (autocast).
    inputs = make_inputs(3, 9, 4, 100, torch.bfloat16, seed=6, param_dtype=torch.float32, transposed_emb=True)
    assert not inputs[0].is_contiguous()
    outs_t, grads_t, _ = run("triton", *inputs)
    outs_r, grads_r, _ = run("torch", *inputs)
    for a, b in zip(outs_t, outs_r):
        assert a.dtype == b.dtype == torch.float32  # promoted like emb + pos
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b, t in zip(grads_t, grads_r, inputs):
        assert a.dtype == b.dtype == t.dtype
        torch.testing.assert_close(a, b, **TOL[torch.bfloat16]["bwd"])


def test_triton_partial_grads(interpret):
    # Only some inputs need gradients (e.g. frozen positions); the kernel skips the others.
    emb, pos, mt, keep, mask = make_inputs(2, 6, 2, 12, torch.float32, seed=7)
    emb.requires_grad_()
    for backend in ("triton", "torch"):
        emb.grad = None
        v, _, q = fused_mask_gather(emb, pos, mt, keep, mask, backend=backend)
        (v.sum() + q.sum()).backward()
        if backend == "triton":
            g_t = emb.grad.clone()
    torch.testing.assert_close(g_t, emb.grad, rtol=0, atol=0)
    assert pos.grad is None and mt.grad is None


# ---------------------------------------------------------------- compiled (no GPU needed)


def test_kernels_compile_for_cuda(monkeypatch, tmp_path):
    # The interpreter runs kernel bodies as Python, so it misses compile-only errors (e.g. a
    # name with different types in the two branches of an `if`). Compile the real thing to
    # PTX + cubin for sm_90 with Triton's bundled CUDA toolchain; no GPU is needed for that.
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        if "nvidia" not in triton.backends.backends:
            raise ImportError("no nvidia backend")
    except (ImportError, AttributeError) as e:
        pytest.skip(f"Triton CUDA backend unavailable: {e}")
    from timemae_dist.kernels import mask_gather as mg

    if not isinstance(triton.language.standard._sum_combine, triton.runtime.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its stdlib cannot be compiled")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences a 3.9 warning
    fwd, bwd = mg._kernels(False)
    assert isinstance(fwd, triton.runtime.JITFunction)

    def compile_(kernel, ptr_types, constexprs):
        n_ptr = len(ptr_types)
        sig = {name: (ptr_types[i] if i < n_ptr else "constexpr" if name in constexprs else "i64")
               for i, name in enumerate(kernel.arg_names)}
        return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))

    for dt in ("fp32", "bf16"):
        k = compile_(fwd, [f"*{dt}"] * 3 + ["*i64"] * 2 + [f"*{dt}"] * 3, {"BLOCK_R": 16, "BLOCK_D": 128})
        assert k.asm["cubin"]
        for flags in ((True, True, True), (True, False, False), (False, True, True)):
            consts = dict(zip(("HAS_EMB", "HAS_POS", "HAS_MT"), flags), BLOCK_R=16, BLOCK_D=128)
            k = compile_(bwd, [f"*{dt}"] * 2 + ["*i64"] * 2 + ["*fp32"] * 3, consts)
            assert k.asm["cubin"]
