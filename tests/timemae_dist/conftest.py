"""Shared fixtures of the model/kernel tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


@pytest.fixture
def run_without_compiler(tmp_path):
    """``run(code, **env)``: ``code`` in a fresh Python whose PATH holds no C compiler (``$CC`` unset)
    and whose kernel cache is an empty ``tmp_path / "cache"``, plus ``env``; returns the completed
    process. ``run.cache`` is that directory (no library may appear in it)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    cache = tmp_path / "cache"
    base = {**os.environ, "PATH": str(empty), "TIMEMAE_CACHE_DIR": str(cache)}
    base.pop("CC", None)

    def run(code: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env},
                              capture_output=True, text=True, timeout=120)

    run.cache = cache
    return run
