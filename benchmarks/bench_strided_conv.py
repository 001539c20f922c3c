"""The stem's and downsamplings' stride-2 convolutions in training: the library convolution's backward (oneDNN on
CPUs) against the GEMM backward of :class:`rsvheat.operators.conv.StridedConv3x3`.

For each of a variant's five stride-2 convolutions at a training size, forward + backward of the library convolution
and of ours, timed in alternation (pairs, so that both see the same machine state), median of the pairs after two;
then whole training steps of the model (forward, backward, SGD step), alternating the two paths in one process.

    python benchmarks/bench_strided_conv.py [--variant rsvheat_base] [--size 512] [--rounds 15] [--step-rounds 8]

Writes ``benchmarks/results/strided_conv.csv`` and ``strided_conv.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import rsvheat
from rsvheat.apps.bench import machine_description, write_results
from rsvheat.operators.conv import StridedConv3x3


def paired_medians(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Seconds per call of each run, timed in alternation, median over ``rounds`` after two."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds + 2):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def comparison_row(case: str, library_ms: float, gemm_ms: float) -> dict:
    return dict(
        case=case, library_ms=round(library_ms, 1), gemm_ms=round(gemm_ms, 1), speedup=round(library_ms / gemm_ms, 2)
    )


def strided_convs(model: nn.Module, size: int) -> list[tuple[StridedConv3x3, tuple[int, ...]]]:
    """The model's stride-2 convolutions and their channels-last input shapes for a ``size`` x ``size`` image."""
    found: list[tuple[StridedConv3x3, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: found.append((m, tuple(args[0].shape))))
        for m in model.modules()
        if isinstance(m, StridedConv3x3)
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="rsvheat_base")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--step-rounds", type=int, default=8, help="0: no whole training steps")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = rsvheat.create_model(args.variant, num_classes=0, img_size=args.size).train()
    rows = []
    for conv, shape in strided_convs(model, args.size):
        x = torch.randn(shape, requires_grad=conv.in_channels != 3)  # the image needs no gradient
        grad = torch.randn(shape[0], -(-shape[1] // 2), -(-shape[2] // 2), conv.out_channels)

        def run(
            gemm_backward: bool, x: torch.Tensor = x, conv: StridedConv3x3 = conv, grad: torch.Tensor = grad
        ) -> None:
            conv.gemm_backward_on_cpu = gemm_backward
            conv(x).backward(grad)

        medians = paired_medians({"library": lambda: run(False), "gemm": lambda: run(True)}, args.rounds)
        del conv.gemm_backward_on_cpu  # back to the class default
        case = f"conv {conv.in_channels}->{conv.out_channels} on {shape[1]}x{shape[2]}"
        rows.append(comparison_row(case, medians["library"] * 1e3, medians["gemm"] * 1e3))
        print(rows[-1])
    rows.append(comparison_row("all five", sum(r["library_ms"] for r in rows), sum(r["gemm_ms"] for r in rows)))
    if args.step_rounds:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        image = torch.randn(1, 3, args.size, args.size)

        def step(gemm_backward: bool) -> None:
            StridedConv3x3.gemm_backward_on_cpu = gemm_backward
            optimizer.zero_grad(set_to_none=True)
            model(image).mean().backward()
            optimizer.step()

        medians = paired_medians({"library": lambda: step(False), "gemm": lambda: step(True)}, args.step_rounds)
        StridedConv3x3.gemm_backward_on_cpu = True
        case = f"training step, batch 1, {args.size}²"
        rows.append(comparison_row(case, medians["library"] * 1e3, medians["gemm"] * 1e3))
        print(rows[-1])
    report = [
        "# Stride-2 convolutions in training: library backward vs GEMM backward",
        "",
        f"Machine: {machine_description('cpu')}.",
        f"{args.variant}, {args.size}² images, batch 1, float32. Forward + backward of each stride-2 convolution "
        f"(the stem's two, the three downsamplings') on its input in the model, the library convolution "
        f"(oneDNN here) and `rsvheat.operators.conv.StridedConv3x3`'s GEMM backward timed in alternation, "
        f"median of {args.rounds} pairs; then whole training steps (forward, backward, SGD step) with each path, "
        f"alternating in one process, median of {args.step_rounds} pairs. Command: `python "
        f"benchmarks/bench_strided_conv.py --variant {args.variant} --size {args.size} --rounds {args.rounds} "
        f"--step-rounds {args.step_rounds}`.",
        "",
        "| case | library (ms) | GEMM backward (ms) | speed-up |",
        "|---|---:|---:|---:|",
        *(f"| {r['case']} | {r['library_ms']} | {r['gemm_ms']} | {r['speedup']}× |" for r in rows),
    ]
    write_results(args.out_dir, "strided_conv", rows, report)
    print("\n".join(report))


if __name__ == "__main__":
    main()
