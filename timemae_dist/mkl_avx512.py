"""oneMKL's AVX-512 GEMM kernels on AMD CPUs (Zen 4 / Zen 5) for fp32 training on CPU.

PyTorch's x86 wheels link Intel oneMKL statically and run every fp32 GEMM on CPU through it
(``Linear``, ``matmul``, ``bmm``, ``addmm`` and their backward). oneMKL picks its kernels by CPU
*vendor*: on an AMD CPU it takes its AVX2 path even where the CPU has AVX-512. On the project's
reference machine (2 AMD EPYC Zen 5 vCPUs) one core runs fp32 GEMM at ~85-95 GFLOP/s through that
path and at ~165-210 GFLOP/s through the AVX-512 one (``benchmarks/bench_gemm.py``), and TimeMAE
pretraining at the official size runs about twice as fast (README, ``benchmarks/bench_pretrain.py``).

oneMKL asks its internal ``mkl_serv_intel_cpu_true()`` whether the CPU is an Intel one. A two-line
shared library that answers 1, preloaded into a process (``LD_PRELOAD``), makes it dispatch on the
instruction sets the CPU reports instead; the kernels are Intel's AVX-512 ones, run on a CPU that
has every instruction they use (the override is only applied where ``/proc/cpuinfo`` lists
AVX-512 F/CD/BW/DQ/VL). Results differ from the AVX2 path's in the last bits (another blocking of
the sums), as between any two BLAS builds; ``tests/timemae_dist/test_mkl_avx512.py`` checks GEMMs
and a training step against the AVX2 path. This relies on a symbol oneMKL does not document: a
PyTorch whose MKL no longer exports it, or binds it internally, is detected (the dispatch code
MKL reports does not change) and reported, never silently assumed faster.

Only a process started with the library preloaded is affected, so it is applied where processes
start: the Ray Train workers (``RunConfig.worker_runtime_env``; this covers ``ray job submit``
too), and ``timemae`` commands that compute in-process (the CLI re-executes itself once with the
variable set). Modes, ``trainer.mkl_avx512`` for pretraining or ``TIMEMAE_MKL_AVX512`` for the CLI:
``auto`` (default: apply where it helps - x86-64 Linux, AMD CPU with AVX-512, PyTorch with MKL -
and a C compiler is there to build the 1 KB library), ``on`` (same, but a clear error where it
cannot be applied), ``off``. The library is built once per source version into
``$TIMEMAE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/timemae-dist`` or ``~/.cache/timemae-dist``);
on a multi-node cluster without a shared home, build it on each node with
``python -m timemae_dist.mkl_avx512 --build`` (a worker whose node lacks it says so in its log).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

__all__ = [
    "MODES",
    "reexec_to_match",
    "MklAvx512Error",
    "Support",
    "support",
    "shim_path",
    "build_shim",
    "worker_env",
    "preload_env",
    "reexec_with_preload",
    "status",
    "describe",
]

MODES = ("auto", "on", "off")
ENV_MODE = "TIMEMAE_MKL_AVX512"
_REQUIRED_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
_MARKER = "timemae_mkl_avx512_shim"
_SOURCE = f"""\
/* timemae-dist: make oneMKL dispatch on the CPU's instruction sets, not its vendor.
   See timemae_dist/mkl_avx512.py. */
int mkl_serv_intel_cpu_true(void) {{ return 1; }}
int {_MARKER}(void) {{ return 1; }}
"""
_LIB_NAME = f"libtimemae_mkl_avx512-{hashlib.sha256(_SOURCE.encode()).hexdigest()[:10]}.so"


class MklAvx512Error(RuntimeError):
    """``mkl_avx512=on`` where the override cannot be applied; the message names the fix."""


@dataclass(frozen=True)
class Support:
    """Whether the override applies to this machine and PyTorch, and why not."""

    applies: bool
    reason: str


def _cpuinfo() -> tuple[str, set[str]]:
    """The first CPU's vendor and flags (``""`` / empty where /proc/cpuinfo cannot be read)."""
    from timemae_dist.hostinfo import cpuinfo_fields

    info = cpuinfo_fields()
    return info.get("vendor_id", ""), set(info.get("flags", "").split())


def _libtorch_cpu() -> Optional[Path]:
    tdir = _torch_dir()
    lib = tdir / "lib" / "libtorch_cpu.so" if tdir is not None else None
    return lib if lib is not None and lib.is_file() else None


