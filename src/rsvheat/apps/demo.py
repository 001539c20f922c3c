"""``rsvheat demo``: the whole of rsvheat on one real scene, in a few minutes on a 2-core CPU.

1. data: land-cover tiles cut from the scene (default: the embedded CC0 Landsat-7 scene; the labels are a k-means
   clustering of its pixels into dark land, shallow water and cloud), or your own segmentation folders;
2. self-supervised pre-training of the encoder on crops of the scene (frequency-domain masking, L_spa + L_fre +
   L_con), exported as ``encoder.safetensors``;
3. fine-tuning UPerNet segmentation from that encoder, and its test scores;
4. tiled inference over the whole scene, written as a georeferenced Cloud Optimized GeoTIFF;
5. heat maps of the fine-tuned backbone on the scene;
6. efficiency: folded == unfolded inference (on the scene's central window of at most 512² px), parameters/GMACs
   against the papers, speed against the official computation structure;
7. ``report.md`` with every figure, number and the configs used (``configs/``), so each step can be re-run alone.

The output folder gets a ``.rsvheat-demo`` marker file. A re-run into a marked folder replaces the demo's own
subfolders; a non-empty folder without the marker is refused unless ``overwrite`` (``rsvheat demo --out .`` in a
repository would otherwise replace its ``configs/``). A large ``--image`` is labelled (k-means) on a decimated overview
of at most 1024 px a side, so every step takes bounded memory.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import yaml

import rsvheat
from rsvheat.data import sample_scene_path
from rsvheat.files import claim_folder, write_atomic
from rsvheat.models.counting import count_gmacs, count_params
from rsvheat.progress import step_header
from rsvheat.testing.official_structure import OfficialStructureHeat

PUBLISHED = {  # (variant, size): (M params, G MACs), inference-folded; see docs/counting.md
    ("vheat_tiny", 224): (29.56, 4.59),
    ("vheat_base", 224): (87.50, 14.93),
    ("rsvheat_base", 1024): (148.4, 336.8),
}
COLOURS = np.array([[40, 40, 40], [0, 150, 200], [240, 200, 40], [220, 120, 0], [60, 170, 60], [200, 0, 200]])

#: Marks a folder as written by the demo: only such a folder (or an empty one) is reused without ``overwrite``.
MARKER = ".rsvheat-demo"  # what claim_folder(..., "demo", ...) writes
#: The subfolders a run replaces.
OWNED = ("data", "configs", "pretrain", "finetune", "scene", "heat_maps")
#: Largest side of the image the land-cover labels are clustered from (larger scenes: a decimated overview).
LABEL_MAX_SIDE = 1024
#: Largest side of the window on which folded and unfolded inference are compared.
FOLD_CHECK_SIDE = 512
#: Fine-tuning epochs between validations and checkpoints.
FINETUNE_INTERVAL = 3
#: The steps run_demo times (data, pre-training, fine-tuning, whole scene, heat maps, efficiency).
DEMO_STEPS = 6


def _claim(out_dir: Path, overwrite: bool) -> None:
    """Make ``out_dir`` the demo's (see :func:`rsvheat.files.claim_folder`): its :data:`OWNED` subfolders are
    replaced, nothing else in it is touched."""
    claim_folder(out_dir, "demo", OWNED, overwrite)


def _labelling_image(scene: Path, folder: Path, max_side: int = LABEL_MAX_SIDE) -> Path:
    """``scene`` if no side exceeds ``max_side``, else a decimated overview of its first three bands (GeoTIFF in
    ``folder``, on the coarser grid): the k-means labelling reads its whole input, so a large scene is read through
    rasterio's ``out_shape`` instead."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine

    from rsvheat.data.io import open_raster, quiet_georeferencing

    with open_raster(scene, "scene") as src:
        if max(src.height, src.width) <= max_side:
            return scene
        scale = max_side / max(src.height, src.width)
        shape = (max(1, round(src.height * scale)), max(1, round(src.width * scale)))
        bands = list(range(1, min(src.count, 3) + 1))
        data = src.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.average)
        profile = {
            "driver": "GTiff",
            "count": len(bands),
            "height": shape[0],
            "width": shape[1],
            "dtype": data.dtype.name,
            "crs": src.crs,
            "transform": src.transform @ Affine.scale(src.width / shape[1], src.height / shape[0]),
            "nodata": src.nodata,
        }

    def write(tmp: Path) -> None:
        with quiet_georeferencing(), rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)

    return write_atomic(Path(folder) / f"{scene.stem}_overview.tif", write)


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _write_config(path: Path, config: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _trainer(root: Path, **kwargs) -> dict:
    return {
        "default_root_dir": str(root),
        "accelerator": "auto",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 5,
        **kwargs,
    }


def _last_metrics(root: Path, prefix: str) -> dict[str, float]:
    files = sorted(root.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    values: dict[str, float] = {}
    if not files:
        return values
    newest = files[-1]
    for row in csv.DictReader(newest.open()):
        values.update({k: float(v) for k, v in row.items() if k.startswith(prefix) and v})
    return values


def _map_png(scene: Path, classes_tif: Path, names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from rsvheat.data.io import open_raster
    from rsvheat.explain import _overview

    with open_raster(classes_tif, "map") as src:
        scale = min(1.0, 768 / max(src.height, src.width))
        shape = (round(src.height * scale), round(src.width * scale))
        labels = src.read(1, out_shape=shape)
    rgb, _ = _overview(scene, None, shape)
    coloured = np.full((*shape, 3), 0.9)
    for k in range(len(names)):
        coloured[labels == k] = COLOURS[k % len(COLOURS)] / 255
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    axes[0].imshow(rgb)
    axes[0].set_title("scene")
    axes[1].imshow(coloured)
    axes[1].set_title("predicted land cover (grey: no data)")
    axes[1].legend(
        handles=[Patch(color=COLOURS[k % len(COLOURS)] / 255, label=n) for k, n in enumerate(names)],
        loc="lower left",
        fontsize=8,
    )
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


_T = TypeVar("_T")


def _set_by(value: _T | None, step: str) -> _T:
    """``value``, which the demo step ``step`` sets; an error if that step has not run."""
    if value is None:
        raise RuntimeError(f"the demo's {step} step has not run")
    return value


@dataclass
class Demo:
    """One demo run: its settings (given) and what each step measured (filled in by the steps, read by the report)."""

    out_dir: Path
    scene: Path
    variant: str
    weights: Path | None
    bench_size: int
    train_root: Path | None
    num_classes: int | None
    pretrain_steps: int
    epochs: int
    bands: int = 3
    height: int = 0
    width: int = 0
    names: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    best: Path | None = None
    classes_tif: Path | None = None
    heat: dict[str, Path] = field(default_factory=dict)
    fold_diff: float = float("nan")
    fold_window: tuple[int, int] = (0, 0)
    counts: list[tuple] = field(default_factory=list)
    speed: tuple[float, float] = (float("nan"), float("nan"))  # seconds: official structure, ours
    progress: bool = True  # a step header (i/N, elapsed) on stderr before each step, when it is a terminal
    started: float = field(default_factory=time.perf_counter)
    step_index: int = 0

    @property
    def band_list(self) -> list[int]:
        return list(range(1, self.bands + 1))

    @property
    def finetune_interval(self) -> int:
        return min(FINETUNE_INTERVAL, self.epochs)

    def timed(self, name: str, step) -> None:
        self.step_index += 1
        step_header(self.step_index, DEMO_STEPS, name, self.started, "[demo]", self.progress)
        start = time.perf_counter()
        step()
        self.timings[name] = time.perf_counter() - start
        print(f"[demo] {name}: {self.timings[name]:.1f} s", flush=True)

    # 1. data ----------------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Land-cover tiles cut from the scene (unless the user gave ``train_root``), and the scene for pre-training."""
        from rsvheat.apps.samples import write_segmentation

        if self.train_root is None:
            self.train_root = self.out_dir / "data/segmentation"
            overview = _labelling_image(self.scene, self.out_dir / "data")
            self.names = write_segmentation(self.train_root, tile=96, stride=96, scene=overview)
            self.num_classes = len(self.names)
        else:
            if self.num_classes is None:
                raise ValueError("a train_root needs num_classes")
            self.names = [str(k) for k in range(self.num_classes)]
        pretrain_dir = self.out_dir / "data/pretrain"
        pretrain_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(self.scene, pretrain_dir / self.scene.name)
        except OSError:
            shutil.copy(self.scene, pretrain_dir / self.scene.name)

    # 2. pre-training --------------------------------------------------------------------------------------------------
    def pretrain(self) -> None:
        """Frequency-masked pre-training on crops of the scene, unless the user gave an encoder."""
        from rsvheat.trainers.pretrain import pretrain_cli

        if self.weights is not None:
            return
        steps = self.pretrain_steps
        config = {
            "seed_everything": 0,
            # the official clip; model.lr is the rate at a batch of 256, scaled by sqrt(6 / 256) to 1.5e-4 here
            "trainer": _trainer(
                self.out_dir / "pretrain",
                max_steps=steps,
                log_every_n_steps=max(1, min(5, steps)),
                gradient_clip_val=5.0,
            ),
            "model": {
                "variant": self.variant,
                "lr": 1e-3,
                "warmup_fraction": 0.1,
                "drop_path_rate": 0.0,
            },
            "data": {
                "optical_dirs": [str(self.out_dir / "data/pretrain")],
                "optical_bands": self.band_list,
                "modalities": {"optical": self.bands},
                "crop_size": 96,
                "batch_size": 6,
                "num_workers": 0,
                "repeat": 200,
            },
            "checkpoint": {"every_n_train_steps": steps},
            "previews": {"every_n_steps": steps},
        }
        pretrain_cli(["--config", _write_config(self.out_dir / "configs/pretrain.yaml", config)])
        self.weights = max((self.out_dir / "pretrain").rglob("encoder.safetensors"), key=lambda p: p.stat().st_mtime)
        self.losses = _last_metrics(self.out_dir / "pretrain", "train/")

    # 3. fine-tuning ---------------------------------------------------------------------------------------------------
    def finetune(self) -> None:
        """UPerNet land-cover segmentation from the encoder; its test scores on the held-out tiles."""
        from rsvheat.trainers.cli import task_cli

        root = Path(_set_by(self.train_root, "data"))
        model = {
            "num_classes": self.num_classes,
            "classes": self.names,
            "backbone": self.variant,
            "weights": str(self.weights),
            "modalities": {"optical": self.bands},
            "img_size": 96,
            "drop_path_rate": 0.0,
            "decoder_width": 64,
            "eval_tile": 96,
            "eval_overlap": 32,
            "lr": 1e-3,
            "layer_decay": 1.0,
        }
        data = {
            "train_root": str(root / "train"),
            "val_root": str(root / "val"),
            "test_root": str(root / "val"),
            "num_classes": self.num_classes,
            "channels": {"optical": self.bands},
            "bands": {"optical": self.band_list},
            "crop_size": 64,
            "batch_size": 8,
            "num_workers": 0,
        }
        # an epoch is a few steps here and a checkpoint (weights and AdamW's moments) ~370 MB: saved every epoch,
        # checkpoints took a third of the fine-tuning's time
        interval = self.finetune_interval
        config = {
            "seed_everything": 0,
            "trainer": _trainer(self.out_dir / "finetune", max_epochs=self.epochs, check_val_every_n_epoch=interval),
            "model": {"class_path": "rsvheat.trainers.SegmentationTask", "init_args": model},
            "data": {"class_path": "rsvheat.datamodules.SegmentationDataModule", "init_args": data},
            "checkpoint": {"every_n_epochs": interval},
        }
        path = _write_config(self.out_dir / "configs/segmentation.yaml", config)
        task_cli(["fit", "--config", path])
        task_cli(["test", "--config", path, "--ckpt_path", "best"])
        self.scores = _last_metrics(self.out_dir / "finetune", "test/")
        self.best = self.out_dir / "finetune/checkpoints/best.ckpt"

    # 4. whole-scene inference -----------------------------------------------------------------------------------------
    def map_scene(self) -> None:
        from rsvheat.inference.tasks import predict_scene

        self.classes_tif = self.out_dir / "scene/land_cover.tif"
        best = _set_by(self.best, "fine-tuning")
        predict_scene(
            best, [self.scene], self.classes_tif, bands=[self.band_list], tile=256, overlap=64, progress=False
        )
        _map_png(self.scene, self.classes_tif, self.names, self.out_dir / "scene/land_cover.png")

    # 5. heat maps -----------------------------------------------------------------------------------------------------
    @functools.cached_property
    def fine_tuned(self) -> tuple:
        """The fine-tuned task module and its metadata, as ``predict-scene`` loads them."""
        from rsvheat.inference.tasks import load_task

        return load_task(_set_by(self.best, "fine-tuning"))

    def draw_heat_maps(self) -> None:
        from rsvheat.explain import explain_scene

        task, meta = self.fine_tuned
        stats = meta["stats"]["optical"]
        out = self.out_dir / "heat_maps"
        self.heat = explain_scene(task.backbone, self.scene, out, "optical", stats, self.band_list, progress=False)

    # 6. efficiency ----------------------------------------------------------------------------------------------------
    def measure_efficiency(self) -> None:
        task, meta = self.fine_tuned
        self.fold_diff, self.fold_window = self._fold_check(task.backbone, meta["stats"]["optical"])
        self.counts = _published_counts()
        self.speed = _speed_against_official(self.variant, self.bench_size)

    def _fold_check(self, backbone, stats: dict) -> tuple[float, tuple[int, int]]:
        """Largest |folded - unfolded| of the backbone's stages on the scene's central window (fixed size: the check's
        memory must not grow with the scene)."""
        from rsvheat.inference.scene import Input, Scene

        check_h, check_w = min(FOLD_CHECK_SIDE, self.height), min(FOLD_CHECK_SIDE, self.width)
        optical = Input(self.scene, "optical", tuple(self.band_list))
        with Scene({"optical": optical}, backbone.modalities, {"optical": stats}) as reader:
            window, _ = reader.read((self.height - check_h) // 2, (self.width - check_w) // 2, check_h, check_w)
        x = torch.from_numpy(window["optical"])[None]
        with torch.no_grad():
            unfolded = backbone.eval().unfold().forward_intermediates(x, intermediates_only=True)  # computed filters
            backbone.fold((check_h, check_w))  # filters precomputed for this size
            folded = backbone.forward_intermediates(x, intermediates_only=True)
        return max(float((a - b).abs().max()) for a, b in zip(unfolded, folded, strict=True)), (check_w, check_h)


def _published_counts() -> list[tuple[str, int, float, float, float, float]]:
    """``(variant, size, M params, published, G MACs, published)`` of the models the papers count."""
    counts = []
    for (name, size), (p_pub, g_pub) in PUBLISHED.items():
        with torch.device("meta"):  # shapes only, as `rsvheat info` counts
            m = rsvheat.create_model(name, num_classes=1000 if size == 224 else 0, img_size=size)
        params = count_params(m, (size, size))["folded"] / 1e6
        counts.append((name, size, params, p_pub, count_gmacs(m, (size, size), folded=True), g_pub))
    return counts


def _speed_against_official(variant: str, size: int) -> tuple[float, float]:
    """Median seconds of one folded forward pass at ``size``²: the official computation structure, and ours."""
    cfg = rsvheat.VARIANTS[variant]
    ours = rsvheat.create_model(variant, num_classes=0, img_size=size).fold((size, size))
    official = OfficialStructureHeat(
        cfg["depths"], cfg["dims"], size, cfg["post_norm"], cfg["layer_scale"], cfg["use_sce"], 0
    ).fold()
    sample = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        return _median_seconds(lambda: official(sample)), _median_seconds(lambda: ours(sample))


def render_report(demo: Demo, total: float) -> str:
    """``report.md`` of a finished run: every figure and number, linked relative to its folder."""
    rel = functools.partial(os.path.relpath, start=demo.out_dir)
    t_official, t_ours = demo.speed
    if demo.losses:
        terms = ", ".join(
            f"{k.removeprefix('train/')} {v:.3f}" for k, v in sorted(demo.losses.items()) if k.count("/") == 1
        )
        con = demo.losses.get("train/con")
        chance = f" (the view InfoNCE against chance, ln 6 = {math.log(6):.2f})" if con is not None else ""
        pretraining = (
            f"{demo.pretrain_steps} steps of the view contrast on two augmented views of 96² crops of the scene (the "
            f"encoder sees each view's low frequency band); last logged losses: {terms}{chance}. Encoder: "
            f"`{rel(demo.weights)}`.\n\n"
            "What this pre-training did to the fine-tuned result compared with fine-tuning from random weights: too "
            f"short to tell. {demo.pretrain_steps} steps on crops of one scene are far below the budget at which the "
            "repository's transfer experiment measures that comparison on real labels "
            "(`benchmarks/results/transfer.md`: k-NN, linear probe and fine-tuning, pre-trained vs random "
            "initialisation, three seeds), and the labels below are pixel clusters, which a model from random "
            "weights learns as easily: the score shows that the pipeline runs, not what pre-training buys."
        )
    else:
        pretraining = f"Skipped: fine-tuning starts from `{demo.weights}`."
    scores = ", ".join(f"{k.removeprefix('test/')} {v:.3f}" for k, v in sorted(demo.scores.items()) if "loss" not in k)
    classes, heat_dir = rel(demo.classes_tif), rel(demo.out_dir / "heat_maps")
    check_w, check_h = demo.fold_window
    lines = [
        f"# rsvheat demo ({time.strftime('%Y-%m-%d %H:%M')}, {total / 60:.1f} min)",
        "",
        f"Scene: `{demo.scene.name}`, {demo.width} × {demo.height} px, bands 1-{demo.bands}. Model: `{demo.variant}`. "
        "Configs of every step: [`configs/`](configs).",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in demo.timings.items()],
        "",
        "## 1-2. Pre-training",
        "",
        pretraining,
        "",
        "## 3. Fine-tuning (UPerNet land-cover segmentation)",
        "",
        f"{demo.epochs} epochs on `{demo.train_root}` ({', '.join(demo.names)}); test on its `val` tiles: {scores}. "
        f"Checkpoint: `{rel(demo.best)}` (the best of the validations every {demo.finetune_interval} epochs).",
        "",
        "The default labels are a k-means clustering of the scene's pixels (a real scene, labels made without a "
        "human): the numbers show the pipeline end to end, not a benchmark.",
        "",
        "## 4. Whole-scene inference",
        "",
        f"`rsvheat predict-scene` over all {demo.width} × {demo.height} px in 256² tiles (overlap 64, blended): "
        f"[`{classes}`]({classes}), a Cloud Optimized GeoTIFF with the scene's CRS and transform, 255 where the scene "
        "has no data.",
        "",
        f"![land cover]({rel(demo.out_dir / 'scene/land_cover.png')})",
        "",
        "## 5. Heat maps",
        "",
        "Per stage (last block): the SCE-corrected input, the heat source u, the field after conduction, the source "
        f"spectrum and the learned k·t spectrum (`rsvheat explain`); every block in [`{heat_dir}`]({heat_dir}).",
        "",
        f"![heat maps]({rel(demo.heat['summary'])})",
        "",
        "## 6. Efficiency",
        "",
        f"Folded (inference) vs unfolded backbone on the central {check_w} × {check_h} window of the scene: "
        f"max |difference| = {demo.fold_diff:.1e}.",
        "",
        "| model | input | M params | published | G MACs | published |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {n} | {s}² | {p:.2f} | {pp} | {g:.2f} | {gp} |" for n, s, p, pp, g, gp in demo.counts],
        "",
        "| inference, batch 1, float32, this machine | input | median s | speed-up |",
        "|---|---|---:|---:|",
        f"| official computation structure | {demo.bench_size}² | {t_official:.3f} | 1.00 |",
        f"| rsvheat `{demo.variant}` | {demo.bench_size}² | {t_ours:.3f} | {t_official / t_ours:.2f} |",
        "",
        "The full comparison with Swin and ViT from 224² to 2048² (`rsvheat bench`) is in the repository's "
        "`benchmarks/results/efficiency.md`.",
        "",
    ]
    return "\n".join(lines)


def run_demo(
    out_dir: Path,
    image_path: Path | None = None,
    variant: str = "rsvheat_tiny",
    weights: Path | None = None,
    bench_size: int = 512,
    train_root: Path | None = None,
    num_classes: int | None = None,
    pretrain_steps: int = 120,
    epochs: int = 12,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run the pipeline above into ``out_dir`` and return the report's path.

    ``image_path``: the scene (pre-training crops, whole-scene inference, heat maps); ``train_root``: your own
    segmentation data (``train``/``val`` folders with ``images``/``masks``; docs/fine-tuning.md) with
    ``num_classes``;
    ``weights``: an encoder to fine-tune instead of pre-training one; ``overwrite``: use a non-empty ``out_dir``
    that an earlier demo did not write; ``progress``: a header line (step i/N, elapsed time) before each step, on
    stderr when it is a terminal. Every setting is checked before anything is written.
    """
    from rsvheat.data.io import image_header

    started = time.perf_counter()
    if min(pretrain_steps, epochs) < 1 or bench_size < rsvheat.STRIDE:
        raise ValueError(
            f"pretrain_steps and epochs must be >= 1 and bench_size >= {rsvheat.STRIDE}, "
            f"got {pretrain_steps}, {epochs}, {bench_size}"
        )
    if train_root is not None and num_classes is None:
        raise ValueError("--train-root needs --num-classes")
    if train_root is not None:  # checked now, not after minutes of pre-training
        missing = [f"{Path(train_root) / split / part}" for split in ("train", "val") for part in ("images", "masks")]
        missing = [m for m in missing if not Path(m).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"--train-root {train_root}: no {', '.join(missing)} (expected train/ and val/ with images/ and masks/)"
            )
    scene = Path(image_path or sample_scene_path()).resolve()
    bands, height, width = image_header(scene)  # a missing or unreadable scene fails before anything is written
    demo = Demo(Path(out_dir), scene, variant, weights, bench_size, train_root, num_classes, pretrain_steps, epochs)
    demo.bands, demo.height, demo.width = min(bands, 3), height, width
    demo.progress, demo.started = progress, started
    _claim(demo.out_dir, overwrite)
    demo.timed("data", demo.prepare_data)
    demo.timed("pre-training", demo.pretrain)
    demo.timed("fine-tuning", demo.finetune)
    demo.timed("whole-scene inference", demo.map_scene)
    demo.timed("heat maps", demo.draw_heat_maps)
    demo.timed("efficiency", demo.measure_efficiency)
    total = time.perf_counter() - started
    report = write_atomic(demo.out_dir / "report.md", lambda tmp: tmp.write_text(render_report(demo, total)))
    print(f"[demo] done in {total / 60:.1f} min; report: {report}")
    return report
