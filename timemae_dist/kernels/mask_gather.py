"""Fused masking gather: the three masked inputs of TimeMAE in one pass.

``fused_mask_gather(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM)`` returns

* ``visible_BVD   = emb[b, ids_keep[b]] + pos[ids_keep[b]]``   (online encoder input)
* ``target_in_BMD = emb[b, ids_mask[b]] + pos[ids_mask[b]]``   (momentum target encoder input)
* ``queries_BMD   = mask_token + pos[ids_mask[b]]``            (regressor queries)

without ever materialising ``(B, L, D)`` copies of the positions or the mask token (the
official code does ``pos.repeat(B, 1, 1)`` / ``mask_token.repeat(B, L, 1)`` and indexes).

Gradients: ``emb`` receives the ``visible`` gradient scattered back to the kept rows (zero
elsewhere); ``pos`` receives the sum over the batch of the ``visible`` and ``queries``
gradients scattered to their positions; ``mask_token`` receives the sum over ``(B, M)`` of
the ``queries`` gradient. Scatters accumulate (``index_add_`` / atomic adds), so repeated
ids within a row are safe (masking ids come from a permutation and are unique anyway).

``target_in`` carries NO gradient by design: it feeds the momentum target encoder, which
runs under ``torch.no_grad`` and is updated by EMA only. It is marked non-differentiable
(``ctx.mark_non_differentiable``), so ``target_in.requires_grad`` is False and autograd
never asks for its gradient. If you need gradients through it, index it yourself.

Backends (``backend=``):

* ``"torch"`` -- eager reference (``index_select`` on the flat embedding and on ``pos`` only),
  an ``autograd.Function`` with an explicit backward; passes ``gradcheck`` in float64.
  Default on CPU.
* ``"triton"`` -- one forward kernel (all ``B*(V+M)`` rows, one launch) and one backward
  kernel (atomic scatter-add into fp32 accumulators). Default on CUDA when ``triton`` imports.
  On CPU tensors it runs through Triton's interpreter, which requires ``TRITON_INTERPRET=1``
  in the environment. Triton 3.x reads that variable when ``@triton.jit`` wraps a function,
  so this module jits its kernels lazily, on the first triton call, and keeps one set per
  mode: setting the variable at any time before the first CPU triton call works
  (``monkeypatch.setenv`` in tests is enough; importing triton or this module first does not
  matter). For that the kernels avoid Triton's ``@jit`` standard-library helpers
  (``tl.sum``, ``tl.max``, ...), which are wrapped once at ``import triton`` and fail under the
  interpreter if the variable was unset then; builtins such as ``tl.reduce`` are fine.
  Interpreter caveat: it rounds fp32 -> bf16/fp16 toward zero, a GPU to nearest even, so
  interpreted half-precision results may differ from the reference by one ulp.
  Memory: gradients accumulate in fp32 buffers (for bf16/fp16 ``emb`` that is a transient
  fp32 ``(B, L, D)`` buffer, cast once at the end).
* ``None`` -- triton for CUDA tensors when triton is importable, torch otherwise.

Hot path: no host syncs. ``ids`` range checks run on CPU tensors only (free there); on CUDA
they are skipped unless ``check_ids=True`` (then ``torch._assert_async``, still no sync).
"""

from __future__ import annotations  # also keeps `tl.constexpr` annotations unevaluated

import os
from typing import Optional

import torch

try:  # importing triton does not fix the interpreter mode; wrapping with triton.jit does
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

__all__ = ["fused_mask_gather", "mask_gather_reference", "triton_available"]

