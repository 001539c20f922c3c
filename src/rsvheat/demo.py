"""``rsvheat demo``: the backbone end to end on a real scene, in about a minute on a 2-core CPU.

1. reads a georeferenced raster (default: the embedded CC0 Landsat-7 scene), normalises each band over its valid
   (non-nodata) pixels;
2. runs RS-vHeat on the whole scene at its native, non-multiple-of-32 size, unfolded and inference-folded, and checks
   that both give the same features;
3. draws the per-stage feature fields over the image;
4. counts parameters and GMACs in both conventions and compares them with the published numbers;
5. times the backbone against the official computation structure;
6. writes ``report.md`` with the PNGs.

No weights ship with rsvheat (none are published with a licence that allows it): the backbone is randomly
initialised unless ``--weights`` points at a checkpoint (official or ours).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import rsvheat
from rsvheat.data import read_raster, sample_scene_path
from rsvheat.models.counting import count_gmacs, count_params
from rsvheat.testing.official_structure import OfficialStructureHeat

PUBLISHED = {  # (variant, size): (M params, G MACs), inference-folded; see README "Counting"
    ("vheat_tiny", 224): (29.56, 4.59),
    ("vheat_base", 224): (87.50, 14.93),
    ("rsvheat_base", 1024): (148.4, 336.8),
}


def normalise_bands(image: np.ndarray, nodata: float | None) -> tuple[torch.Tensor, np.ndarray]:
    """``(C, H, W)`` array -> float tensor with zero mean / unit std per band over valid pixels; and the valid mask."""
    valid = np.ones(image.shape[1:], bool) if nodata is None else (image != nodata).any(0)
    pixels = image[:, valid].astype(np.float64)
    mean, std = pixels.mean(1), pixels.std(1) + 1e-6
    out = (image.astype(np.float64) - mean[:, None, None]) / std[:, None, None]
    out[:, ~valid] = 0.0
    return torch.from_numpy(out).float(), valid


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _field_png(image: np.ndarray, feats: list[torch.Tensor], valid: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = image[:3].transpose(1, 2, 0).astype(np.float64)
    rgb = (rgb - rgb[valid].min()) / max(np.ptp(rgb[valid]), 1e-6)
    fig, axes = plt.subplots(1, len(feats) + 1, figsize=(4 * (len(feats) + 1), 4))
    axes[0].imshow(rgb.clip(0, 1))
    axes[0].set_title("input")
    for i, (ax, feat) in enumerate(zip(axes[1:], feats, strict=True)):
        field = feat[0].abs().mean(0)
        field = torch.nn.functional.interpolate(field[None, None], size=image.shape[1:], mode="bilinear")[0, 0]
        field = field.numpy()
        field = (field - field[valid].min()) / max(np.ptp(field[valid]), 1e-6)
        ax.imshow(rgb.clip(0, 1))
        ax.imshow(np.where(valid, field, np.nan), cmap="jet", alpha=0.5)
        ax.set_title(f"stage {i + 1} ({tuple(feat.shape[-2:])})")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_demo(
    out_dir: Path,
    image_path: Path | None = None,
    variant: str = "rsvheat_tiny",
    weights: Path | None = None,
    bench_size: int = 512,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = image_path or sample_scene_path()
    image, profile = read_raster(image_path)
    x, valid = normalise_bands(image, profile.get("nodata"))
    bands, height, width = x.shape
    lines = [
        f"# rsvheat demo ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Scene: `{image_path.name}`, {bands} bands, {width} x {height} px, CRS {profile.get('crs')}.",
        "",
    ]

    model = rsvheat.create_model(variant, num_classes=0, modalities={"optical": bands, "sar": 1}, feature_norms=True)
    if weights is not None:
        rsvheat.load_checkpoint(model, weights)
        lines.append(f"Weights: `{weights}`.")
    else:
        lines.append("Weights: random initialisation (no pretrained weights are bundled; see README).")
    model.eval()
    with torch.enable_grad():  # grad mode: every filter recomputed from FVE and to_k
        unfolded = [f.detach() for f in model.forward_intermediates(x[None], norm=True, intermediates_only=True)]
    start = time.perf_counter()
    model.fold((height, width))
    with torch.inference_mode():
        folded = model.forward_intermediates(x[None], norm=True, intermediates_only=True)
    seconds = time.perf_counter() - start
    diff = max(float((a - b).abs().max()) for a, b in zip(unfolded, folded, strict=True))
    _field_png(image, folded, valid, out_dir / "feature_fields.png")
    lines += [
        "",
        "## Backbone on the whole scene",
        "",
        f"`{variant}`, folded inference at {width} x {height} (not a multiple of 32): {seconds:.2f} s; "
        f"per-stage features {[tuple(f.shape[1:]) for f in folded]}.",
        f"Folded vs unfolded features: max |difference| = {diff:.1e}.",
        "",
        "![feature fields](feature_fields.png)",
        "",
        "Channel-mean |feature| per stage (normalised, over the image). With random weights this shows how "
        "the architecture spreads information, not learned semantics.",
        "",
    ]
    print(f"[1/3] whole-scene inference {seconds:.2f} s, folded == unfolded (max diff {diff:.1e})")

    lines += [
        "## Counting (inference-folded, the papers' convention)",
        "",
        "| model | input | M params | published | G MACs | published |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (name, size), (p_pub, g_pub) in PUBLISHED.items():
        m = rsvheat.create_model(name, num_classes=1000 if size == 224 else 0, img_size=size)
        params = count_params(m, (size, size))["folded"] / 1e6
        gmacs = count_gmacs(m, (size, size), folded=True)
        lines.append(f"| {name} | {size}² | {params:.2f} | {p_pub} | {gmacs:.2f} | {g_pub} |")
        print(f"[2/3] {name} @ {size}: {params:.2f} M params (published {p_pub}), {gmacs:.2f} GMACs ({g_pub})")
        del m

    cfg = rsvheat.VARIANTS[variant]
    ours = rsvheat.create_model(variant, num_classes=0, img_size=bench_size).fold((bench_size, bench_size))
    official = OfficialStructureHeat(
        cfg["depths"], cfg["dims"], bench_size, cfg["post_norm"], cfg["layer_scale"], cfg["use_sce"], 0
    ).fold()
    sample = torch.randn(1, 3, bench_size, bench_size)
    with torch.inference_mode():
        t_ours = _median_seconds(lambda: ours(sample))
        t_official = _median_seconds(lambda: official(sample))
    lines += [
        "",
        "## Speed (inference, batch 1, float32, this machine)",
        "",
        "| model | input | median s | speed-up |",
        "|---|---|---:|---:|",
        f"| official computation structure | {bench_size}² | {t_official:.3f} | 1.00 |",
        f"| rsvheat `{variant}` | {bench_size}² | {t_ours:.3f} | {t_official / t_ours:.2f} |",
        "",
        "Full benchmark (Swin, ViT, 224-2048 px, training memory): `rsvheat bench`, results in "
        "`benchmarks/results/efficiency.md`.",
        "",
    ]
    print(
        f"[3/3] {bench_size}²: rsvheat {t_ours:.3f} s vs official structure {t_official:.3f} s "
        f"({t_official / t_ours:.2f}x)"
    )
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    print(f"report: {report}")
    return report