def _torch_dir() -> Optional[Path]:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def support(deep: bool = True) -> Support:
    """Does this machine + PyTorch run fp32 GEMM through MKL's AVX2 path on an AVX-512 AMD CPU?

    ``deep=False`` skips what needs ``import torch`` (MKL build, exported symbol): the CLI asks
    before it imports anything heavy, and the process it re-executes checks the rest.
    """
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return Support(False, f"not x86-64 Linux ({sys.platform} {platform.machine()})")
    vendor, flags = _cpuinfo()
    if vendor != "AuthenticAMD":
        return Support(False, f"CPU vendor {vendor or 'unknown'} (oneMKL already dispatches by ISA on Intel)")
    missing = [f for f in _REQUIRED_FLAGS if f not in flags]
    if missing:
        return Support(False, f"AMD CPU without {', '.join(missing)} (MKL's AVX2 path is the right one)")
    lib = _libtorch_cpu()
    if lib is None:
        return Support(False, "no PyTorch with libtorch_cpu.so found")
    if not deep:
        return Support(True, "AMD CPU with AVX-512 (PyTorch's MKL not checked yet)")
    import torch

    if not torch.backends.mkl.is_available():
        return Support(False, "this PyTorch is not built with MKL")
    try:
        ctypes.CDLL(str(lib)).mkl_serv_intel_cpu_true  # noqa: B018 - probe the exported symbol
    except (OSError, AttributeError):
        return Support(False, "this PyTorch's MKL does not export mkl_serv_intel_cpu_true")
    return Support(True, "AMD CPU with AVX-512, PyTorch with MKL")


