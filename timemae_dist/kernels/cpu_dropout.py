"""Dropout masks on CPU in one pass of C: a counter-based generator instead of ``random_`` + 4 ops.

The eager mask of :func:`timemae_dist.model.layers.keep_mask` costs ~90-115 us for a
(1152, 64) float32 tensor on this 2-core CPU, four fifths of it in ``random_()`` (torch's
mt19937, serial) and the rest in four element-wise ops. This kernel writes the finished mask
(``scale`` where kept, 0 elsewhere) in one loop: ~12 us for the same tensor.

Generator: SplitMix64 (Steele, Lea & Flood, 2014; the generator Java's ``SplittableRandom``
uses and the one xoshiro's authors recommend for seeding), evaluated at counters
``seed + (g + 1) * 0x9E3779B97F4A7C15`` for 64-bit group ``g``; each 64-bit output gives
four 15-bit uniforms (its four 16-bit pieces, top bit cleared), compared with
``keep_threshold(p)`` exactly as the eager path does, so the keep probability and the
scale are identical; only the random stream differs. ``seed`` is one ``random_()`` draw of
torch's default CPU generator per mask, so ``torch.manual_seed`` and the RNG state saved in
checkpoints determine the masks (resume and the ZeRO-stage parity tests rely on this).
Counter-based, so the loop has no carried state and the compiler vectorises it;
``target_clones`` picks AVX-512 / AVX2 / baseline code at load time.

Built and switched as :mod:`timemae_dist.kernels.ckernel` describes:
``TIMEMAE_CPU_DROPOUT=auto`` (default) uses it where it builds and falls back to the eager
mask (with one warning) where it does not; ``on`` raises instead of falling back; ``off``
always uses the eager mask. Only float32 CPU tensors take this path; others use the eager
mask.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from timemae_dist.kernels.ckernel import MODES, CKernel, CKernelError, env_restored  # noqa: F401 (re-exported)

__all__ = [
    "CpuDropoutError", "KERNEL", "MODES", "mode", "effective_mode", "available", "describe", "keep_mask_f32",
    "library_path", "build", "env_restored",
]

_ENV = "TIMEMAE_CPU_DROPOUT"

_SOURCE = r"""
#include <stdint.h>
#define GOLDEN 0x9E3779B97F4A7C15ull

static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* out[i] = scale if uniform15(i) < thr else 0, for i in [0, n); seed read from *seed_ptr. */
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void timemae_keep_mask_f32(float *out, int64_t n, const int64_t *seed_ptr, int32_t thr, float scale) {
    const uint64_t seed = (uint64_t)seed_ptr[0];
    const int64_t groups = n / 4;
    for (int64_t g = 0; g < groups; ++g) {
        const uint64_t z = splitmix64(seed + (uint64_t)(g + 1) * GOLDEN);
        for (int j = 0; j < 4; ++j) {
            const int32_t u = (int32_t)((z >> (16 * j)) & 0x7fff);
            out[4 * g + j] = u < thr ? scale : 0.0f;
        }
    }
    if (groups * 4 < n) {
        const uint64_t z = splitmix64(seed + (uint64_t)(groups + 1) * GOLDEN);
        for (int64_t i = groups * 4; i < n; ++i) {
            const int32_t u = (int32_t)((z >> (16 * (i - groups * 4))) & 0x7fff);
            out[i] = u < thr ? scale : 0.0f;
        }
    }
}
"""

def _setup(lib) -> None:
    fn = lib.timemae_keep_mask_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32, ctypes.c_float]
    fn.restype = None


class CpuDropoutError(CKernelError):
    """The C dropout-mask kernel was required (``TIMEMAE_CPU_DROPOUT=on``) and is unavailable."""


KERNEL = CKernel("dropout", _ENV, _SOURCE, "C dropout", setup=_setup, error=CpuDropoutError)


def mode() -> str:
    return KERNEL.mode()


def effective_mode(configured: str) -> str:
    """The mode a run uses: ``$TIMEMAE_CPU_DROPOUT`` where set, else ``configured``
    (``trainer.cpu_dropout``). Raises :class:`CpuDropoutError` naming a bad value."""
    return KERNEL.effective_mode(configured, "trainer.cpu_dropout")


def describe() -> str:
    """One line for logs: which dropout-mask path this process runs, and why."""
    return KERNEL.describe("dropout masks", "eager torch ops")


def library_path() -> Path:
    return KERNEL.library_path()


def build() -> Path:
    """Build the kernel library once (atomically: a half-written file is never left in place)."""
    return KERNEL.build()


def available(m: Optional[str] = None) -> bool:
    """Whether the kernel is in use under mode ``m`` (default: the current ``TIMEMAE_CPU_DROPOUT``);
    builds it if needed. Under ``on`` an unavailable kernel raises :class:`CpuDropoutError`."""
    return KERNEL.available(m)


def keep_mask_f32(like: torch.Tensor, thr: int, scale: float) -> Optional[torch.Tensor]:
    """The mask for a float32 CPU tensor ``like``, or None where the eager path must be used."""
    if not KERNEL.usable("the eager dropout mask"):
        return None
    out = torch.empty(like.shape, dtype=torch.float32)
    seed = torch.empty(1, dtype=torch.int64).random_()
    KERNEL.lib.timemae_keep_mask_f32(out.data_ptr(), out.numel(), seed.data_ptr(), int(thr), float(scale))
    return out
