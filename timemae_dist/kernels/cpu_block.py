"""A whole TimeMAE block (attention + post-LN residual + feed-forward + post-LN residual) as one
autograd node on CPU, built from the fused kernels of :mod:`timemae_dist.kernels.cpu_fused` and
torch's GEMMs.

With the fused kernels, a block still runs as ~15 ops forward and ~25 autograd nodes backward
(views, transposes, ``addmm`` with its bias broadcast copy, a row sum per bias gradient, one
``AccumulateGrad`` per parameter use), 20 blocks a step. Here a block's forward calls the GEMMs and
kernels directly with autograd off and records one node (none where nothing needs a gradient: the
momentum target encoder, evaluation); its backward is written out (each GEMM's
input and weight gradients, the residual branches added in place by ``addmm_``). The output
projection's, ``linear1``'s and ``linear2``'s biases are added inside the kernels that read those
GEMMs' outputs (the residual LayerNorm adds a bias of ``y``, GELU runs on ``h + b``), whose
backward passes also sum the bias gradients (over fixed row chunks, so results do not depend on
the thread count); the q|k|v projection keeps ``addmm``. Same equations, parameters and random
draws as the per-op fused path of :class:`timemae_dist.model.layers.TransformerBlock` /
``CrossAttentionBlock`` (the attention's dropout seed first, then the two residuals', from
torch's generator), so a run draws the same masks either way; results agree to float32 rounding.
Measured: ``benchmarks/bench_step_ab.py --ab block``.

**One C call.** Called op by op from Python, a node still costs ~0.1 ms forward and ~0.3 ms forward
+ backward of serial Python, dispatch and allocator work whatever the batch (20 blocks a step, the
second OpenMP thread idle meanwhile). Where PyTorch's CPU library exports the BLAS ``sgemm_`` it
calls itself (oneMKL in the x86 wheels), the node's forward and backward are each one C call
(``timemae_block_fwd`` / ``timemae_block_bwd`` of the kernel library): the same GEMMs through that
``sgemm_``, the kernels in between, one workspace tensor for what the backward reads, the bias and
LayerNorm gradient sums reduced in C over fixed row chunks. Same draws (one ``random_()`` of the
block's seeds: the same values in the same order); the outputs equal the Python-driven node's and
the gradients agree to float32 rounding (the q|k|v bias sums are chunked sums instead of
``sum(0)``). :func:`one_call_status` checks ``sgemm_`` against ``torch.mm`` once per process;
:func:`torch_gemms` switches back for A/B runs (``benchmarks/bench_step_ab.py --ab onecall``).

Applies where every fused kernel applies to the block (float32 CPU tensors, no autocast, heads
and shapes the attention kernel takes, widths the residual kernel takes) and the block's
parameters are whole tensors (not ZeRO-3 partitions, which DeepSpeed gathers per module in hooks
that this path would bypass). ``trainer.cpu_fused`` / ``$TIMEMAE_CPU_FUSED`` switches it with
the kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from timemae_dist.kernels import cpu_fused

__all__ = ["applies", "block_forward", "disabled", "torch_gemms", "one_call", "one_call_status"]

_disabled = 0  # > 0 inside disabled(): blocks run the per-op path
_torch_gemms = 0  # > 0 inside torch_gemms(): a block node calls torch's GEMMs and the kernels one by one


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Blocks run op by op (still on the fused kernels where they apply) inside this context: for
    A/B measurements (``benchmarks/bench_step_ab.py --ab block``) and parity tests."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


@contextlib.contextmanager
def torch_gemms() -> Iterator[None]:
    """Block nodes call torch's GEMMs and the kernels one by one from Python inside this context,
    instead of the whole block in one C call: for A/B measurements (``benchmarks/bench_step_ab.py
    --ab onecall``) and parity tests."""
    global _torch_gemms
    _torch_gemms += 1
    try:
        yield
    finally:
        _torch_gemms -= 1


@functools.lru_cache(maxsize=1)
def one_call_status() -> tuple[bool, str]:
    """``(usable, why)``: whether a block runs as one C call here. It needs the BLAS ``sgemm_`` that
    PyTorch's CPU library exports (oneMKL's, in x86 wheels), handed to the kernel library and
    checked once against ``torch.mm`` on every transpose combination the block uses; elsewhere a
    block node calls torch's GEMMs from Python (same equations, same draws)."""
    lib = cpu_fused.KERNEL.load()
    if lib is None:
        return False, f"the fused CPU kernel library is unavailable ({cpu_fused.KERNEL.why})"
    names = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib"}
    path = Path(torch.__file__).parent / "lib" / names.get(sys.platform, "libtorch_cpu.so")
    try:
        addr = ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError) as e:
        return False, f"torch's GEMMs between the kernels (PyTorch's CPU library exports no BLAS sgemm_: {e})"
    lib.timemae_block_set_sgemm(addr)
    g = torch.Generator().manual_seed(0)
    for ta, tb, beta in ((0, 1, 1.0), (1, 0, 0.0), (0, 0, 1.0)):
        m, n, k = 37, 48, 70
        a = torch.randn((k, m) if ta else (m, k), generator=g)
        b = torch.randn((n, k) if tb else (k, n), generator=g)
        c = torch.randn(m, n, generator=g)
        want = beta * c + (a.t() if ta else a) @ (b.t() if tb else b)
        lib.timemae_block_mm(ta, tb, m, n, k, a.data_ptr(), a.shape[1], b.data_ptr(), b.shape[1], beta,
                             c.data_ptr(), n)
        if not torch.allclose(c, want, rtol=1e-4, atol=1e-4):
            return False, f"torch's GEMMs between the kernels ({path.name}'s sgemm_ disagrees with torch.mm)"
    return True, f"one C call each way (GEMMs: sgemm_ of {path.name})"