_BACKENDS = ("torch", "triton")


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _validate(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM, check_ids):
    for name, t in (
        ("emb_BLD", emb_BLD),
        ("pos_LD", pos_LD),
        ("mask_token_D", mask_token_D),
        ("ids_keep_BV", ids_keep_BV),
        ("ids_mask_BM", ids_mask_BM),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"fused_mask_gather: {name} must be a torch.Tensor, got {type(t).__name__}")
    if emb_BLD.dim() != 3:
        raise ValueError(f"fused_mask_gather: emb_BLD must be (B, L, D), got shape {tuple(emb_BLD.shape)}")
    B, L, D = emb_BLD.shape
    if pos_LD.shape != (L, D):
        raise ValueError(
            f"fused_mask_gather: pos_LD must be (L, D) = ({L}, {D}) to match emb_BLD, got {tuple(pos_LD.shape)}"
        )
    if mask_token_D.numel() != D:
        raise ValueError(
            f"fused_mask_gather: mask_token_D must have D = {D} elements, got shape {tuple(mask_token_D.shape)}"
        )
    for name, ids in (("ids_keep_BV", ids_keep_BV), ("ids_mask_BM", ids_mask_BM)):
        if ids.dim() != 2 or ids.shape[0] != B:
            raise ValueError(f"fused_mask_gather: {name} must be (B={B}, n), got shape {tuple(ids.shape)}")
        if ids.dtype != torch.int64:
            raise ValueError(f"fused_mask_gather: {name} must be int64 (torch.long), got {ids.dtype}")
    for name, t in (("emb_BLD", emb_BLD), ("pos_LD", pos_LD), ("mask_token_D", mask_token_D)):
        if not t.is_floating_point():
            raise ValueError(f"fused_mask_gather: {name} must be floating point, got {t.dtype}")
    dev = emb_BLD.device
    for name, t in (("pos_LD", pos_LD), ("mask_token_D", mask_token_D), ("ids_keep_BV", ids_keep_BV),
                    ("ids_mask_BM", ids_mask_BM)):
        if t.device != dev:
            raise ValueError(f"fused_mask_gather: {name} is on {t.device} but emb_BLD is on {dev}")
    if dev.type == "cpu":
        # CPU: the check is a cheap reduction with no device sync, so always do it.
        for name, ids in (("ids_keep_BV", ids_keep_BV), ("ids_mask_BM", ids_mask_BM)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= L):
                raise ValueError(f"fused_mask_gather: {name} has values outside [0, L={L})")
    elif check_ids:
        # Accelerators: asynchronous assert (no host sync; fails at the next sync point).
        for ids in (ids_keep_BV, ids_mask_BM):
            if ids.numel():
                torch._assert_async(((ids >= 0) & (ids < L)).all())


def _out_dtype(emb_BLD, pos_LD, mask_token_D):
    # Mixed precision (e.g. bf16 activations with fp32 parameters) promotes like `emb + pos`.
    return torch.promote_types(torch.promote_types(emb_BLD.dtype, pos_LD.dtype), mask_token_D.dtype)


# --------------------------------------------------------------------------------------
# eager torch reference
# --------------------------------------------------------------------------------------


def _flat_rows(ids_BN: torch.Tensor, L: int) -> torch.Tensor:
    """Row indices into emb viewed as (B*L, D): b * L + ids[b, n], flattened to (B*N,)."""
    B = ids_BN.shape[0]
    offs_B1 = torch.arange(B, device=ids_BN.device, dtype=ids_BN.dtype).unsqueeze(1) * L
    return (ids_BN + offs_B1).reshape(-1)


class _MaskGatherTorch(torch.autograd.Function):
    """Reference: index_select on the (B*L, D) embedding rows and on pos rows only."""

    @staticmethod
    def forward(ctx, emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM):
        B, L, D = emb_BLD.shape
        V, M = ids_keep_BV.shape[1], ids_mask_BM.shape[1]
        dt = _out_dtype(emb_BLD, pos_LD, mask_token_D)
        if emb_BLD.is_contiguous():  # fast path: index_select on the (B*L, D) row view
            emb_rows = emb_BLD.view(B * L, D)
            take = lambda ids: emb_rows.index_select(0, _flat_rows(ids, L))  # noqa: E731
        else:  # e.g. Conv1d output transposed: index the strided view, never copy all of emb
            b_B1 = torch.arange(B, device=emb_BLD.device).unsqueeze(1)
            take = lambda ids: emb_BLD[b_B1, ids].reshape(-1, D)  # noqa: E731
        # index_select returns fresh tensors, so the adds below are in place (no temporaries):
        # the only allocations are the (B*V, D) / (B*M, D) outputs and their pos rows.
        pos_keep = pos_LD.index_select(0, ids_keep_BV.reshape(-1))
        pos_mask = pos_LD.index_select(0, ids_mask_BM.reshape(-1)).to(dt)
        visible = take(ids_keep_BV).to(dt).add_(pos_keep).view(B, V, D)
        del pos_keep
        target_in = take(ids_mask_BM).to(dt).add_(pos_mask).view(B, M, D)
        queries = pos_mask.add_(mask_token_D.reshape(1, D)).view(B, M, D)
        ctx.save_for_backward(ids_keep_BV, ids_mask_BM)
        ctx.meta = (B, L, D, emb_BLD.dtype, pos_LD.dtype, mask_token_D.dtype, mask_token_D.shape)
        ctx.mark_non_differentiable(target_in)
        return visible, target_in, queries

    @staticmethod
    def backward(ctx, g_visible, g_target_in, g_queries):
        del g_target_in  # non-differentiable output (feeds the no-grad target encoder)
        ids_keep_BV, ids_mask_BM = ctx.saved_tensors
        B, L, D, emb_dt, pos_dt, mt_dt, mt_shape = ctx.meta
        need_emb, need_pos, need_mt = ctx.needs_input_grad[:3]
        g_emb = g_pos = g_mt = None
        if g_visible is None:
            g_visible = torch.zeros(B, ids_keep_BV.shape[1], D, device=ids_keep_BV.device, dtype=emb_dt)
        if g_queries is None:
            g_queries = torch.zeros(B, ids_mask_BM.shape[1], D, device=ids_mask_BM.device, dtype=pos_dt)
        gv_rows = g_visible.reshape(-1, D)
        gq_rows = g_queries.reshape(-1, D)
        if need_emb:
            # index_add_ accumulates, so repeated ids in a row are summed (not overwritten).
            g_emb = torch.zeros(B * L, D, device=gv_rows.device, dtype=emb_dt)
            g_emb.index_add_(0, _flat_rows(ids_keep_BV, L), gv_rows.to(emb_dt))
            g_emb = g_emb.view(B, L, D)
        if need_pos:
            # Sum over the batch in fp32 (B terms per position), then cast back.
            acc_dt = torch.promote_types(pos_dt, torch.float32)
            acc = torch.zeros(L, D, device=gv_rows.device, dtype=acc_dt)
            acc.index_add_(0, ids_keep_BV.reshape(-1), gv_rows.to(acc_dt))
            acc.index_add_(0, ids_mask_BM.reshape(-1), gq_rows.to(acc_dt))
            g_pos = acc.to(pos_dt)
        if need_mt:
            acc_dt = torch.promote_types(mt_dt, torch.float32)
            g_mt = gq_rows.to(acc_dt).sum(0).to(mt_dt).reshape(mt_shape)
        return g_emb, g_pos, g_mt, None, None


