"""Efficiency benchmark: RS-vHeat against the official vHeat, Swin and ViT (``rsvheat bench``).

Every (model, size, mode) case runs in a fresh subprocess, so its peak RSS is its own; all cases run in one
invocation, one after the other, so the ratios between models are measured under the same machine conditions.

* latency: median of ``repeats`` timed runs after ``warmup`` runs (``perf_counter``; CUDA synchronised);
* activation memory (train): what the forward pass leaves alive for the backward pass, counted exactly per storage
  (:func:`rsvheat.models.counting.activation_bytes`; independent of the allocator);
* memory growth: peak RSS of the subprocess minus its RSS after building the model (CPU; activations, gradients,
  workspace and the heap the allocator keeps), or the CUDA allocator's peak growth (GPU);
* FLOPs: ``torch.utils.flop_counter`` on the meta device (no compute), batch 1, as GMACs (matmul + conv only, the
  same rule for every model);
* modes: ``infer`` (eval, ``inference_mode``; RS-vHeat folded) and ``train`` (forward, backward of the mean pooled
  feature, an SGD step);
* precisions: ``fp32`` and ``bf16`` (the forward under bfloat16 autocast, :mod:`rsvheat.models.precision`); a bf16
  inference case also reports the relative error of its output against the fp32 output of the same model and input;
* baselines: ``official_*`` is our re-expression of the official vHeat computation structure
  (:mod:`rsvheat.testing.official_structure`, for FLOP counts and exactness tests); ``vheat_official_*`` is the
  official vHeat module itself, built from the user's copy of its source file (``--official-source``), folded by its
  own ``infer_init()`` as its speed measurement does (inference only).

Outputs ``efficiency.csv``, ``efficiency.md`` (tables, ratios, targets) and ``efficiency.png`` (cost vs pixels,
log-log, with fitted growth exponents) in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from rsvheat.files import write_atomic
from rsvheat.models.counting import activation_bytes
from rsvheat.models.precision import PRECISIONS, autocast, compile_in_place, low_precision_weights

if TYPE_CHECKING:
    from rsvheat.models.rsvheat import RSVHeat

BASELINES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
#: our models; ``_gc``: with gradient checkpointing (every block recomputed in the backward pass), ``_gcN``: the first
#: ``N`` blocks recomputed (the high-resolution ones; the memory-saving setting the targets judge); train only
TRAIN_ONLY = ("rsvheat_tiny_gc2", "rsvheat_base_gc8", "rsvheat_tiny_gc", "rsvheat_base_gc")
OURS = ("rsvheat_tiny", "rsvheat_base", *TRAIN_ONLY)
#: our re-expression of the official computation structure (not the official code): the variant it mirrors
OFFICIAL = {"official_tiny": "rsvheat_tiny", "official_base": "rsvheat_base"}
#: the official vHeat module, from the user's source file: its constructor arguments for the tiny and base variants
#: (the official configs vHeat_tiny_224.yaml and vHeat_base_224.yaml; ``dims`` is the stem width, doubled per stage)
OFFICIAL_SOURCE = {
    "vheat_official_tiny": dict(depths=[2, 2, 6, 2], dims=96, post_norm=False, layer_scale=None),
    "vheat_official_base": dict(depths=[2, 2, 18, 2], dims=128, post_norm=True, layer_scale=1e-5),
}
ALL_MODELS = [
    "rsvheat_tiny",
    "vheat_official_tiny",
    "official_tiny",
    "swin_tiny",
    "vit_small",
    "rsvheat_base",
    "vheat_official_base",
    "official_base",
    "swin_base",
    "vit_base",
    *TRAIN_ONLY,
]
#: timed for inference only: the official code's training path is not what its speed claims are about
INFER_ONLY = tuple(OFFICIAL_SOURCE)
#: which of our models each other model is compared with
SCALE = {
    "vheat_official_tiny": "rsvheat_tiny",
    "official_tiny": "rsvheat_tiny",
    "swin_tiny": "rsvheat_tiny",
    "vit_small": "rsvheat_tiny",
    "vheat_official_base": "rsvheat_base",
    "official_base": "rsvheat_base",
    "swin_base": "rsvheat_base",
    "vit_base": "rsvheat_base",
    **{name: name.partition("_gc")[0] for name in TRAIN_ONLY},
}


def _label(model: str, precision: str) -> str:
    """A model's name in the report: ``rsvheat_base`` in fp32, ``rsvheat_base (bf16)`` in bf16."""
    return model if precision == "fp32" else f"{model} ({precision})"


