"""Start-up time of the command line and of ``import rsvheat`` (issue G: ``rsvheat --help`` under 1 s).

Each command runs in a fresh process, 2 warm-up runs then 7 timed ones; the median wall time is reported next to
``import torch`` (what every command that runs a model pays) as the reference. Results go to
``benchmarks/results/cli_startup.{csv,md}``.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rsvheat.apps.bench import machine_description

OUT = Path(__file__).resolve().parent / "results"
RSVHEAT = str(Path(sys.executable).with_name("rsvheat"))
CASES = {
    "rsvheat --help": [RSVHEAT, "--help"],
    "rsvheat predict-scene --help": [RSVHEAT, "predict-scene", "--help"],
    "python -c 'import rsvheat'": [sys.executable, "-c", "import rsvheat"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
    "python -c 'import rsvheat, timm' (registers the models)": [sys.executable, "-c", "import rsvheat, timm"],
}


def median_seconds(argv: list[str], warmup: int = 2, repeats: int = 7) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rows = [{"command": name, "median_s": round(median_seconds(argv), 3)} for name, argv in CASES.items()]
    OUT.mkdir(exist_ok=True)
    with open(OUT / "cli_startup.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["command", "median_s"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Command-line start-up",
        "",
        f"Machine: {machine_description('cpu')}. Fresh process per run, 2 warm-up + 7 timed runs, median.",
        "",
        "| command | median s |",
        "|---|---:|",
        *[f"| `{r['command']}` | {r['median_s']:.3f} |" for r in rows],
        "",
    ]
    (OUT / "cli_startup.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
