"""A C kernel library built once with the system compiler, switched by an ``auto|on|off`` variable.

Shared by the CPU kernels (:mod:`timemae_dist.kernels.cpu_dropout`,
:mod:`timemae_dist.kernels.cpu_fused`): each is one C source, compiled on first use into the
cache directory of :mod:`timemae_dist.mkl_avx512` (file name keyed by the source's hash, built
in a temporary directory and moved into place, so a half-written library is never loaded),
loaded with ``ctypes`` (whose calls release the GIL). Its environment variable selects
``auto`` (use it where it builds and applies, else the eager torch ops with one warning),
``on`` (raise instead of falling back) or ``off`` (eager ops). A run's config key
(``trainer.cpu_dropout``, ``trainer.cpu_fused``) sets the variable, which wins where set.
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
from typing import Callable, Iterator, Optional, Sequence

__all__ = ["MODES", "SWITCHES", "CKernel", "CKernelError", "env_restored"]

MODES = ("auto", "on", "off")
SWITCHES = ("TIMEMAE_CPU_DROPOUT", "TIMEMAE_CPU_FUSED")  # every kernel's variable (cpu_dropout, cpu_fused)


@contextlib.contextmanager
def env_restored() -> Iterator[None]:
    """The CPU kernels' switches (:data:`SWITCHES`) as they were on entry, again on exit (set or
    unset): for code that switches them for one run or one measurement."""
    saved = {n: os.environ.get(n) for n in SWITCHES}
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


class CKernelError(RuntimeError):
    """A C kernel was required (``on``) and is unavailable, or its switch has a bad value."""


class CKernel:
    """One kernel library: ``name`` (file ``libtimemae_<name>-<hash>.so``), ``env`` (its switch),
    ``what`` (what it computes, for messages), ``flag_sets`` (compiler flags tried in order),
    ``setup(lib)`` (declares argtypes; raises :class:`CKernelError` where the library cannot
    run here) and ``error`` (the exception class raised)."""

    def __init__(self, name: str, env: str, source: str, what: str, *, setup: Callable[[ctypes.CDLL], None],
                 flag_sets: Sequence[Sequence[str]] = ((),), error: type[CKernelError] = CKernelError):
        if env not in SWITCHES:
            raise ValueError(f"{env} is not in ckernel.SWITCHES (env_restored would not restore it)")
        self.name, self.env, self.source, self.what = name, env, source, what
        self.setup, self.flag_sets, self.error = setup, [list(f) for f in flag_sets], error
        self.lib: Optional[ctypes.CDLL] = None
        self.why = ""
        self._tried = False
        self._warned = False
        self._usable_for: Optional[str] = None  # the variable's value _usable was computed for
        self._usable: Optional[bool] = None
        self._lock = threading.Lock()

    # -- the switch -------------------------------------------------------------------------

    def mode(self) -> str:
        m = os.environ.get(self.env, "auto").strip().lower() or "auto"
        if m not in MODES:
            raise self.error(f"{self.env}={m!r} is not one of {'|'.join(MODES)}")
        return m

    def effective_mode(self, configured: str, key: str) -> str:
        """The mode a run uses: ``$env`` where set, else ``configured`` (config key ``key``)."""
        if os.environ.get(self.env, "").strip():
            return self.mode()
        m = str(configured).strip().lower()
        if m not in MODES:
            raise self.error(f"{key}={configured!r} is not one of {'|'.join(MODES)}")
        return m

    # -- building and loading ---------------------------------------------------------------

    def library_path(self) -> Path:
        from timemae_dist.mkl_avx512 import cache_dir

        digest = hashlib.sha256(self.source.encode()).hexdigest()[:12]
        return cache_dir() / f"libtimemae_{self.name}-{digest}.so"

    def build(self) -> Path:
        """Build the library once (atomically: a half-written file is never left in place)."""
        from timemae_dist.mkl_avx512 import _compiler

        out = self.library_path()
        if out.is_file():
            return out
        cc = _compiler()
        if cc is None:
            raise self.error(
                f"{self.name}: no C compiler (cc/gcc/clang, or $CC) to build {out.name}; "
                f"install one (e.g. `apt-get install gcc`) or set {self.env}=off"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
            src = Path(tmp) / f"{self.name}.c"
            src.write_text(self.source)
            lib = Path(tmp) / out.name
            err = ""
            for flags in self.flag_sets:
                proc = subprocess.run(
                    [*cc.split(), "-shared", "-fPIC", "-O3", *flags, "-o", str(lib), str(src)],
                    capture_output=True, text=True,
                )
                if proc.returncode == 0 and lib.is_file():
                    break
                err = proc.stderr.strip()[-300:]
            else:
                raise self.error(
                    f"{self.name}: building {out} with {cc!r} failed ({err}); fix the compiler or set {self.env}=off"
                )
            os.replace(lib, out)
        return out

    def load(self) -> Optional[ctypes.CDLL]:
        """The loaded library, or None (``why`` says why); tried once per process."""
        with self._lock:
            if self._tried:
                return self.lib
            self._tried = True
            try:
                lib = ctypes.CDLL(str(self.build()))
                self.setup(lib)
            except (CKernelError, OSError, AttributeError) as e:
                self.why = str(e)
                return None
            self.lib = lib
            return lib

    def available(self, m: Optional[str] = None) -> bool:
        """Whether the kernel is in use under mode ``m`` (default: the variable's); builds it if
        needed. Under ``on`` an unavailable kernel raises."""
        m = self.mode() if m is None else m
        if m == "off":
            return False
        lib = self.load()
        if lib is None and m == "on":
            raise self.error(f"{self.env}=on but the {self.what} kernel is unavailable: {self.why}")
        return lib is not None

    def usable(self, fallback: str) -> bool:
        """``available()`` for a call site (called per layer and step): the answer is cached for
        the variable's current value; an ``auto`` fallback warns once, naming ``fallback`` (what
        runs instead)."""
        value = os.environ.get(self.env)
        if value == self._usable_for and self._usable is not None:
            return self._usable
        ok = self.available()
        if not ok and not self._warned and self.why and self.mode() == "auto":
            self._warned = True
            warnings.warn(f"{self.name}: using {fallback} ({self.why})", RuntimeWarning, stacklevel=4)
        self._usable_for, self._usable = value, ok
        return ok

    def describe(self, label: str, eager: str) -> str:
        """One line for logs: which path this process runs for ``label``, and why."""
        m = self.mode()
        if m == "off":
            return f"{label}: {eager} ({self.env}=off)"
        if self.available():
            return f"{label}: C kernel ({self.library_path().name}, {self.env}={m})"
        return f"{label}: {eager} (C kernel unavailable: {self.why})"
