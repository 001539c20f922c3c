"""Matmul vs FFT DCT: where does each win? Sets ``rsvheat.operators.dct.FFT_MIN_SIZE``.

Two workloads, both float32, CPU (or CUDA when present), median of repeats after a warm-up:

* ``hco``: the heat filter on a channels-last field ``(1, N, N, C)`` as the backbone runs it (C = 128).
* ``image``: the 2-D DCT of a ``(3, N, N)`` image, as the pre-training masking runs it.

    python benchmarks/bench_dct.py [--sizes 32 64 128 256 512 1024] [--repeats 5]

Writes ``benchmarks/results/dct.csv`` and ``dct.md``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from rsvheat.apps.bench import write_results
from rsvheat.operators.dct import dct2d
from rsvheat.operators.heat import heat_conduct, heat_filter


def median_ms(fn, repeats: int, device: torch.device) -> float:
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
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--max-hco-size", type=int, default=512, help="the field workload is O(N^3 C): cap it")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with torch.inference_mode():
        for n in args.sizes:
            small = n <= args.max_hco_size
            field = torch.randn(1, n, n, args.channels, device=device) if small else None
            filt = heat_filter(torch.rand(n, n, args.channels, device=device)) if small else None
            image = torch.randn(3, n, n, device=device)
            workloads = [("image", lambda impl, x=image: dct2d(x, impl))]
            if n <= args.max_hco_size:
                workloads.insert(0, ("hco", lambda impl, f=field, k=filt: heat_conduct(f, k, impl)))
            for workload, run in workloads:
                matmul = median_ms(lambda r=run: r("matmul"), args.repeats, device)
                fft = median_ms(lambda r=run: r("fft"), args.repeats, device)
                rows.append(
                    dict(
                        workload=workload,
                        size=n,
                        matmul_ms=round(matmul, 3),
                        fft_ms=round(fft, 3),
                        fft_speedup=round(matmul / fft, 2),
                    )
                )
                print(f"{workload:6s} N={n:5d}  matmul {matmul:9.2f} ms   fft {fft:9.2f} ms   x{matmul / fft:5.2f}")
    lines = [
        "# Matmul vs FFT DCT",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, device {device}, {time.strftime('%Y-%m-%d')}. Median of {args.repeats} runs, float32.",
        f"`hco`: heat filter on a (1, N, N, {args.channels}) channels-last field; `image`: 2-D DCT of (3, N, N).",
        "",
        "| workload | N | matmul ms | fft ms | fft speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['workload']} | {r['size']} | {r['matmul_ms']} | {r['fft_ms']} | {r['fft_speedup']} |" for r in rows
    ]
    write_results(args.out_dir, "dct", rows, lines)


if __name__ == "__main__":
    main()
