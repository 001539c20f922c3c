"""How many kernels does one pass launch? A device-independent figure of the element-wise overhead.

Eager: :func:`rsvheat.models.counting.kernel_counts` on one inference forward (our models folded, the official code
folded by its ``infer_init``, timm's in eval mode) and one training step (forward and backward, no optimizer).
Compiled (``--compiled``): the kernels inductor's generated code calls per inference forward (fused kernels plus the
GEMMs and convolutions it hands to libraries), from the code itself. Batch 1; each case in this process.

    python benchmarks/kernel_counts.py [--sizes 224 512] [--compiled] [--official-source PATH/TO/vHeat.py]

Writes ``benchmarks/results/kernel_counts.{csv,md}`` (``--out-dir``) with the machine described.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import torch

from rsvheat.apps.bench import OFFICIAL_SOURCE, build, machine_description, write_results
from rsvheat.models.counting import kernel_counts
from rsvheat.operators.conv import StridedConv3x3

MODELS = ("rsvheat_tiny", "rsvheat_base", "vheat_official_base", "swin_base", "vit_base")
#: a kernel call in inductor's generated wrapper code: a fused C++ or Triton kernel, a library call, an ATen fallback
_GENERATED_CALL = re.compile(r"\b(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")


def _kind(call: str) -> str:
    if call.startswith(("cpp_fused", "triton_")):
        return "fused"
    return call.removeprefix("extern_kernels.").removeprefix("torch.ops.")


def compiled_counts(model: torch.nn.Module, x: torch.Tensor) -> Counter[str]:
    """Kernel calls per forward in the code inductor generates for ``model`` (inference), by kind."""
    from torch._inductor.utils import run_and_get_code

    with torch.inference_mode():
        _, sources = run_and_get_code(torch.compile(model), x)
    counts: Counter[str] = Counter({"graphs": len(sources)})
    for source in sources:
        wrapper = source[source.index("def call(") :] if "def call(" in source else ""
        counts.update(_kind(m.group(1)) for m in _GENERATED_CALL.finditer(wrapper))
    return counts


def _summary(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.most_common(6) if name != "graphs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--compiled", action="store_true", help="also count the inductor-compiled forward")
    parser.add_argument("--compiled-size", type=int, default=224)
    parser.add_argument("--official-source", type=Path, help="the official vHeat.py (classification/models)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    models = [m for m in args.models if m not in OFFICIAL_SOURCE or args.official_source is not None]
    # the kernels a GPU launches: the stride-2 convolutions' CPU-only GEMM backward works in chunks of many small ops
    StridedConv3x3.gemm_backward_on_cpu = False

    rows = []
    for name in models:
        for size in args.sizes:
            x = torch.randn(1, 3, size, size)
            for mode in ("infer", "train") if name not in OFFICIAL_SOURCE else ("infer",):
                model = build(name, size, infer=mode == "infer", official_source=args.official_source)

                def step(model=model, x=x, mode=mode) -> None:
                    if mode == "infer":
                        with torch.inference_mode():
                            model(x)
                    else:
                        model.zero_grad(set_to_none=True)  # as a training step does: no accumulation into old grads
                        model(x).sum().backward()

                step()  # caches, folds, first-call work
                counts = kernel_counts(step)
                rows.append(
                    dict(
                        model=name,
                        size=size,
                        mode=mode,
                        path="eager",
                        kernels=sum(counts.values()),
                        top=_summary(counts),
                    )
                )
                print(rows[-1], flush=True)
        if args.compiled:
            size = args.compiled_size
            model = build(name, size, infer=True, official_source=args.official_source)
            counts = compiled_counts(model, torch.randn(1, 3, size, size))
            graphs = counts.pop("graphs")
            rows.append(
                dict(
                    model=name,
                    size=size,
                    mode="infer",
                    path=f"compiled ({graphs} graph{'s' * (graphs > 1)})",
                    kernels=sum(counts.values()),
                    top=_summary(counts),
                )
            )
            print(rows[-1], flush=True)

    lines = [
        "# Kernels per pass",
        "",
        f"Machine: {machine_description('cpu')}.",
        "",
        "Batch 1. Eager: compute kernels per pass counted on the ATen call tree "
        "(`rsvheat.models.counting.kernel_counts`; views and allocations are free, a GEMM, convolution, LayerNorm, "
        "softmax or sum is one). Compiled: kernel calls in the code inductor generated for one inference forward "
        "(fused kernels and library calls). Training: forward and backward, no optimizer step; the stride-2 "
        "convolutions' backward as a GPU runs it (the library convolution, not the CPU-only GEMM backward).",
        "",
        "| model | size | mode | path | kernels | most frequent |",
        "|---|---:|---|---|---:|---|",
    ]
    lines += [
        f"| {r['model']} | {r['size']}² | {r['mode']} | {r['path']} | {r['kernels']} | {r['top']} |" for r in rows
    ]
    write_results(args.out_dir, "kernel_counts", rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
