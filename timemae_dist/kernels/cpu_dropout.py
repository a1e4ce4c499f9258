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

Built once with the system C compiler into the cache directory of
:mod:`timemae_dist.mkl_avx512` (file name keyed by the source's hash, written atomically).
``TIMEMAE_CPU_DROPOUT=auto`` (default) uses it where it builds and falls back to the eager
mask (with one warning) where it does not; ``on`` raises instead of falling back; ``off``
always uses the eager mask. Only float32 CPU tensors take this path; others use the eager
mask.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

__all__ = [
    "CpuDropoutError", "MODES", "mode", "effective_mode", "available", "describe", "keep_mask_f32",
    "library_path", "build", "env_restored",
]

MODES = ("auto", "on", "off")
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

_LOCK = threading.Lock()
_FN: Optional[Callable] = None
_TRIED = False
_WHY: str = ""


class CpuDropoutError(RuntimeError):
    """The C dropout-mask kernel was required (``TIMEMAE_CPU_DROPOUT=on``) and is unavailable."""


def mode() -> str:
    m = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise CpuDropoutError(f"{_ENV}={m!r} is not one of {'|'.join(MODES)}")
    return m


def effective_mode(configured: str) -> str:
    """The mode a run uses: ``$TIMEMAE_CPU_DROPOUT`` where set, else ``configured``
    (``trainer.cpu_dropout``). Raises :class:`CpuDropoutError` naming a bad value."""
    if os.environ.get(_ENV, "").strip():
        return mode()
    m = str(configured).strip().lower()
    if m not in MODES:
        raise CpuDropoutError(f"trainer.cpu_dropout={configured!r} is not one of {'|'.join(MODES)}")
    return m


def describe() -> str:
    """One line for logs: which dropout-mask path this process runs, and why."""
    m = mode()
    if m == "off":
        return f"dropout masks: eager torch ops ({_ENV}=off)"
    if available():
        return f"dropout masks: C kernel ({library_path().name}, {_ENV}={m})"
    return f"dropout masks: eager torch ops (C kernel unavailable: {_WHY})"


@contextlib.contextmanager
def env_restored() -> Iterator[None]:
    """``$TIMEMAE_CPU_DROPOUT`` as it was on entry, again on exit (set or unset): for code that
    switches the mode for one run or one measurement."""
    saved = os.environ.get(_ENV)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = saved


def library_path() -> Path:
    from timemae_dist.mkl_avx512 import cache_dir

    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    return cache_dir() / f"libtimemae_dropout-{digest}.so"


def build() -> Path:
    """Build the kernel library once (atomically: a half-written file is never left in place)."""
    from timemae_dist.mkl_avx512 import _compiler

    out = library_path()
    if out.is_file():
        return out
    cc = _compiler()
    if cc is None:
        raise CpuDropoutError(
            f"cpu_dropout: no C compiler (cc/gcc/clang, or $CC) to build {out.name}; "
            f"install one (e.g. `apt-get install gcc`) or set {_ENV}=off"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "dropout.c"
        src.write_text(_SOURCE)
        lib = Path(tmp) / out.name
        proc = subprocess.run(
            [*cc.split(), "-shared", "-fPIC", "-O3", "-o", str(lib), str(src)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0 or not lib.is_file():
            raise CpuDropoutError(
                f"cpu_dropout: building {out} with {cc!r} failed ({proc.stderr.strip()[-300:]}); "
                f"fix the compiler or set {_ENV}=off"
            )
        os.replace(lib, out)
    return out


def _load() -> Optional[Callable]:
    global _FN, _TRIED, _WHY
    with _LOCK:
        if _TRIED:
            return _FN
        _TRIED = True
        try:
            lib = ctypes.CDLL(str(build()))
            fn = lib.timemae_keep_mask_f32
        except (CpuDropoutError, OSError, AttributeError) as e:
            _WHY = str(e)
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32, ctypes.c_float]
        fn.restype = None
        _FN = fn
        return _FN


def available(m: Optional[str] = None) -> bool:
    """Whether the kernel is in use under mode ``m`` (default: the current ``TIMEMAE_CPU_DROPOUT``);
    builds it if needed. Under ``on`` an unavailable kernel raises :class:`CpuDropoutError`."""
    m = mode() if m is None else m
    if m == "off":
        return False
    fn = _load()
    if fn is None and m == "on":
        raise CpuDropoutError(f"{_ENV}=on but the C dropout kernel is unavailable: {_WHY}")
    return fn is not None


_WARNED = False


def keep_mask_f32(like: torch.Tensor, thr: int, scale: float) -> Optional[torch.Tensor]:
    """The mask for a float32 CPU tensor ``like``, or None where the eager path must be used."""
    global _WARNED
    fn = _FN
    if fn is None or os.environ.get(_ENV):
        if not available():
            if not _WARNED and _WHY and mode() == "auto":
                _WARNED = True
                warnings.warn(f"cpu_dropout: using the eager dropout mask ({_WHY})", RuntimeWarning, stacklevel=3)
            return None
        fn = _FN
    out = torch.empty(like.shape, dtype=torch.float32)
    seed = torch.empty(1, dtype=torch.int64).random_()
    fn(out.data_ptr(), out.numel(), seed.data_ptr(), int(thr), float(scale))
    return out
