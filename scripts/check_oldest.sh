#!/usr/bin/env bash
# Install rsvheat with the oldest dependency versions it declares (constraints-oldest.txt = pyproject.toml's lower
# bounds) into .venv-oldest and run the smoke subset of the tests (pytest -m smoke): import, forward/backward, timm,
# SMP, safetensors round trip, a one-epoch fit and predict-scene; first, that `pip install .` over that set would
# change none of its packages. Idempotent. VENV=path puts the venv elsewhere.
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
# That venv is a user's stack at the oldest versions: installing rsvheat over it must change none of its packages
"$VENV/bin/python" -m pip install -q --dry-run --report "$VENV/pip-plan.json" '.[train,geo,detection]' 2>&1 | quiet
"$VENV/bin/python" - "$VENV/pip-plan.json" <<'PLAN'
import json
import sys

plan = json.load(open(sys.argv[1]))["install"]
changed = [f"{p['metadata']['name']} {p['metadata']['version']}" for p in plan if p["metadata"]["name"] != "rsvheat"]
if changed:
    sys.exit("pip install . would change the user's packages: " + ", ".join(changed))
print("pip install . over the oldest set changes no other package")
PLAN
"$VENV/bin/python" -m pytest -q -m smoke -p no:cacheprovider "$@"
