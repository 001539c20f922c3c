"""Pre-training throughput of RS-vHeat-T and the cost of the frequency masking.

One training step = frequency masking + encoder on I_low and I_high + fusion + decoder + the three losses + backward +
AdamW step, on a batch of optical images, and on a batch of co-registered optical+SAR pairs. The masking alone is
timed on the same batch. Median of ``--repeats`` after ``--warmup`` steps, float32 (bf16 autocast on CUDA).

    python benchmarks/bench_pretrain.py [--variant rsvheat_tiny] [--size 224] [--batch 8]

Writes ``benchmarks/results/pretrain_throughput.{csv,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rsvheat.apps.bench import machine_description, write_results
from rsvheat.pretraining.model import FrequencyPretrainer


def median_seconds(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="rsvheat_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FrequencyPretrainer(args.variant, img_size=args.size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, s = args.batch, args.size
    batches = {
        "optical": {"optical": torch.randn(b, 3, s, s, device=device)},
        "optical+SAR pairs": {
            "optical": torch.randn(b, 3, s, s, device=device),
            "sar": torch.randn(b, 1, s, s, device=device),
        },
    }

    def step(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rows = []
    for name, batch in batches.items():
        images = sum(x.shape[0] for x in batch.values())
        t_step = median_seconds(lambda batch=batch: step(batch), args.repeats, args.warmup, device)
        with torch.no_grad():
            t_mask = sum(
                median_seconds(lambda x=x: model.masking(x), args.repeats, args.warmup, device) for x in batch.values()
            )
        rows.append(
            {
                "variant": args.variant,
                "size": s,
                "batch": name,
                "images_per_step": images,
                "step_s": round(t_step, 3),
                "images_per_s": round(images / t_step, 2),
                "masking_ms_per_image": round(1e3 * t_mask / images, 2),
                "masking_share_of_step_pct": round(100 * t_mask / t_step, 2),
            }
        )
        print(rows[-1], flush=True)
    lines = [
        f"# Pre-training throughput: {args.variant} at {s}x{s}",
        "",
        f"Machine: {machine_description(device.type)}. Command: `python benchmarks/bench_pretrain.py --variant "
        f"{args.variant} --size {s} --batch {b}`. Median of {args.repeats} steps after {args.warmup} warm-up steps.",
        "",
        "| batch | images/step | step (s) | images/s | masking (ms/image) | masking share of a step |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['batch']} | {r['images_per_step']} | {r['step_s']} | {r['images_per_s']} | "
        f"{r['masking_ms_per_image']} | {r['masking_share_of_step_pct']} % |"
        for r in rows
    ]
    target = all(r["masking_share_of_step_pct"] < 5 for r in rows)
    lines += ["", f"Target (masking < 5 % of a training step): {'MET' if target else 'MISSED'}.", ""]
    write_results(args.out_dir, "pretrain_throughput", rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
