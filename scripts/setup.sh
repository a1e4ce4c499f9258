#!/usr/bin/env bash
# Create or refresh the project's virtual environment at .venv/ (CPU set-up, exact pins).
# Idempotent and quick when nothing changed: it re-installs only when pyproject.toml or
# constraints/cpu.txt differ from what the existing .venv was built with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)'; then
  echo "setup: Python >= 3.10 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
stamp_want="$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp_want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24" >/dev/null
# torch first, from the pinned CPU build, so nothing below can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c constraints/cpu.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[dev]"
echo "$stamp_want" > .venv/.setup-stamp
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
