"""Flat parameters: a module's parameters as views of one buffer, stepped as one tensor.

The official-size TimeMAE has 222 parameter tensors (618k floats). On CPU torch's fused AdamW,
the foreach norm and clip and the foreach EMA loop over them tensor by tensor (a few
microseconds of dispatch each): about 4.5 ms of a 55 ms step, for 2.5 MB of arithmetic. With
every parameter a view of one contiguous buffer and the optimizer given that buffer as its one
parameter, each of those is one kernel over 618k elements (AdamW 1.7 -> 0.3 ms, clip 0.8 ->
0.15 ms plus the 0.4 ms copy of the gradients into the buffer, EMA 0.7 -> 0.05 ms; see
``benchmarks/bench_step_ab.py --ab flat``).

The module keeps its own ``Parameter`` objects (their ``.data`` are views, so ``state_dict``,
``load_state_dict``, DeepSpeed's broadcast and all-reduce work on them unchanged), and autograd
still accumulates one ``.grad`` per parameter. Before the optimizer step
:meth:`FlatParameters.gather_grads` copies them into one flat gradient (``torch.cat``), frees
the per-parameter ones and hands the flat one to the flat parameter; after the step it is
dropped (:meth:`FlatParameters.release_grad`), so between steps the model holds no more
gradient memory than before. A parameter without a gradient in a step counts as a zero
gradient (weight decay still applies to it), as in DeepSpeed's ZeRO-1/2 flat partitions.

This is for ZeRO-0 fp32 and the single-process engine; ZeRO-1/2/3 flatten into their own
partitions. :func:`flat_view` finds parameters that already lie back to back in one buffer
(the EMA uses it for the target and online encoders).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["FlatParameters", "flat_view"]


class FlatParameters:
    """Re-home ``params`` (same dtype and device, no duplicates) as consecutive views of one
    1-D buffer, in the given order, keeping their values. ``param`` is that buffer as one
    ``nn.Parameter``: give the optimizer ``[flat.param]`` instead of the module's parameters."""

    def __init__(self, params: Sequence[torch.Tensor]):
        params = list(params)
        if not params:
            raise ValueError("FlatParameters: no parameters to flatten")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("FlatParameters: a parameter is listed twice (tied weights); list each once")
        dtype, device = params[0].dtype, params[0].device
        for i, p in enumerate(params):
            if p.dtype != dtype or p.device != device:
                raise ValueError(
                    f"FlatParameters: parameter {i} is {p.dtype} on {p.device}, parameter 0 is {dtype} on "
                    f"{device}; flatten one dtype/device at a time"
                )
        total = sum(p.numel() for p in params)
        flat = torch.empty(total, dtype=dtype, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                view = flat[offset : offset + n].view_as(p)
                view.copy_(p.detach())
                p.data = view
                offset += n
        self.params = params
        self.numel = total
        self.param = nn.Parameter(flat, requires_grad=any(p.requires_grad for p in params))

    def is_intact(self) -> bool:
        """True while every parameter is still its view of the buffer (``module.to()`` to another
        device or dtype, or a ``.data`` assignment, would silently break the aliasing)."""
        return flat_view(self.params) is not None and self.params[0].data_ptr() == self.param.data_ptr()

    def gather_grads(self) -> torch.Tensor:
        """The parameters' gradients as one flat tensor, set as ``param.grad``; the per-parameter
        ``.grad`` are freed (the flat one replaces them until :meth:`release_grad`)."""
        grads = []
        for p in self.params:
            g = p.grad
            grads.append(torch.zeros_like(p).view(-1) if g is None else g.reshape(-1))
        flat_grad = torch.cat(grads)
        for p in self.params:
            p.grad = None
        self.param.grad = flat_grad
        return flat_grad

    def release_grad(self) -> None:
        self.param.grad = None


def flat_view(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """One 1-D view spanning ``tensors`` when they are contiguous, of one dtype and device, and lie
    back to back in that order in one storage (as :class:`FlatParameters` leaves them); else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    size = first.element_size()
    for t in tensors:
        if (
            t.dtype != first.dtype
            or t.device != first.device
            or not t.is_contiguous()
            or t.data_ptr() != expected
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        expected += t.numel() * size
    total = (expected - first.data_ptr()) // size
    return first.detach().as_strided((total,), (1,))
