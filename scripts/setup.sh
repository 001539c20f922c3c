#!/usr/bin/env bash
# Create .venv (Python 3.11) with rsvheat and its test/integration dependencies. Idempotent; works offline from the
# machine's package caches. pyproject.toml declares version ranges (so rsvheat installs beside other libraries); here
# every package is held to the exact tested version in constraints.txt, so this .venv and CI run what was tested.
# torch/torchvision are installed first, so that pip never picks another build while resolving the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet() { grep -v '^WARNING: Location' || true; }  # pip's failures still fail the script (pipefail)
pip_install() { .venv/bin/python -m pip install -q -c constraints.txt "$@" 2>&1 | quiet; }
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
pip_install torch torchvision
pip_install -e '.[dev]'
.venv/bin/python -c "import rsvheat, torch; print(f'rsvheat {rsvheat.__version__} ready (torch {torch.__version__})')"
