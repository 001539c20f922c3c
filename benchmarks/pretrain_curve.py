"""A short CPU pre-training run on real imagery, and its loss curves.

Runs ``rsvheat pretrain --config configs/pretrain/rsvheat_tiny_bigearthnet_landsat.yaml`` (BigEarthNet example S1/S2
pairs + the embedded CC0 Landsat scene; fetch the former first with ``python scripts/get_bigearthnet_example.py``),
then plots every loss term against the step from the run's ``metrics.csv``.

    python benchmarks/pretrain_curve.py [--config ...] [extra LightningCLI overrides ...]

Writes ``benchmarks/results/pretrain_curve.{png,md}``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rsvheat.apps.bench import machine_description  # noqa: E402
from rsvheat.trainers.pretrain import pretrain_cli  # noqa: E402

TERMS = {"spa": "L_spa (pixel L1)", "fre": "L_fre (DCT L1)", "con": "L_con (InfoNCE)"}


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in csv.DictReader(path.open()):
        for key, value in row.items():
            if key.startswith("train/") and value:
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def smooth(values: list[float], window: int) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def change_row(label: str, source: str, values: list[float]) -> str:
    first, last = sum(values[:10]) / len(values[:10]), sum(values[-10:]) / len(values[-10:])
    return f"| {label} | {source} | {first:.4f} | {last:.4f} | {100 * (last - first) / first:+.1f} % |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain/rsvheat_tiny_bigearthnet_landsat.yaml")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args, overrides = parser.parse_known_args()
    root = Path("runs/pretrain_curve")
    start = time.perf_counter()
    pretrain_cli(["--config", args.config, "--trainer.default_root_dir", str(root), *overrides])
    minutes = (time.perf_counter() - start) / 60
    metrics = sorted(root.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    series = read_metrics(metrics)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    lines = [
        "# Pre-training on real imagery (CPU)",
        "",
        f"Command: `python benchmarks/pretrain_curve.py --config {args.config} {' '.join(overrides)}`".rstrip() + "",
        f"Machine: {machine_description('cpu')}. Wall time: {minutes:.1f} min.",
        "",
        "Each loss term per source (`optical`: Landsat crops; `bigearthnet`: BigEarthNet S2/S1 pairs, whose L_con also "
        "holds the cross-modal term) and averaged over the sources; first and last = mean of the first and last 10 "
        "logged steps.",
        "",
        "| term | source | first | last | change |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for ax, (term, label) in zip(axes, TERMS.items(), strict=True):
        points = series.get(f"train/{term}", [])
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, alpha=0.3, color="C0")
        ax.plot(steps, smooth(list(values), 10), color="C0", label="mean of sources")
        for source in ("optical", "bigearthnet"):
            sub = series.get(f"train/{source}/{term}")
            if sub:
                s_steps, s_values = zip(*sub, strict=True)
                ax.plot(s_steps, smooth(list(s_values), 10), lw=1, ls="--", label=source)
                lines.append(change_row(label, source, s_values))
        ax.set(title=label, xlabel="step", yscale="log")
        ax.legend(fontsize=8)
        lines.append(change_row(label, "**mean**", values))
    for part, label in (("con_freq", "L_con: low vs high"), ("con_modal", "L_con: optical vs SAR")):
        for source in ("optical", "bigearthnet"):
            sub = series.get(f"train/{source}/{part}")
            if sub:
                lines.append(change_row(label, source, [v for _, v in sub]))
    fig.suptitle("RS-vHeat-T pre-training on BigEarthNet S1/S2 pairs + Landsat (CPU)")
    fig.tight_layout()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out_dir / "pretrain_curve.png", dpi=110)
    lines += ["", "![loss curves](pretrain_curve.png)", ""]
    (args.out_dir / "pretrain_curve.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
