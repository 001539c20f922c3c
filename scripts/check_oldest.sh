#!/usr/bin/env bash
# Install rsvheat with the oldest dependency versions it declares (constraints-oldest.txt = pyproject.toml's lower
# bounds) into .venv-oldest and run the smoke subset of the tests (pytest -m smoke): import, forward/backward, timm,
# SMP, safetensors round trip, a one-epoch fit and predict-scene. Idempotent. VENV=path puts the venv elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VENV:-.venv-oldest}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet() { grep -v '^WARNING: Location' || true; }
pip_install() { "$VENV/bin/python" -m pip install -q -c constraints-oldest.txt "$@" 2>&1 | quiet; }
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
pip_install torch torchvision
pip_install -e '.[train,geo,detection]' pytest scipy
"$VENV/bin/python" -m pytest -q -m smoke -p no:cacheprovider "$@"
