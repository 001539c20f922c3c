"""Fine-tuned task checkpoints applied to whole scenes: ``rsvheat predict-scene``.

A checkpoint written by ``rsvheat fit`` carries what inference needs besides the weights (``checkpoint["rsvheat"]``):
the task class, the per-band normalisation statistics of its training data, and the class names.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rsvheat.files import refuse_existing
from rsvheat.inference.scene import GDAL_CACHE_MB, Input, Scene, dense_strips, detect_scene, write_dense, write_geojson


def load_task(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """The task module of ``checkpoint`` in eval mode on ``device``, and its ``rsvheat`` metadata (task, stats,
    classes). The backbone is rebuilt from the stored hyper-parameters, without reading the original ``weights``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    meta = ckpt.get("rsvheat")
    if not meta or not meta.get("stats"):
        raise ValueError(
            f"{path} is not a task checkpoint of `rsvheat fit` with normalisation statistics (no 'rsvheat' entry)"
        )
    module, name = meta["task"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    hparams["weights"] = None  # the state dict below holds the fine-tuned weights
    task = cls(**hparams)
    task.load_state_dict(ckpt["state_dict"])
    return task.eval().to(device), meta


def predict_scene(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    output: str | Path,
    probabilities: str | Path | None = None,
    bands: Sequence[Sequence[int] | None] | None = None,
    tile: int = 512,
    overlap: int = 128,
    batch_size: int = 4,
    device: str = "auto",
    overwrite: bool = False,
    cog: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Run a fine-tuned task over whole rasters and write georeferenced results.

    * segmentation: ``images`` = one raster per stem, in the model's modality order (e.g. optical, SAR); ``output``
      a class map (uint8, nodata 255); ``probabilities`` (optional) per-class probabilities (float32, nodata -1).
    * change detection: ``images`` = before, after (same grid); ``output`` 0 = unchanged, 1 = changed, 255 = nodata;
      ``probabilities`` the change probability.
    * detection: ``images`` = one raster; ``output`` a GeoJSON of boxes (per-class NMS across tiles).
    """
    import rasterio

    from rsvheat.trainers import ChangeDetectionTask, DetectionTask, SegmentationTask

    for path in (output, probabilities):
        if path is not None:
            refuse_existing(path, overwrite)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    task, meta = load_task(checkpoint, device)
    modalities = task.modalities
    images = [Path(p) for p in images]
    bands = list(bands) if bands is not None else [None] * len(images)
    if len(bands) != len(images):
        raise ValueError(f"{len(bands)} band selections for {len(images)} images")

    def spec(roles: list[str], modality_of) -> dict[str, Input]:
        if len(images) != len(roles):
            wanted = f"{len(roles)} image(s) ({', '.join(roles)})"
            raise ValueError(f"{type(task).__name__} takes {wanted}, got {len(images)}")
        return {
            role: Input(p, modality_of(role), tuple(b) if b else None)
            for role, p, b in zip(roles, images, bands, strict=True)
        }

    only = next(iter(modalities))
    if isinstance(task, SegmentationTask):
        inputs = spec(list(modalities), lambda role: role)

        def predict(batch):
            return task.model(batch[only] if len(batch) == 1 else batch).softmax(1)

        outputs, names = task.hparams.num_classes, meta.get("classes")

        def encode(values: np.ndarray) -> np.ndarray:
            return values.argmax(0)[None].astype(np.uint8)

    elif isinstance(task, ChangeDetectionTask):
        inputs = spec(["before", "after"], lambda role: only)

        def predict(batch):
            return task.model(batch["before"], batch["after"]).sigmoid()

        outputs, names = 1, ["change"]
        threshold = task.hparams.threshold

        def encode(values: np.ndarray) -> np.ndarray:
            return (values > threshold).astype(np.uint8)

    elif isinstance(task, DetectionTask):
        if probabilities is not None:
            raise ValueError(f"{checkpoint} is a detection model: it writes boxes only, drop --probabilities")
        inputs = spec([only], lambda role: only)
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), Scene(inputs, modalities, meta["stats"]) as scene:
            found = detect_scene(scene, task.model, tile, overlap, batch_size, device=device, progress=progress)
            return [write_geojson(scene, found, list(meta["classes"]), output, overwrite)]
    else:
        raise ValueError(f"predict-scene does not handle {type(task).__name__}")

    targets = [(Path(output), encode, 1, "uint8", 255, None)]
    if probabilities is not None:
        targets.append((Path(probabilities), lambda v: v, outputs, "float32", -1.0, names))
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), Scene(inputs, modalities, meta["stats"]) as scene:
        strips = dense_strips(scene, predict, outputs, tile, overlap, batch_size, device, progress)
        return write_dense(scene, strips, targets, overwrite=overwrite, cog=cog)
