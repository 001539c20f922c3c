"""Each downstream task end to end on the CPU: ``rsvheat make-samples``, then ``rsvheat fit`` and ``rsvheat test
--ckpt_path last`` with the task's ``configs/<task>/landsat_tiny_cpu.yaml`` (RS-vHeat-T from scratch, small datasets
cut from the embedded CC0 Landsat scene).

    python benchmarks/task_runs.py [--tasks classification segmentation change detection]

Writes ``benchmarks/results/task_runs.{csv,md}``: the test metrics of the last checkpoint (the tiny sets' validation
tiles are also their test tiles, so the best checkpoint would be chosen on the test set), the fit wall time, and the
training throughput that ``TrainingSpeed`` logs (median over the epochs after the first: data loading, forward,
backward and optimiser steps; not validation, checkpoints or start-up).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rsvheat.apps.bench import machine_description

SAMPLES = Path("data/samples")
METRICS = {
    "classification": ["test/OA", "test/AA"],
    "segmentation": ["test/OA", "test/mIoU", "test/mF1"],
    "change": ["test/F1", "test/IoU", "test/precision", "test/recall"],
    "detection": ["test/mAP50", "test/mAP"],
}


def train_images(task: str, config: dict) -> int:
    data = config["data"]["init_args"]
    if task == "classification":
        return len(json.loads(Path(data["split_file"]).read_text())["train"])
    if task == "segmentation":
        return len(list(Path(data["train_root"], "images").iterdir()))
    if task == "change":
        return len(list(Path(data["train_root"], "A").iterdir()))
    return len(Path(data["train"]["ids"]).read_text().split())


def rsvheat(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rsvheat.cli", *args], check=True)
    return time.perf_counter() - start


def logged(root: Path, key: str) -> list[float]:
    """Every value of ``key`` in the run's CSV logs (fit and test write separate versions), oldest first."""
    values = []
    for metrics in sorted(root.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        values += [float(row[key]) for row in csv.DictReader(metrics.open()) if row.get(key)]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(METRICS))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rsvheat("make-samples", "-o", str(SAMPLES))
    rows = []
    for task in args.tasks:
        config_path = f"configs/{task}/landsat_tiny_cpu.yaml"
        config = yaml.safe_load(Path(config_path).read_text())
        root = Path("runs/task_runs") / task
        shutil.rmtree(root, ignore_errors=True)  # logs of an earlier run would mix with this one's
        common = [
            "--config",
            config_path,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
        ]
        fit_seconds = rsvheat("fit", *common)
        rsvheat("test", *common, "--ckpt_path", "last")
        images, epochs = train_images(task, config), config["trainer"]["max_epochs"]
        scores = {k: values[-1] for k in METRICS[task] if (values := logged(root, k))}
        rows.append(
            {
                "task": task,
                "config": config_path,
                "train_images": images,
                "epochs": epochs,
                "fit_minutes": round(fit_seconds / 60, 2),
                "train_images_per_s": round(statistics.median(logged(root, "train/images_per_s")[1:]), 2),
                **{k.removeprefix("test/"): round(scores[k], 4) for k in METRICS[task] if k in scores},
            }
        )
        print(rows[-1], flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(args.out_dir / "task_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Downstream tasks end to end on the CPU",
        "",
        f"Command: `python benchmarks/task_runs.py`. Machine: {machine_description('cpu')}.",
        "RS-vHeat-T from random initialisation on the `rsvheat make-samples` sets (cut from the embedded CC0 Landsat "
        "scene); test = the held-out tiles (`val` folders, `test` split for classification), last checkpoint. "
        "Train img/s: median over epochs 2..N of the training loop alone (`TrainingSpeed`: no validation, "
        "checkpoints or start-up).",
        "",
        "| task | train images | epochs | fit (min) | train img/s | test metrics |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        metrics = ", ".join(
            f"{k.removeprefix('test/')} {row[k.removeprefix('test/')]:.3f}"
            for k in METRICS[row["task"]]
            if k.removeprefix("test/") in row
        )
        lines.append(
            f"| {row['task']} | {row['train_images']} | {row['epochs']} | {row['fit_minutes']:.1f} | "
            f"{row['train_images_per_s']:.1f} | {metrics} |"
        )
    (args.out_dir / "task_runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