def mask_gather_reference(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM):
    """Eager torch reference (autograd.Function with explicit backward); no validation."""
    return _MaskGatherTorch.apply(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM)


# --------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------


def triton_available() -> bool:
    """True when ``import triton`` works (it may still need TRITON_INTERPRET=1 on CPU)."""
    return triton is not None


def _interpret_enabled() -> bool:
    """Triton's own reading of TRITON_INTERPRET (the same one `triton.jit` uses)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # pragma: no cover - older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Kernel bodies are plain functions; `_kernels()` wraps them with `triton.jit` on first use
# (see the module docstring for why: TRITON_INTERPRET is read at wrap time).
# Rows: programs [0, n_keep_blocks) handle BLOCK_R rows of the flattened (B*V) visible rows,
# the rest handle the flattened (B*M) masked rows; axis 1 tiles D by BLOCK_D (masked, so any
# D works). Offsets are int64 (B*L*D can exceed 2**31 at large shapes). A name bound in both
# branches of `if pid < n_keep_blocks` must have one type there (compiled Triton checks it).


def _mask_gather_fwd_kernel(
    emb_ptr, pos_ptr, mt_ptr, keep_ptr, mask_ptr, vis_ptr, tgt_ptr, q_ptr,
    D, V, M, n_keep_rows, n_mask_rows, n_keep_blocks,
    s_eb, s_el, s_ed, s_pl, s_pd, s_md,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    if pid < n_keep_blocks:
        rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < n_keep_rows
        m2 = rmask[:, None] & cmask[None, :]
        idx = tl.load(keep_ptr + rows, mask=rmask, other=0)
        b = rows // V
        e = tl.load(emb_ptr + b[:, None] * s_eb + idx[:, None] * s_el + cols64[None, :] * s_ed, mask=m2, other=0.0)
        p = tl.load(pos_ptr + idx[:, None] * s_pl + cols64[None, :] * s_pd, mask=m2, other=0.0).to(tl.float32)
        out = e.to(tl.float32) + p
        tl.store(vis_ptr + rows[:, None] * D + cols64[None, :], out.to(vis_ptr.dtype.element_ty), mask=m2)
    else:
        rows = ((pid - n_keep_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < n_mask_rows
        m2 = rmask[:, None] & cmask[None, :]
        idx = tl.load(mask_ptr + rows, mask=rmask, other=0)
        b = rows // M
        e = tl.load(emb_ptr + b[:, None] * s_eb + idx[:, None] * s_el + cols64[None, :] * s_ed, mask=m2, other=0.0)
        p = tl.load(pos_ptr + idx[:, None] * s_pl + cols64[None, :] * s_pd, mask=m2, other=0.0).to(tl.float32)
        t = tl.load(mt_ptr + cols64 * s_md, mask=cmask, other=0.0).to(tl.float32)
        out_t = e.to(tl.float32) + p
        out_q = t[None, :] + p
        tl.store(tgt_ptr + rows[:, None] * D + cols64[None, :], out_t.to(tgt_ptr.dtype.element_ty), mask=m2)
        tl.store(q_ptr + rows[:, None] * D + cols64[None, :], out_q.to(q_ptr.dtype.element_ty), mask=m2)


def _mask_gather_bwd_kernel(
    gv_ptr, gq_ptr, keep_ptr, mask_ptr, gemb_ptr, gpos_ptr, gmt_ptr,
    L, D, V, M, n_keep_rows, n_mask_rows, n_keep_blocks,
    HAS_EMB: tl.constexpr, HAS_POS: tl.constexpr, HAS_MT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # gemb/gpos/gmt are fp32 accumulators; atomic adds make repeated ids (and the batch
    # reduction into pos) safe. The mask-token sum is reduced per tile before its atomic.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    if pid < n_keep_blocks:
        rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < n_keep_rows
        m2 = rmask[:, None] & cmask[None, :]
        idx = tl.load(keep_ptr + rows, mask=rmask, other=0)
        g = tl.load(gv_ptr + rows[:, None] * D + cols64[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_EMB:
            b = rows // V
            tl.atomic_add(gemb_ptr + (b[:, None] * L + idx[:, None]) * D + cols64[None, :], g, mask=m2)
        if HAS_POS:
            tl.atomic_add(gpos_ptr + idx[:, None] * D + cols64[None, :], g, mask=m2)
    else:
        rows = ((pid - n_keep_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < n_mask_rows
        m2 = rmask[:, None] & cmask[None, :]
        idx = tl.load(mask_ptr + rows, mask=rmask, other=0)
        g = tl.load(gq_ptr + rows[:, None] * D + cols64[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_POS:
            tl.atomic_add(gpos_ptr + idx[:, None] * D + cols64[None, :], g, mask=m2)
        if HAS_MT:
            # tl.reduce with the stdlib combine == tl.sum, but tl.sum itself is a @jit function
            # wrapped at `import triton` time (interpreter or not); tl.reduce is a builtin the
            # interpreter patches per call, so this works whatever TRITON_INTERPRET was then.
            tl.atomic_add(gmt_ptr + cols64, tl.reduce(g, 0, tl.standard._sum_combine), mask=cmask)


_KERNELS: dict = {}


def _kernels(interpret: bool):
    """(fwd, bwd) jitted for the current mode, created on first use and cached per mode."""
    if interpret not in _KERNELS:
        _KERNELS[interpret] = tuple(triton.jit(f) for f in (_mask_gather_fwd_kernel, _mask_gather_bwd_kernel))
    return _KERNELS[interpret]


def _launch_config(D: int, interpret: bool):
    if interpret:
        # The interpreter runs programs one by one in Python: few, large tiles are fastest.
        return 64, triton.next_power_of_2(D)
    return 16, min(triton.next_power_of_2(D), 128)


def _check_triton_usable(device: torch.device) -> bool:
    """Return the interpreter flag for this call, or raise a clear error."""
    if not triton_available():
        raise ValueError("fused_mask_gather: backend='triton' needs the `triton` package (pip install triton)")
    interpret = _interpret_enabled()
    if device.type == "cpu" and not interpret:
        raise ValueError(
            "fused_mask_gather: backend='triton' on CPU tensors needs Triton's interpreter; set "
            "TRITON_INTERPRET=1 in the environment (before the first triton call) or use backend='torch'"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fused_mask_gather: backend='triton' supports CUDA (or CPU when interpreted), got {device}")
    return interpret


class _MaskGatherTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM):
        interpret = _check_triton_usable(emb_BLD.device)
        fwd, _ = _kernels(interpret)
        B, L, D = emb_BLD.shape
        V, M = ids_keep_BV.shape[1], ids_mask_BM.shape[1]
        dt = _out_dtype(emb_BLD, pos_LD, mask_token_D)
        keep = ids_keep_BV.contiguous()
        mask = ids_mask_BM.contiguous()
        mt = mask_token_D.reshape(D)
        visible = torch.empty(B, V, D, device=emb_BLD.device, dtype=dt)
        target_in = torch.empty(B, M, D, device=emb_BLD.device, dtype=dt)
        queries = torch.empty(B, M, D, device=emb_BLD.device, dtype=dt)
        BLOCK_R, BLOCK_D = _launch_config(D, interpret)
        n_keep_blocks = (B * V + BLOCK_R - 1) // BLOCK_R
        n_mask_blocks = (B * M + BLOCK_R - 1) // BLOCK_R
        grid = (n_keep_blocks + n_mask_blocks, (D + BLOCK_D - 1) // BLOCK_D)
        if grid[0] > 0 and D > 0:
            fwd[grid](
                emb_BLD, pos_LD, mt, keep, mask, visible, target_in, queries,
                D, V, M, B * V, B * M, n_keep_blocks,
                emb_BLD.stride(0), emb_BLD.stride(1), emb_BLD.stride(2),
                pos_LD.stride(0), pos_LD.stride(1), mt.stride(0),
                BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            )
        ctx.save_for_backward(keep, mask)
        ctx.meta = (B, L, D, emb_BLD.dtype, pos_LD.dtype, mask_token_D.dtype, mask_token_D.shape, interpret)
        ctx.mark_non_differentiable(target_in)
        return visible, target_in, queries

    @staticmethod
    def backward(ctx, g_visible, g_target_in, g_queries):
        del g_target_in  # non-differentiable output
        keep, mask = ctx.saved_tensors
        B, L, D, emb_dt, pos_dt, mt_dt, mt_shape, interpret = ctx.meta
        need_emb, need_pos, need_mt = ctx.needs_input_grad[:3]
        V, M = keep.shape[1], mask.shape[1]
        dev = keep.device
        f32 = torch.float32
        if g_visible is None:
            g_visible = torch.zeros(B, V, D, device=dev, dtype=f32)
        if g_queries is None:
            g_queries = torch.zeros(B, M, D, device=dev, dtype=f32)
        g_visible = g_visible.contiguous()
        g_queries = g_queries.contiguous()
        # fp32 accumulators; for fp32 inputs these are returned as-is (no extra copy).
        g_emb = torch.zeros(B, L, D, device=dev, dtype=f32) if need_emb else None
        g_pos = torch.zeros(L, D, device=dev, dtype=f32) if need_pos else None
        g_mt = torch.zeros(D, device=dev, dtype=f32) if need_mt else None
        _, bwd = _kernels(interpret)
        BLOCK_R, BLOCK_D = _launch_config(D, interpret)
        # Visible rows matter only for emb/pos; masked rows only for pos/mask token.
        n_keep_blocks = (B * V + BLOCK_R - 1) // BLOCK_R if (need_emb or need_pos) else 0
        n_mask_blocks = (B * M + BLOCK_R - 1) // BLOCK_R if (need_pos or need_mt) else 0
        grid = (n_keep_blocks + n_mask_blocks, (D + BLOCK_D - 1) // BLOCK_D)
        if grid[0] > 0 and D > 0:
            dummy = g_visible  # never dereferenced when the matching HAS_* flag is False
            bwd[grid](
                g_visible, g_queries, keep, mask,
                g_emb if need_emb else dummy, g_pos if need_pos else dummy, g_mt if need_mt else dummy,
                L, D, V, M, B * V, B * M, n_keep_blocks,
                HAS_EMB=bool(need_emb), HAS_POS=bool(need_pos), HAS_MT=bool(need_mt),
                BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            )
        return (
            g_emb.to(emb_dt) if need_emb else None,
            g_pos.to(pos_dt) if need_pos else None,
            g_mt.to(mt_dt).reshape(mt_shape) if need_mt else None,
            None,
            None,
        )


def _mask_gather_triton(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM):
    return _MaskGatherTriton.apply(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM)


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------


def fused_mask_gather(
    emb_BLD: torch.Tensor,
    pos_LD: torch.Tensor,
    mask_token_D: torch.Tensor,
    ids_keep_BV: torch.Tensor,
    ids_mask_BM: torch.Tensor,
    backend: Optional[str] = None,
    check_ids: bool = False,
):
    """Return ``(visible_BVD, target_in_BMD, queries_BMD)``; see the module docstring.

    ``backend``: ``None`` (triton on CUDA if importable, else torch), ``"torch"`` or
    ``"triton"``. ``check_ids``: range-check ids on accelerators too (async, no host sync).
    ``target_in_BMD`` is non-differentiable (``requires_grad`` False).
    """
    _validate(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM, check_ids)
    if backend is None:
        backend = "triton" if emb_BLD.is_cuda and triton_available() else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"fused_mask_gather: backend must be one of {_BACKENDS} or None, got {backend!r}")
    if backend == "torch":
        return _MaskGatherTorch.apply(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM)
    return _mask_gather_triton(emb_BLD, pos_LD, mask_token_D, ids_keep_BV, ids_mask_BM)
