#!/usr/bin/env bash
# Create .venv (Python 3.11) with rsvheat and its test/integration dependencies. Idempotent; works offline from the
# machine's package caches. torch/torchvision are installed first, by exact version, so pip never picks another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import rsvheat, torch; print(f'rsvheat {rsvheat.__version__} ready (torch {torch.__version__})')"