def build_official(name: str, size: int, source: str | Path) -> torch.nn.Module:
    """The official vHeat variant ``name`` (a key of :data:`OFFICIAL_SOURCE`) built from the user's ``source`` file,
    for ``size`` x ``size`` inputs, folded by its ``infer_init()`` (the decay maps ``k_exp`` precomputed) and in eval
    mode; its classifier's last Linear removed, so that it returns pooled features ``(B, C)`` like the others."""
    from rsvheat.testing.official_source import import_official

    module = import_official(source, "official_vheat")
    model = module.vHeat(**OFFICIAL_SOURCE[name], img_size=size, infer_mode=True, drop_path_rate=0.0)
    model.infer_init()
    model.classifier[-1] = torch.nn.Identity()
    return model.eval()


def build(name: str, size: int, infer: bool, official_source: str | Path | None = None) -> torch.nn.Module:
    """The backbone ``name`` (classifier removed) for ``size`` x ``size`` inputs; ``official_source``: the official
    ``vHeat.py`` that the ``vheat_official_*`` models are built from."""
    import timm

    import rsvheat
    from rsvheat.testing.official_structure import OfficialStructureHeat

    if name in OFFICIAL_SOURCE:
        if official_source is None:
            raise ValueError(f"{name} is built from the official source: pass --official-source PATH/TO/vHeat.py")
        if not infer:
            raise ValueError(f"{name} is timed for inference only")
        return build_official(name, size, official_source)

    if name in OURS:
        variant, checkpointing, blocks = name.partition("_gc")
        model = rsvheat.create_model(variant, num_classes=0, img_size=size)
        model.set_grad_checkpointing(bool(checkpointing), blocks=int(blocks) if blocks else None)
        return model.fold((size, size)) if infer else model.train()
    if name in OFFICIAL:
        cfg = rsvheat.VARIANTS[OFFICIAL[name]]
        model = OfficialStructureHeat(
            cfg["depths"], cfg["dims"], size, cfg["post_norm"], cfg["layer_scale"], cfg["use_sce"], num_classes=0
        )
        return model.fold() if infer else model.train()
    model = timm.create_model(BASELINES[name], pretrained=False, num_classes=0, img_size=size)
    return model.eval() if infer else model.train()


