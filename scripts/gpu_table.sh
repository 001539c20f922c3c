#!/usr/bin/env bash
# The GPU comparison of docs/efficiency.md on one CUDA GPU: RS-vHeat-B against the official vHeat-B code, Swin-B and
# ViT-B, images/s and peak CUDA memory, fp32 (TF32 off) at batch 1 and bf16 autocast at batch > 1, inference and
# training, each case in its own process (`rsvheat bench --device cuda`, six invocations).
#
#   bash scripts/gpu_table.sh OUT_DIR PATH/TO/vHeat/classification/models/vHeat.py [SECONDS_PER_INVOCATION]
#
# Needs torch with CUDA, timm and einops (the official code's); rsvheat runs from this checkout (PYTHONPATH=src), so
# a machine with those packages needs no install. Each invocation is stopped after SECONDS_PER_INVOCATION (default
# 150), so that the whole table fits a short GPU lease; a stopped one's log keeps the cases it finished. Writes
# OUT_DIR/gpu_table.md (the six reports), OUT_DIR/gpu_table.csv (every case, with its invocation's name) and
# OUT_DIR/gpu_table.log; each invocation's own files stay in OUT_DIR/runs/. BENCH_ARGS is added to every invocation
# (BENCH_ARGS=--compile for the compiled rows).
set -uo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
out=$1 official=$2 limit=${3:-150}
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
[ -f "$official" ] || { echo "the official vHeat source is not a file: $official" >&2; exit 2; }
mkdir -p "$out/runs"
: > "$out/gpu_table.log"

infer="rsvheat_base vheat_official_base swin_base vit_base"
train="rsvheat_base swin_base vit_base"
bench() {
    local name=$1
    shift
    echo "== $name: rsvheat bench --device cuda $*" | tee -a "$out/gpu_table.log"
    # shellcheck disable=SC2086  # BENCH_ARGS: words to add
    timeout "$limit" "$python" -m rsvheat.cli bench --device cuda "$@" ${BENCH_ARGS:-} -o "$out/runs/$name" >> "$out/gpu_table.log" 2>&1
    echo "== $name: exit $?" | tee -a "$out/gpu_table.log"
}
bench fp32_b1 --models $infer --modes infer --precision fp32 --sizes 1024 2048 --batch 1 --official-source "$official"
bench bf16_b32 --models $infer --modes infer --precision bf16 --sizes 512 --batch 32 --official-source "$official"
bench bf16_b8 --models $infer --modes infer --precision bf16 --sizes 1024 --batch 8 --official-source "$official"
bench bf16_b2 --models $infer --modes infer --precision bf16 --sizes 2048 --batch 2 --official-source "$official"
bench train_b16 --models $train --modes train --precision bf16 --train-sizes 512 --train-batch 16
bench train_b4 --models $train --modes train --precision bf16 --train-sizes 1024 --train-batch 4

"$python" - "$out" <<'MERGE'
import csv
import sys
from pathlib import Path

out = Path(sys.argv[1])
runs = sorted(p for p in (out / "runs").iterdir() if (p / "efficiency.csv").is_file())
rows = [dict(run=run.name, **row) for run in runs for row in csv.DictReader(open(run / "efficiency.csv"))]
if rows:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "gpu_table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
reports = [f"<!-- {run.name} -->\n" + (run / "efficiency.md").read_text() for run in runs]
(out / "gpu_table.md").write_text("\n".join(reports))
print(f"{len(runs)} of 6 invocations finished; {len(rows)} cases in {out / 'gpu_table.csv'}")
MERGE