def one_call() -> bool:
    """Whether block nodes run as one C call each way now (:func:`one_call_status`, not inside
    :func:`torch_gemms`)."""
    return not _torch_gemms and one_call_status()[0]


def _params(block) -> list[Optional[torch.Tensor]]:
    """The block's parameters in :class:`_Block`'s argument order (``a`` None when constant 1).

    Read straight from the modules' ``_modules`` / ``_parameters`` dicts: the same objects as the
    attribute path (``block.attn.q_proj.weight``), without ``nn.Module.__getattr__``'s ~55 fallback
    lookups a call (~25 us of a block's ~190 us fixed cost, 20 blocks a step)."""
    mods = block._modules
    at, ff, r1, r2 = mods["attn"]._modules, mods["ffn"]._modules, mods["res1"], mods["res2"]
    q, k, v, o = (at[name]._parameters for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
    l1, l2 = ff["linear1"]._parameters, ff["linear2"]._parameters
    n1, n2 = r1._modules["norm"]._parameters, r2._modules["norm"]._parameters
    # ``a`` is a registered parameter, or a plain None attribute (enable_res_parameter off)
    return [q["weight"], q["bias"], k["weight"], k["bias"], v["weight"], v["bias"], o["weight"], o["bias"],
            n1["weight"], n1["bias"], r1._parameters.get("a"), l1["weight"], l1["bias"], l2["weight"], l2["bias"],
            n2["weight"], n2["bias"], r2._parameters.get("a")]


def applies(block, x: torch.Tensor, kv: Optional[torch.Tensor] = None) -> bool:
    """Whether ``block`` (a ``TransformerBlock``, or a ``CrossAttentionBlock`` when ``kv`` is given)
    runs as one fused node on these inputs."""
    if _disabled:
        return False
    attn = block.attn
    keys = x.shape[1] if kv is None else kv.shape[1]
    if kv is not None and (kv.dtype != torch.float32 or kv.device.type != "cpu" or kv.shape[-1] != x.shape[-1]):
        return False
    if x.dim() != 3 or not cpu_fused.applies(x, keys, attn.head_dim) or not cpu_fused.applies_residual(x, x):
        return False
    if block.ffn.linear1.out_features % 16:  # the bias + GELU kernel's rows are 16-lane vectors
        return False
    w = attn.q_proj.weight
    return w.dtype == torch.float32 and w.device.type == "cpu" and not cpu_fused.is_zero3_partition(w)


class _Block(torch.autograd.Function):
    """``(x, kv, *params, meta)`` -> the block's output (B, N, D). ``kv`` None: self-attention."""

    @staticmethod
    def forward(ctx, x, kv, wq, bq, wk, bk, wv, bv, wo, bo, g1, be1, a1, w1, b1, w2, b2, g2, be2, a2, meta):
        heads, p_attn, training, p1, p2, eps1, eps2 = meta
        grad = any(ctx.needs_input_grad)
        B, N, D = x.shape
        x2 = x.reshape(B * N, D)
        if kv is None:
            w_in = torch.cat([wq, wk, wv])
            q_src, kv_src, kv2 = torch.addmm(torch.cat([bq, bk, bv]), x2, w_in.t()).view(B, N, 3 * D), None, None
            w_kv = None
        else:
            kv2 = kv.reshape(-1, D)
            w_in, w_kv = wq, torch.cat([wk, wv])
            q_src = torch.addmm(bq, x2, wq.t()).view(B, N, D)
            kv_src = torch.addmm(torch.cat([bk, bv]), kv2, w_kv.t()).view(B, kv.shape[1], 2 * D)
        o, P, M = cpu_fused.attn_forward(q_src, kv_src, heads, p_attn, training, grad)
        o2 = o.view(B * N, D)
        # the output projection's, linear1's and linear2's biases are added inside the kernels that
        # read those GEMMs' outputs (no bias broadcast copy before each GEMM, no bias-gradient sums)
        y1 = o2.mm(wo.t())
        x1, r1 = cpu_fused.resnorm_forward(x2, y1, 1.0 if a1 is None else float(a1), g1, be1, eps1, p1, grad, bo)
        h = x1.mm(w1.t())
        u = cpu_fused.gelu_bias_forward(h, b1)
        y2 = u.mm(w2.t())
        out, r2 = cpu_fused.resnorm_forward(x1, y2, 1.0 if a2 is None else float(a2), g2, be2, eps2, p2, grad, b2)
        if grad:
            ctx.save_for_backward(x2, kv2, q_src, kv_src, P, M, o2, x1, h, u, w_in, w_kv, wo, w1, b1, w2,
                                  *r1[0], *r2[0])
            ctx.meta = (heads, B, N, D, r1[1], r2[1], kv is None, a1 is not None, a2 is not None)
        return out.view(B, N, D)

    @staticmethod
    def backward(ctx, grad_out):
        heads, B, N, D, m1, m2, is_self, has_a1, has_a2 = ctx.meta
        (x2, kv2, q_src, kv_src, P, M, o2, x1, h, u, w_in, w_kv, wo, w1, b1, w2, *rs) = ctx.saved_tensors
        r1, r2 = (tuple(rs[:7]), m1), (tuple(rs[7:]), m2)
        # second residual and the feed-forward
        dx1, dy2, da2, dg2, dbe2, db2 = cpu_fused.resnorm_backward(grad_out.reshape(B * N, D), r2)
        dw2 = dy2.t().mm(u)
        dh, db1 = cpu_fused.gelu_bias_backward(h, b1, dy2.mm(w2))
        dw1 = dh.t().mm(x1)
        dx1.addmm_(dh, w1)
        # first residual, the output projection and the attention core
        dx, dy1, da1, dg1, dbe1, dbo = cpu_fused.resnorm_backward(dx1, r1)
        dwo = dy1.t().mm(o2)
        gq, gkv = cpu_fused.attn_backward(dy1.mm(wo).view(B, N, D), q_src, kv_src, P, M, heads)
        gq2 = gq.view(B * N, -1)
        dw_in, db_in = gq2.t().mm(x2), gq2.sum(0)
        dx.addmm_(gq2, w_in)
        if is_self:
            (dwq, dwk, dwv), (dbq, dbk, dbv) = dw_in.split(D), db_in.split(D)
            dkv = None
        else:
            gkv2 = gkv.view(-1, 2 * D)
            dwq, dbq = dw_in, db_in
            (dwk, dwv), (dbk, dbv) = gkv2.t().mm(kv2).split(D), gkv2.sum(0).split(D)
            dkv = gkv2.mm(w_kv).view(B, -1, D)
        return (dx.view(B, N, D), dkv, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dg1, dbe1, da1 if has_a1 else None,
                dw1, db1, dw2, db2, dg2, dbe2, da2 if has_a2 else None, None)


def block_forward(block, x: torch.Tensor, kv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``block(x)`` (self-attention) or ``block(x, kv)`` (cross-attention) as one fused node;
    :func:`applies` must hold."""
    training = block.training
    keep2 = (1.0 - block.ffn.dropout.p) * (1.0 - block.res2.dropout.p) if training else 1.0
    keep1 = 1.0 - block.res1.dropout.p if training else 1.0
    meta = (block.attn.num_heads, block.attn.dropout, training, 1.0 - keep1, 1.0 - keep2,
            float(block.res1.norm.eps), float(block.res2.norm.eps))
    x, kv, params = x.contiguous(), None if kv is None else kv.contiguous(), _params(block)
    node = _OneCall if one_call() else _Block
    if torch.is_grad_enabled() and (x.requires_grad or (kv is not None and kv.requires_grad)
                                    or any(p is not None and p.requires_grad for p in params)):
        return node.apply(x, kv, *params, meta)
    # nothing to differentiate (the momentum target encoder, evaluation): the same forward without
    # autograd.Function.apply's per-call cost (~35 us: argument unwrapping for functorch, node setup)
    return node.forward(_NO_GRAD, x, kv, *params, meta)


_PTRS = ctypes.c_void_p * 18


def _ptrs(params) -> ctypes.Array:
    """The C call's parameter pointer array (NULL for an ``a`` that is the constant 1)."""
    return _PTRS(*[None if p is None else p.data_ptr() for p in params])


@functools.lru_cache(maxsize=64)
def _rates(meta: tuple) -> tuple:
    """The C call's dropout arguments for a block's ``meta``: ``(fl, thr, seeds drawn)`` (ctypes
    arrays, read only by C, so shared between calls)."""
    heads, p_attn, training, p1, p2, eps1, eps2 = meta
    sites = [cpu_fused._keep(p) if on else (0, 1.0) for p, on in ((p_attn, training and p_attn > 0.0),
                                                                   (p1, p1 > 0.0), (p2, p2 > 0.0))]
    fl = (ctypes.c_float * 5)(eps1, eps2, *(scale for _, scale in sites))
    thr = (ctypes.c_int32 * 3)(*(t for t, _ in sites))
    return fl, thr, sum(t > 0 for t, _ in sites)


@functools.lru_cache(maxsize=256)
def _dims(B: int, N: int, Nk: int, D: int, F: int, H: int, grad: bool, self_attn: bool) -> tuple:
    """``(dims array, workspace floats)`` of a block call of these sizes."""
    dims = (ctypes.c_int64 * 8)(B, N, Nk, D, F, H, int(grad), int(self_attn))
    return dims, cpu_fused.KERNEL.lib.timemae_block_ws_size(dims)


class _OneCall(torch.autograd.Function):
    """:class:`_Block`'s node as one C call each way (``timemae_block_fwd`` / ``timemae_block_bwd``:
    the GEMMs through PyTorch's own BLAS ``sgemm_``, the fused kernels in between, the partial
    sums reduced in C). The same equations, draws (one ``random_()`` of as many seeds as the block
    has dropout sites: the same values, in the same order, as the per-kernel draws) and
    fixed-chunk sums; the GEMMs' blocking is the BLAS's, as torch's calls."""

    @staticmethod
    def forward(ctx, x, kv, *args):
        params, meta = args[:18], args[18]
        grad = any(ctx.needs_input_grad)
        B, N, D = x.shape
        fl, thr, n_seeds = _rates(meta)
        dims, ws_size = _dims(B, N, N if kv is None else kv.shape[1], D, params[11].shape[0], meta[0], grad,
                              kv is None)
        seeds = torch.empty(n_seeds, dtype=torch.int64).random_() if n_seeds else None
        ws = torch.empty(ws_size, dtype=torch.float32)
        out = torch.empty(B, N, D, dtype=torch.float32)
        ptrs = _ptrs(params)
        if cpu_fused.KERNEL.lib.timemae_block_fwd(x.data_ptr(), None if kv is None else kv.data_ptr(), ptrs, dims,
                                                  fl, thr, None if seeds is None else seeds.data_ptr(), ws.data_ptr(),
                                                  out.data_ptr(), torch.get_num_threads()):
            raise MemoryError(f"block forward (B={B}, N={N}, D={D}): out of memory for the C call's scratch; "
                              "lower trainer.micro_batch_size")
        if grad:
            ctx.save_for_backward(x, kv, *params)
            ctx.call = (ws, seeds, dims, fl, thr)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, kv, *params = ctx.saved_tensors
        ws, seeds, dims, fl, thr = ctx.call
        B, N, D = x.shape
        F = params[11].shape[0]
        go = grad_out.contiguous()
        dx, dkv = torch.empty_like(x), None if kv is None else torch.empty_like(kv)
        gw_in, gwo, gw1, gw2 = torch.empty(3 * D, D), torch.empty(D, D), torch.empty(F, D), torch.empty(D, F)
        small = torch.empty(9 * D + F + 2)
        ptrs = _ptrs(params)
        if cpu_fused.KERNEL.lib.timemae_block_bwd(
                go.data_ptr(), x.data_ptr(), None if kv is None else kv.data_ptr(), ptrs, dims, fl, thr,
                None if seeds is None else seeds.data_ptr(), ws.data_ptr(), dx.data_ptr(),
                None if dkv is None else dkv.data_ptr(), gw_in.data_ptr(), gwo.data_ptr(), gw1.data_ptr(),
                gw2.data_ptr(), small.data_ptr(), torch.get_num_threads()):
            raise MemoryError(f"block backward (B={B}, N={N}, D={D}): out of memory for the C call's scratch; "
                              "lower trainer.micro_batch_size")
        db_in, dbo, dg1, dbe1, da1, db1, db2, dg2, dbe2, da2 = small.split_with_sizes(
            (3 * D, D, D, D, 1, F, D, D, D, 1))
        dwq, dwk, dwv = gw_in.split(D)
        dbq, dbk, dbv = db_in.split(D)
        return (dx, dkv, dwq, dbq, dwk, dbk, dwv, dbv, gwo, dbo, dg1, dbe1, None if params[10] is None else da1,
                gw1, db1, gw2, db2, dg2, dbe2, None if params[17] is None else da2, None)


class _NoGradContext:
    """The ``ctx`` of a forward that records nothing: no input needs a gradient."""

    needs_input_grad = (False,) * 21


_NO_GRAD = _NoGradContext()