def gmacs(name: str, size: int) -> float:
    """Forward GMACs at batch 1, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(name, size, infer=True).to("meta")
    if name in OURS:
        # the folded filters are not part of the forward (as for the official k_exp)
        cast("RSVHeat", model).fold((size, size))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 2e9


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux's ``getrusage`` maxrss survives fork and exec, so a child started by a big parent reports the parent's
    peak; ``VmHWM`` belongs to the child's own address space. Elsewhere maxrss is all there is (bytes on macOS).
    """
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_case(
    name: str,
    size: int,
    mode: str,
    batch: int,
    repeats: int,
    warmup: int,
    device: str,
    long_seconds: float,
    precision: str = "fp32",
    official_source: str | None = None,
    compile: bool = False,
) -> dict:
    """One case, in this process (call it in a fresh one: peak RSS is per process). Input ``(batch, 3, size,
    size)``; the forward runs at ``precision`` (the backward follows autocast's casts). With ``compile`` the model
    runs through ``torch.compile`` (``fullgraph`` for rsvheat's own), compiled during the first warm-up run."""
    torch.manual_seed(0)
    dev = torch.device(device)
    if dev.type == "cuda":  # fp32 means fp32: no TF32 in GEMMs or convolutions (cuDNN's default allows it)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = build(name, size, infer=mode == "infer", official_source=official_source).to(dev)
    if compile:
        # inference freezes the weights into the graph, as the serving commands do
        compile_in_place(model, fullgraph=name.startswith("rsvheat"), frozen=mode == "infer")
        warmup = max(warmup, 1)  # the compilation is never timed
    x = torch.randn(batch, 3, size, size, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.0) if mode == "train" else None

    def step() -> None:
        if opt is None:
            with torch.inference_mode(), autocast(precision, dev):
                model(x)
        else:
            opt.zero_grad(set_to_none=True)
            with autocast(precision, dev):
                loss = model(x).float().mean()
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # bf16 inference holds the layers' weights in bf16 (as predict-scene does), so autocast does not cast them again
    # for every row chunk of every pass; the fp32 reference below runs after the weights are restored
    with low_precision_weights(model, precision) if opt is None else nullcontext():
        rss_before = _rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
            elif elapsed > long_seconds and not (compile and i == 0):  # a slow case: its warm-up is its measurement
                times.append(elapsed)
                break
    median = sorted(times)[len(times) // 2]
    peak_rss = peak_rss_mb()
    row = dict(
        model=name,
        size=size,
        mode=mode,
        precision=precision,
        batch=batch,
        median_s=round(median, 4),
        throughput_img_s=round(batch / median, 3),
        repeats=len(times),
        peak_rss_mb=round(peak_rss, 1),
        activation_mb="",
        memory_growth_mb=round(peak_rss - rss_before, 1),
        peak_cuda_mb="",
        gmacs="",
        rel_err_vs_fp32="",
        error="",
    )
    if dev.type == "cuda":
        row["memory_growth_mb"] = round((torch.cuda.max_memory_allocated() - cuda_before) / 2**20, 1)
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if opt is not None:  # after the memory reading: the count runs the forward once more, op by op
        with autocast(precision, dev):
            _, held = activation_bytes(lambda: model(x).float().mean())
        row["activation_mb"] = round(held / 2**20, 1)
    if precision != "fp32" and opt is None:
        # after the memory reading: the fp32 reference output is not part of the case's cost
        with torch.inference_mode():
            reference = model(x).float()
            with autocast(precision, dev):
                reduced = model(x).float()
        row["rel_err_vs_fp32"] = float(f"{float((reduced - reference).norm() / reference.norm()):.3g}")
    return row


def _subprocess_case(args: argparse.Namespace, name: str, size: int, mode: str, precision: str = "fp32") -> dict:
    batch = args.train_batch if mode == "train" else args.batch
    repeats = args.repeats if size < 1024 else max(1, args.repeats - 1) if size < 2048 else 1
    # Small cases need a few runs before a fresh process's heap stops page-faulting; large ones amortise it.
    warmup = args.warmup if size < 1024 else 1
    spec = dict(
        name=name,
        size=size,
        mode=mode,
        batch=batch,
        repeats=repeats,
        warmup=warmup,
        device=args.device,
        long_seconds=args.long_seconds,
        precision=precision,
        official_source=str(args.official_source) if args.official_source else None,
        compile=args.compile,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "rsvheat.apps.bench", "--case", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=args.case_timeout,
    )
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        return dict(model=name, size=size, mode=mode, precision=precision, batch=batch, error=error)
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: The CPU features that decide which kernels torch's CPU backend (oneDNN) runs, as /proc/cpuinfo names them.
ISA_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512-BF16", "avx512f": "AVX-512", "avx2": "AVX2"}


def machine_description(device: str, precisions: list[str] | tuple[str, ...] = ("fp32",)) -> str:
    """The machine a result was measured on: CPU model and its ISA (AMX, AVX-512-BF16, AVX-512, AVX2; Linux), threads,
    RAM, GPU, versions, device, precisions and date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in f)}
        cpu = fields["model name"]
        if not any(ch.isdigit() for ch in cpu) and "cpu family" in fields:  # a virtual CPU that hides its model
            cpu += f" family {fields['cpu family']} model {fields.get('model', '?')}"
        flags = set(fields.get("flags", "").split())
        isa = [name for flag, name in ISA_FLAGS.items() if flag in flags]
        cpu += f" ({', '.join(isa) if isa else 'none of AMX, AVX-512, AVX2'})"
    except (OSError, KeyError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads{mem}{gpu}; torch {torch.__version__}, Python "
        f"{platform.python_version()}; device {device}; {', '.join(precisions)}; {time.strftime('%Y-%m-%d')}"
    )


def write_results(out_dir: Path, name: str, rows: list[dict], report: list[str]) -> None:
    """A benchmark's results in ``out_dir``: ``rows`` as ``name.csv`` (the first row's keys as columns) and the
    ``report`` lines as ``name.md``, each written atomically."""

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / f"{name}.csv", write_csv)
    write_atomic(out_dir / f"{name}.md", lambda path: path.write_text("\n".join(report) + "\n"))


def _fit_exponent(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2:
        return None
    xs = [math.log(s * s) for s, _ in points]
    ys = [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def _value(rows: list[dict], model: str, size: int, mode: str, key: str) -> float | None:
    for r in rows:
        if r["model"] == model and r["size"] == size and r["mode"] == mode and not r.get("error"):
            value = r.get(key)
            return float(value) if value not in ("", None) else None
    return None


ANALYSIS_MARKER = "<!-- analysis: written by hand, kept when the benchmark is re-run -->"


#: The efficiency targets the report checks: ``(label, numerator model, denominator model or None, size, mode, key,
#: comparison, goal)``; the value is the numerator's measurement, divided by the denominator's when there is one.
TARGETS = [
    ("RS-vHeat-B inference at 1024², s", "rsvheat_base", None, 1024, "infer", "median_s", "≤", 4.5),
    ("speed-up over official_base at 1024²", "official_base", "rsvheat_base", 1024, "infer", "median_s", "≥", 1.6),
    ("speed-up over swin_base at 1024²", "swin_base", "rsvheat_base", 1024, "infer", "median_s", "≥", 1.0),
    ("speed-up over vit_base at 1024²", "vit_base", "rsvheat_base", 1024, "infer", "median_s", "≥", 1.0),
    ("speed-up over vit_base at 2048²", "vit_base", "rsvheat_base", 2048, "infer", "median_s", "≥", 3.0),
    *[
        (
            f"train activation memory at 1024² (batch {{train_batch}}), {ours} / {other}",
            ours,
            other,
            1024,
            "train",
            "activation_mb",
            "≤",
            0.5,
        )
        for ours in ("rsvheat_base", "rsvheat_base_gc")
        for other in ("swin_base", "vit_base")
    ],
]


#: the memory-saving setting judged by the targets: the first blocks recomputed, 2 of RS-vHeat-T's 12 (stage 1), 8 of
#: RS-vHeat-B's 24 (stages 1-2 and 4 of stage 3)
SAVING = {"tiny": "rsvheat_tiny_gc2", "base": "rsvheat_base_gc8"}


def _training_targets(scale: str) -> list[tuple]:
    """The training targets for ``scale`` (tiny, base) at 512² and 1024²: step time and activation memory
    against Swin of the same scale, and the memory-saving setting (:data:`SAVING`) at <= 0.5x Swin's memory for
    <= 15 % time."""
    ours, swin, saving = f"rsvheat_{scale}", f"swin_{scale}", SAVING[scale]
    memory, step = "activation_mb", "median_s"
    return [
        target
        for size in (512, 1024)
        for target in (
            (f"train step at {size}², speed-up over {swin}", swin, ours, size, "train", step, "≥", 1.0),
            (f"train activation memory at {size}², {ours} / {swin}", ours, swin, size, "train", memory, "≤", 0.8),
            (f"train activation memory at {size}², {saving} / {swin}", saving, swin, size, "train", memory, "≤", 0.5),
            (f"train step at {size}², time of {saving} / {ours}", saving, ours, size, "train", step, "≤", 1.15),
        )
    ]


#: The targets of training at high resolution, bf16 and the real official code, same format as :data:`TARGETS`;
#: training at batch ``--train-batch``. The CPU targets of every machine: inference at least 1.5x the official code
#: at 512² and 1024², a training step at 512² at least Swin-B's speed with at most 0.8x its peak memory growth.
TARGETS_F = [
    *_training_targets("base"),
    *_training_targets("tiny"),
    ("RS-vHeat-B inference at 1024², fp32, s", "rsvheat_base", None, 1024, "infer", "median_s", "≤", 5.5),
    ("RS-vHeat-B inference at 1024², bf16, s", "rsvheat_base (bf16)", None, 1024, "infer", "median_s", "≤", 3.5),
    *[
        (
            f"RS-vHeat-B bf16 output at {size}², relative error vs fp32",
            "rsvheat_base (bf16)",
            None,
            size,
            "infer",
            "rel_err_vs_fp32",
            "≤",
            0.01,
        )
        for size in (512, 1024)
    ],
    *[
        (
            f"speed-up over the official vHeat-B code at {size}²",
            "vheat_official_base",
            "rsvheat_base",
            size,
            "infer",
            "median_s",
            "≥",
            goal,
        )
        for size, goal in ((512, 1.5), (1024, 1.5))
    ],
    (
        "train memory growth at 512², rsvheat_base / swin_base",
        "rsvheat_base",
        "swin_base",
        512,
        "train",
        "memory_growth_mb",
        "≤",
        0.8,
    ),
    ("speed-up over vit_base at 2048²", "vit_base", "rsvheat_base", 2048, "infer", "median_s", "≥", 3.5),
    ("speed-up over swin_base at 2048²", "swin_base", "rsvheat_base", 2048, "infer", "median_s", "≥", 1.3),
]


def _cell(value: float | None, key: str, error: str) -> str:
    if value is None:
        return "error" if error else "—"
    return f"{value:.3f}" if key == "median_s" else f"{value:.0f}"


def _ordered_models(rows: list[dict]) -> list[str]:
    """The report names (:func:`_label`) that have rows, in :data:`ALL_MODELS` order, fp32 before bf16."""
    return [label for m in ALL_MODELS for p in PRECISIONS if any(r["model"] == (label := _label(m, p)) for r in rows)]


def _precision_table(rows: list[dict]) -> list[str]:
    """bf16 against fp32 for every (model, size, mode) measured in both: times, speed-up, output error."""
    lines = []
    for r in rows:
        if r.get("precision", "fp32") == "fp32" or r.get("error"):
            continue
        base = r["model"].removesuffix(f" ({r['precision']})")
        fp32 = _value(rows, base, r["size"], r["mode"], "median_s")
        if fp32 is None:
            continue
        reduced = float(r["median_s"])
        error = r.get("rel_err_vs_fp32")
        shown = f"{float(error):.2e}" if error not in ("", None) else "—"
        lines.append(
            f"| {base} | {r['size']}² | {r['mode']} | {r['precision']} | {fp32:.3f} | {reduced:.3f} | "
            f"{fp32 / reduced:.2f} | {shown} |"
        )
    if not lines:
        return []
    return [
        "## Reduced precision against fp32 (same model, same input; error = ‖out − out_fp32‖ / ‖out_fp32‖, inference)",
        "",
        "| model | size | mode | precision | fp32 s | reduced s | speed-up | rel. error |",
        "|---|---:|---|---|---:|---:|---:|---:|",
        *lines,
        "",
    ]


QUANTITY = {"median_s": "latency", "activation_mb": "activation memory", "memory_growth_mb": "memory growth"}


def _measurement_tables(rows: list[dict], models: list[str], sizes: list[int]) -> list[str]:
    lines = []
    for mode, key, unit in (
        ("infer", "median_s", "s"),
        ("train", "median_s", "s"),
        ("train", "activation_mb", "MB"),
        ("train", "memory_growth_mb", "MB"),
        ("infer", "memory_growth_mb", "MB"),
    ):
        if not any(r["mode"] == mode for r in rows):
            continue
        errors = {(r["model"], r["size"]): r["error"] for r in rows if r["mode"] == mode and r.get("error")}
        mode_sizes = [s for s in sizes if any(r["mode"] == mode and r["size"] == s for r in rows)]
        lines += [
            f"## {mode}: {QUANTITY[key]} ({unit})",
            "",
            "| model | " + " | ".join(f"{s}²" for s in mode_sizes) + " |",
            "|---|" + "---:|" * len(mode_sizes),
        ]
        for m in models:
            if not any(r["model"] == m and r["mode"] == mode for r in rows):
                continue  # a train-only or infer-only model in the other mode's table
            cells = [_cell(_value(rows, m, s, mode, key), key, errors.get((m, s), "")) for s in mode_sizes]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _ratio_table(rows: list[dict], models: list[str], sizes: list[int]) -> list[str]:
    lines = [
        "## Ratios: other model / RS-vHeat of the same scale (>1 means RS-vHeat is better)",
        "",
        "| model | vs | mode | quantity | " + " | ".join(f"{s}²" for s in sizes) + " |",
        "|---|---|---|---|" + "---:|" * len(sizes),
    ]
    pairs = [(_label(m, p), _label(ref, p)) for m, ref in SCALE.items() for p in PRECISIONS]
    for m, ref in pairs:
        if m not in models or ref not in models:
            continue
        for mode, key in (
            ("infer", "median_s"),
            ("train", "median_s"),
            ("train", "activation_mb"),
            ("train", "memory_growth_mb"),
        ):
            cells = []
            for s in sizes:
                a, b = _value(rows, m, s, mode, key), _value(rows, ref, s, mode, key)
                cells.append(f"{a / b:.2f}" if a and b else "—")
            if set(cells) == {"—"}:
                continue  # a pair never measured in this mode
            lines.append(f"| {m} | {ref} | {mode} | {QUANTITY[key]} | " + " | ".join(cells) + " |")
    return lines


def _growth_tables(rows: list[dict], models: list[str], sizes: list[int], gmac: dict) -> list[str]:
    lines = [
        "",
        "## GMACs (forward, batch 1)",
        "",
        "| model | " + " | ".join(f"{s}²" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{gmac[(m, s)]:.1f}" if (m, s) in gmac else "—" for s in sizes) + " |")
    lines += [
        "",
        "## Growth exponents (cost ∝ pixels^k, least squares over the sizes that ran)",
        "",
        "| model | latency k (infer) | GMACs k |",
        "|---|---:|---:|",
    ]
    for m in models:
        lat = _fit_exponent([(s, v) for s in sizes if (v := _value(rows, m, s, "infer", "median_s"))])
        flo = _fit_exponent([(s, gmac[(m, s)]) for s in sizes if (m, s) in gmac])
        lines.append(f"| {m} | {lat:.2f} | {flo:.2f} |" if lat and flo else f"| {m} | — | — |")
    return lines


def _target_lines(rows: list[dict], train_batch: int) -> list[str]:
    lines = []
    for title, targets in (
        ("inference and activation memory against attention", TARGETS),
        ("training, bf16, the official code", TARGETS_F),
    ):
        lines += ["", f"## Targets ({title})", ""]
        lines += _check_targets(rows, targets, train_batch)
    return lines


def _check_targets(rows: list[dict], targets: list[tuple], train_batch: int) -> list[str]:
    lines = []
    for label, model, reference, size, mode, key, comparison, goal in targets:
        value = _value(rows, model, size, mode, key)
        if reference is not None:
            denominator = _value(rows, reference, size, mode, key)
            value = value / denominator if value and denominator else None
        ok = None if value is None else (value <= goal if comparison == "≤" else value >= goal)
        shown = "not measured" if value is None else f"{value:.3g}" if key == "rel_err_vs_fp32" else f"{value:.2f}"
        verdict = "n/a" if ok is None else "MET" if ok else "MISSED"
        lines.append(f"- {label.format(train_batch=train_batch)}: {shown} (target {comparison} {goal}) — {verdict}")
    return lines


def write_report(rows: list[dict], args: argparse.Namespace, out: Path, gmac: dict) -> str:
    """``efficiency.md``: the measurements, ratios, counts, :data:`TARGETS` and :data:`TARGETS_F`; a hand-written
    analysis after :data:`ANALYSIS_MARKER` in an earlier report is kept. ``rows`` name models as the report does
    (:func:`_label`: precision other than fp32 in parentheses)."""
    models = _ordered_models(rows)
    sizes = sorted({r["size"] for r in rows})
    precisions = [p for p in PRECISIONS if any(r.get("precision", "fp32") == p for r in rows)] or ["fp32"]
    lines = [
        "# Efficiency benchmark",
        "",
        f"Machine: {machine_description(args.device, precisions)}.",
        "",
        f"Command: `rsvheat bench {' '.join(args.argv)}`. Infer batch {args.batch}, train batch "
        f"{args.train_batch}; median of the timed runs after {args.warmup} warm-up (count in the CSV; one run "
        f"at 2048², and a single run when the warm-up exceeds {args.long_seconds:.0f} s). Activation memory "
        "(train) = the bytes the forward pass leaves alive for the backward pass, counted per storage "
        "(`rsvheat.models.counting.activation_bytes`, exact and independent of the allocator); memory growth = "
        "peak RSS of the case's own process minus its RSS after building the model (activations, gradients, "
        "workspace, and the heap glibc keeps). GMACs: matmul + conv, batch 1. `official_*`: our re-expression "
        "of the official vHeat computation structure; `vheat_official_*`: the official vHeat code itself "
        "(`--official-source`), folded by its `infer_init()`; `_gc`: gradient checkpointing (each block "
        "recomputed in the backward pass), `_gcN`: the first N blocks recomputed. "
        + ("Every model compiled with `torch.compile` (`--compile`). " if args.compile else "Eager mode. ")
        + ("CPU only here: GPU figures are not measured." if args.device == "cpu" else ""),
        "",
        *_measurement_tables(rows, models, sizes),
        *_precision_table(rows),
        *_ratio_table(rows, models, sizes),
        *_growth_tables(rows, models, sizes, gmac),
        *_target_lines(rows, args.train_batch),
        "",
    ]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["## Cases that did not run", ""]
        lines += [f"- {r['model']} {r['size']}² {r['mode']}: {r['error']}" for r in errors] + [""]
    text = "\n".join(lines)
    path = out / "efficiency.md"
    # The analysis of missed targets is written by hand; a re-run keeps it.
    if path.exists() and ANALYSIS_MARKER in (previous := path.read_text()):
        text += "\n" + previous[previous.index(ANALYSIS_MARKER) :]
    write_atomic(path, lambda tmp: tmp.write_text(text))
    return text


def plot(rows: list[dict], gmac: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for m in _ordered_models(rows):
        base = m.split(" ")[0]
        style = "-" if base in OURS else "--" if base in OFFICIAL or base in OFFICIAL_SOURCE else ":"
        lat = sorted(
            (r["size"], float(r["median_s"]))
            for r in rows
            if r["model"] == m and r["mode"] == "infer" and not r.get("error")
        )
        if lat:
            k = _fit_exponent(lat)
            axes[0].plot(
                [s * s for s, _ in lat], [v for _, v in lat], style, marker="o", label=f"{m} (k={k:.2f})" if k else m
            )
        flo = sorted((s, v) for (mm, s), v in gmac.items() if mm == m)
        if flo:
            k = _fit_exponent(flo)
            axes[1].plot(
                [s * s for s, _ in flo], [v for _, v in flo], style, marker="o", label=f"{m} (k={k:.2f})" if k else m
            )
    for ax, title in zip(axes, ("inference latency (s), batch 1", "GMACs, batch 1"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels per image")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("cost vs image size (k: fitted exponent, cost ∝ pixels^k)")
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rsvheat bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  rsvheat bench --quick -o /tmp/bench\n"
        "  rsvheat bench --models rsvheat_base swin_base --sizes 512 1024 --modes infer --precision fp32 bf16\n"
        "  rsvheat bench --models rsvheat_base vheat_official_base --modes infer "
        "--official-source PATH/TO/vHeat/classification/models/vHeat.py",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=ALL_MODELS,
        help="default: all (the vheat_official_* ones only with --official-source)",
    )
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=[224, 512, 1024, 2048], help="square input sizes for inference"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["infer", "train"],
        choices=["infer", "train"],
        help="infer (eval, folded) and/or train (forward, backward, optimizer step)",
    )
    parser.add_argument(
        "--train-sizes",
        nargs="+",
        type=int,
        default=[224, 512, 1024],
        help="sizes for the train mode (2048² training of the attention baselines needs >24 GB)",
    )
    parser.add_argument("--batch", type=int, default=1, help="inference batch")
    parser.add_argument("--train-batch", type=int, default=2, help="training batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (one fewer at 1024², one at 2048²)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up runs below 1024² (one from 1024² on)")
    parser.add_argument("--long-seconds", type=float, default=60.0, help="warm-up this slow: no further runs")
    parser.add_argument("--case-timeout", type=float, default=1800.0, help="seconds before a case is abandoned")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=PRECISIONS,
        help="forward precisions: fp32 and/or bf16 (bfloat16 autocast, spectral transforms in float32); a bf16 "
        "inference row reports its output's relative error against fp32",
    )
    parser.add_argument(
        "--official-source",
        type=Path,
        default=None,
        help="the official vHeat source file (classification/models/vHeat.py of the official repository; needs "
        "einops and timm): adds vheat_official_tiny/base, the official code folded by its infer_init()",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if present)",
    )
    parser.add_argument(
        "-o",
        "--out",
        "--out-dir",
        dest="out_dir",
        type=Path,
        default=Path("benchmarks/results"),
        help="folder of efficiency.{csv,md,png} (default benchmarks/results; --out-dir is the old spelling)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run every model through torch.compile (fullgraph for rsvheat's; compiled in the first warm-up run, "
        "which is then not timed)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models at 224² only, one timed run")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: the benchmark runs on cpu or cuda")
    if args.device == "cuda":
        from rsvheat.inference.tasks import resolve_device

        resolve_device("cuda")  # a machine without a GPU: one line now, not a result file full of errors
    if args.case:
        spec = json.loads(args.case)
        print(json.dumps(run_case(**spec)))
        return
    if args.models is None:
        args.models = [m for m in ALL_MODELS if args.official_source or m not in OFFICIAL_SOURCE]
    if args.quick:
        args.models = ["rsvheat_tiny", "official_tiny", "swin_tiny", "vit_small"]
        args.models += ["vheat_official_tiny"] if args.official_source else []
        args.sizes, args.train_sizes, args.repeats = [224], [224], 1
    if args.official_source is not None:
        from rsvheat.testing.official_source import import_official

        import_official(args.official_source)  # a missing file or module is reported now, not once per case
    elif any(m in OFFICIAL_SOURCE for m in args.models):
        parser.error("the vheat_official_* models are built from the official source: pass --official-source")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cases = [
        (m, s, mode, p)
        for mode in args.modes
        for s in args.sizes
        for m in args.models
        for p in args.precision
        if (mode == "infer" and m not in TRAIN_ONLY)
        or (mode == "train" and s in args.train_sizes and m not in INFER_ONLY)
    ]
    rows = []
    for i, (m, s, mode, p) in enumerate(cases, 1):
        row = _subprocess_case(args, m, s, mode, p)
        rows.append(row)
        memory = f"{row['activation_mb']:.0f} MB activations, " if row.get("activation_mb") else ""
        shown = row.get("error") or f"{row['median_s']:.3f} s, {memory}{row['memory_growth_mb']:.0f} MB growth"
        print(f"[{i}/{len(cases)}] {m:19s} {s:5d} {mode:5s} {p:4s} {shown}", flush=True)
    gmac = {}
    # the official code's counts equal its re-expression's (official_*), which runs on the meta device
    for m in [m for m in args.models if m not in TRAIN_ONLY and m not in OFFICIAL_SOURCE]:
        for s in args.sizes:
            try:
                gmac[(m, s)] = gmacs(m, s)
            except Exception as err:  # a baseline that cannot take this size on the meta device
                print(f"GMACs of {m} at {s}: {err}")
    for row in rows:
        row["gmacs"] = round(gmac.get((row["model"], row["size"]), float("nan")), 2)
    fields = [
        "model",
        "size",
        "mode",
        "precision",
        "batch",
        "median_s",
        "throughput_img_s",
        "repeats",
        "peak_rss_mb",
        "activation_mb",
        "memory_growth_mb",
        "peak_cuda_mb",
        "gmacs",
        "rel_err_vs_fp32",
        "error",
    ]
    with open(args.out_dir / "efficiency.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown_rows = [{**r, "model": _label(r["model"], r.get("precision", "fp32"))} for r in rows]
    print(write_report(shown_rows, args, args.out_dir, gmac))
    plot(shown_rows, gmac, args.out_dir)
    print(f"wrote {args.out_dir}/efficiency.{{csv,md,png}}")


if __name__ == "__main__":
    main()
