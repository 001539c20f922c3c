"""How exact, and how fast, is each spectral precision? Sets the default of ``RSVHeat(spectral_precision=...)``.

Against the same model in float64 (relative RMS error per stage output and on the pooled features), and timed
(inference, median after a warm-up):

* ``fp32``: float32 throughout (the reference speed);
* ``tf32`` (CUDA only): float32 with TF32 GEMMs and convolutions;
* ``bf16 exact``: bfloat16 autocast, the spectral transforms in float32 (``spectral_precision="float32"``);
* ``bf16``: bfloat16 autocast, the spectral transforms as bf16 GEMMs (``spectral_precision="bfloat16"``, what
  ``"auto"`` chooses on CUDA).

    python benchmarks/bench_spectral_precision.py [--variant rsvheat_tiny] [--size 512] [--device cuda]

Writes ``benchmarks/results/spectral_precision.{csv,md}`` (``--out-dir``) with the machine described.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rsvheat.apps.bench import machine_description, write_results
from rsvheat.models.rsvheat import VARIANTS, RSVHeat

CASES = ("fp32", "tf32", "bf16 exact", "bf16")


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


def run(model: RSVHeat, x: torch.Tensor, case: str) -> list[torch.Tensor]:
    """The four stage outputs and the pooled features under ``case``."""
    model.set_spectral_precision("float32" if case == "bf16 exact" else "bfloat16")
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if case.startswith("bf16") else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = case == "tf32"
    with torch.inference_mode(), autocast:
        stages = model.forward_intermediates(x, indices=4, intermediates_only=True)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    return [*stages, pooled]


def median_seconds(model: RSVHeat, x: torch.Tensor, case: str, repeats: int) -> float:
    run(model, x, case)  # warm-up
    times = []
    for _ in range(repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(model, x, case)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # T, not S/B: at random initialisation the layer scale of S/B (1e-5) mutes every block's branch, so their errors
    # would be the stems' and downsamplings' alone
    parser.add_argument("--variant", default="rsvheat_tiny", choices=sorted(VARIANTS))
    parser.add_argument("--error-size", type=int, default=256, help="input size of the error measurement")
    parser.add_argument("--size", type=int, default=512, help="input size of the timing")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = [c for c in CASES if c != "tf32" or device.type == "cuda"]
    torch.manual_seed(0)
    model = RSVHeat(**VARIANTS[args.variant], img_size=224, num_classes=0).eval()

    x = torch.randn(1, 3, args.error_size, args.error_size)
    reference = [t.cpu() for t in run(model.double(), x.double(), "fp32")]
    model.float().to(device)
    rows = []
    for case in cases:
        outputs = run(model, x.to(device), case)
        errors = [relative_rms(o.cpu(), r) for o, r in zip(outputs, reference, strict=True)]
        seconds = median_seconds(
            model, torch.randn(args.batch, 3, args.size, args.size, device=device), case, args.repeats
        )
        rows.append(
            dict(
                case=case,
                **{f"stage{i + 1}": e for i, e in enumerate(errors[:4])},
                pooled=errors[4],
                seconds=seconds,
                images_per_s=args.batch / seconds,
            )
        )
        print(
            f"{case:>11}: "
            + " ".join(f"{rows[-1][k]:.2e}" for k in ("stage1", "stage2", "stage3", "stage4", "pooled"))
            + f"  {seconds * 1e3:.0f} ms"
        )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    fp32 = next(r for r in rows if r["case"] == "fp32")
    lines = [
        "# Spectral precision: error against float64 and inference speed",
        "",
        f"Machine: {machine_description(args.device, cases)}.",
        f"{args.variant} (random initialisation, seed 0; S/B's layer scale of 1e-5 at initialisation would mute "
        "the blocks whose error is measured). Error: relative RMS against the same model in float64, "
        f"input 1×3×{args.error_size}². Speed: inference, batch {args.batch}, {args.size}², median of "
        f"{args.repeats} after a warm-up.",
        "",
        "```bash",
        f"python benchmarks/bench_spectral_precision.py --variant {args.variant} --size {args.size} "
        f"--device {args.device}",
        "```",
        "",
        "| case | stage 1 | stage 2 | stage 3 | stage 4 | pooled | ms | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        errors = " | ".join(f"{r[k]:.1e}" for k in ("stage1", "stage2", "stage3", "stage4", "pooled"))
        lines.append(f"| {r['case']} | {errors} | {r['seconds'] * 1e3:.0f} | {fp32['seconds'] / r['seconds']:.2f}× |")
    write_results(args.out_dir, "spectral_precision", rows, lines)
    print(f"wrote {args.out_dir / 'spectral_precision.md'}")


if __name__ == "__main__":
    main()