def cache_dir() -> Path:
    if os.environ.get("TIMEMAE_CACHE_DIR"):
        return Path(os.environ["TIMEMAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "timemae-dist"


def shim_path() -> Path:
    """Where the preload library lives (it may not be built yet)."""
    return cache_dir() / _LIB_NAME


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc.split()[0]):
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def build_shim() -> Path:
    """Build the preload library once (atomically: a half-written file is never left in place)."""
    out = shim_path()
    if out.is_file():
        return out
    cc = _compiler()
    if cc is None:
        raise MklAvx512Error(
            "mkl_avx512: no C compiler (cc/gcc/clang, or $CC) to build the 1 KB preload library; "
            "install one (e.g. `apt-get install gcc`) or set trainer.mkl_avx512=off / TIMEMAE_MKL_AVX512=off"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "shim.c"
        src.write_text(_SOURCE)
        lib = Path(tmp) / out.name
        proc = subprocess.run(
            [*cc.split(), "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0 or not lib.is_file():
            raise MklAvx512Error(
                f"mkl_avx512: building {out} with {cc!r} failed ({proc.stderr.strip()[-300:]}); "
                "fix the compiler or set trainer.mkl_avx512=off / TIMEMAE_MKL_AVX512=off"
            )
        os.replace(lib, out)
    return out


def _check_mode(mode: str, name: str = "mkl_avx512") -> str:
    if mode not in MODES:
        raise MklAvx512Error(f"{name}: {mode!r} is not one of {'|'.join(MODES)}")
    return mode


def worker_env(mode: str, deep: bool = True) -> tuple[dict[str, str], str]:
    """Environment variables that make a new process use MKL's AVX-512 path, and a one-line note.

    ``auto``: ``{}`` with the reason where it does not apply or cannot be built; ``on``: raises
    :class:`MklAvx512Error` instead; ``off``: ``{}``.
    """
    if _check_mode(mode) == "off":
        return {}, "fp32 GEMM: oneMKL default dispatch (mkl_avx512=off)"
    sup = support(deep)
    if not sup.applies:
        if mode == "on":
            raise MklAvx512Error(f"mkl_avx512=on, but it does not apply here: {sup.reason}; use auto or off")
        return {}, f"fp32 GEMM: oneMKL default dispatch ({sup.reason})"
    try:
        lib = build_shim()
    except MklAvx512Error as e:
        if mode == "on":
            raise
        return {}, f"fp32 GEMM: oneMKL AVX2 path on this AMD CPU ({e})"
    parts = _preload_parts()
    if str(lib) not in parts:
        parts.insert(0, str(lib))
    return {"LD_PRELOAD": " ".join(parts)}, f"fp32 GEMM: oneMKL AVX-512 path on this AMD CPU ({lib.name} preloaded)"


def preload_without_shim() -> str:
    """``$LD_PRELOAD`` with the shim taken out (for processes that must run without it)."""
    lib = str(shim_path())
    return " ".join(p for p in _preload_parts() if p != lib)


def _preload_parts() -> list[str]:
    """``$LD_PRELOAD``'s entries (the loader accepts spaces and colons between them)."""
    return os.environ.get("LD_PRELOAD", "").replace(":", " ").split()


def preload_env(mode: str, deep: bool = True) -> Optional[dict[str, str]]:
    """The full environment to re-execute this process with, or None if nothing would change."""
    if shim_loaded():
        return None
    extra, _note = worker_env(mode, deep)
    if not extra or os.environ.get("LD_PRELOAD") == extra["LD_PRELOAD"]:
        return None
    return {**os.environ, **extra}


_REEXEC_GUARD = "TIMEMAE_MKL_AVX512_REEXEC"


def reexec_with_preload() -> None:
    """Re-execute this command once with the preload library (``$TIMEMAE_MKL_AVX512``, default auto).

    Returns (does nothing) where it does not apply, is already loaded, was already tried, or cannot
    be built in auto mode; raises :class:`MklAvx512Error` for ``on`` where it cannot be applied.
    Call it first thing, before threads or files are opened: ``os.execve`` replaces the process.
    """
    mode = os.environ.get(ENV_MODE, "auto")
    if os.environ.get(_REEXEC_GUARD) or mode == "off":
        return
    env = preload_env(_check_mode(mode, ENV_MODE), deep=False)
    if env is None:
        return
    env[_REEXEC_GUARD] = "1"
    _reexec(env)


def _reexec(env: dict[str, str]) -> None:
    """Replace this process by the same command line with ``env`` (output flushed first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


_MATCH_GUARD = "TIMEMAE_MKL_AVX512_MATCHED"


def reexec_to_match(config_mode: str) -> None:
    """Make this process's GEMM path match a mode, re-executing it once where it does not.

    For a process that trains itself (``--single-process``): ``$TIMEMAE_MKL_AVX512`` where set,
    else ``config_mode`` (``trainer.mkl_avx512``). ``auto``/``on`` and the library not loaded:
    re-execute with it preloaded (``auto`` goes on without it where it cannot be applied; ``on``
    raises :class:`MklAvx512Error`); ``off`` and loaded (``timemae`` preloads it by default):
    re-execute without it. Once per command (``$TIMEMAE_MKL_AVX512_MATCHED``); the new process
    gets the chosen mode in ``$TIMEMAE_MKL_AVX512``.
    """
    env_mode = os.environ.get(ENV_MODE)
    mode = _check_mode(env_mode, ENV_MODE) if env_mode else _check_mode(config_mode, "trainer.mkl_avx512")
    if os.environ.get(_MATCH_GUARD):
        return
    loaded = shim_loaded()
    if mode == "off":
        if not loaded:
            return
        rest = preload_without_shim()
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if rest:
            env["LD_PRELOAD"] = rest
    else:
        if loaded:
            return
        env = preload_env(mode)
        if env is None:
            return
    env[ENV_MODE] = mode
    env[_MATCH_GUARD] = "1"
    _reexec(env)


def shim_loaded() -> bool:
    """Is the preload library mapped into this process (global symbol scope)?"""
    try:
        getattr(ctypes.CDLL(None), _MARKER)
    except AttributeError:
        return False
    return True


def mkl_cpu_code() -> Optional[int]:
    """The CPU code oneMKL dispatches its kernels on (0 = its generic/AVX2 path on AMD)."""
    lib = _libtorch_cpu()
    if lib is None:
        return None
    try:
        fn = ctypes.CDLL(str(lib)).mkl_serv_cpu_detect
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return int(fn())


def status() -> dict:
    """This process's state: does the override apply, is it loaded, which MKL code path runs."""
    sup = support()
    loaded = shim_loaded()
    return {**asdict(sup), "loaded": loaded, "mkl_cpu_code": mkl_cpu_code()}


def describe(s: Optional[dict] = None) -> str:
    """One line for a worker's log: which GEMM path this process runs (``s``: a :func:`status`)."""
    s = status() if s is None else s
    if s["loaded"]:
        if not s["mkl_cpu_code"]:
            return (
                f"fp32 GEMM: the AMD override is loaded but oneMKL still reports CPU code {s['mkl_cpu_code']} "
                "(this PyTorch's MKL ignores it; set trainer.mkl_avx512=off)"
            )
        return f"fp32 GEMM: oneMKL AVX-512 path (MKL CPU code {s['mkl_cpu_code']}, AMD override loaded)"
    if s["applies"]:
        return (
            "fp32 GEMM: oneMKL AVX2 path on an AVX-512 AMD CPU (slower: GEMMs ~2x on Zen 5, ~1.0-1.4x on Zen 4): "
            "the AMD override is not loaded in this process; `python -m timemae_dist.mkl_avx512` says why and how"
        )
    return f"fp32 GEMM: oneMKL default dispatch ({s['reason']})"


def _main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m timemae_dist.mkl_avx512", description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="build the preload library (if it applies) and print its path")
    args = p.parse_args(argv)
    if args.build:
        sup = support()
        if not sup.applies:
            print(f"not needed here: {sup.reason}")
            return 0
        print(build_shim())
        return 0
    print(json.dumps(status()))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
