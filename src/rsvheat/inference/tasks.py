"""Fine-tuned task checkpoints applied to whole scenes: ``rsvheat predict-scene``.

A checkpoint written by ``rsvheat fit`` carries what inference needs besides the weights (``checkpoint["rsvheat"]``):
the task and its spec, the per-band normalisation statistics of its training data, and the class names. The task's
spec (:mod:`rsvheat.models.contract`) says which rasters it reads and what it writes; no Lightning is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rsvheat.data.io import image_header
from rsvheat.files import check_output, refuse_existing, refuse_inputs_as_outputs
from rsvheat.inference.scene import (
    GDAL_CACHE_MB,
    Input,
    MapTarget,
    Scene,
    check_geojson,
    check_tile,
    class_legend,
    dense_strips,
    detect_scene,
    write_box_json,
    write_dense,
    write_geojson,
)
from rsvheat.models.contract import ServedTask, load_task
from rsvheat.models.precision import autocast, check_precision, compile_in_place, low_precision_weights

#: Output names by format: the model decides the format, the name must agree.
TIFF, GEOJSON = (".tif", ".tiff"), (".geojson", ".json")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against what this
    machine has: an unknown or absent device is a ``ValueError`` that says which ones exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no CUDA GPU is available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine (use cpu or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


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
    precision: str = "fp32",
    score_threshold: float | None = None,
    compile: bool | str = False,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> list[Path]:
    """Run a fine-tuned task over whole rasters and write georeferenced results.

    * segmentation: ``images`` = one raster per stem, in the model's modality order (e.g. optical, SAR); ``output``
      a class map (uint8, nodata 255); ``probabilities`` (optional) per-class probabilities (float32, nodata -1).
    * change detection: ``images`` = before, after (same grid); ``output`` 0 = unchanged, 1 = changed, 255 = nodata;
      ``probabilities`` the change probability.
    * detection: ``images`` = one raster; ``output`` a GeoJSON of boxes (per-class NMS across tiles);
      ``score_threshold`` keeps the boxes scoring at least this much (default: the model's ``box_score_thresh``, lower
      it for a young model that finds nothing).

    A scene whose band statistics are far from the training statistics (other units or scaling) is reported in a
    warning before the run (:meth:`Scene.check_statistics`).

    ``precision``: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast of the model's forward passes on ``device``, spectral
    transforms in float32; :mod:`rsvheat.models.precision`). Probabilities are written as float32 either way.
    ``compile``: the network through ``torch.compile`` (``True``: inductor, with the weights frozen into the graph;
    or a backend's name), compiled on the first batch of tiles; worth it for large scenes.
    ``normalisation``: ``(mean, std)`` of the input bands, required for a TorchGeo checkpoint (which stores none, see
    :func:`~rsvheat.models.contract.load_task`), replacing the stored statistics of a one-stem rsvheat checkpoint.
    """
    paths = [Path(p) for p in images]
    band_lists = list(bands) if bands is not None else [None] * len(paths)
    check_precision(precision)
    _check_request(checkpoint, paths, band_lists, output, probabilities, tile, overlap, batch_size, overwrite)
    target = resolve_device(device)
    task, meta = load_task(checkpoint, target, normalisation)
    compile_in_place(task.model, compile, dynamic=False, frozen=True)
    return map_scene(
        task,
        meta,
        paths,
        output,
        probabilities,
        band_lists,
        tile,
        overlap,
        batch_size,
        target,
        overwrite=overwrite,
        cog=cog,
        progress=progress,
        precision=precision,
        checkpoint=checkpoint,
        score_threshold=score_threshold,
    )


def map_scene(
    task: ServedTask,
    meta: dict,
    images: Sequence[str | Path],
    output: str | Path,
    probabilities: str | Path | None = None,
    bands: Sequence[Sequence[int] | None] | None = None,
    tile: int = 512,
    overlap: int = 128,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    cog: bool = True,
    progress: bool = True,
    precision: str = "fp32",
    checkpoint: str | Path | None = None,
    score_threshold: float | None = None,
) -> list[Path]:
    """:func:`predict_scene` with the task already loaded (``task, meta = load_task(...)`` on ``device``), so that
    one process maps many scenes with one read of the checkpoint (:mod:`rsvheat.inference.batch`). The request is
    checked as :func:`predict_scene` checks it; ``checkpoint`` (optional) names the model in messages and is never
    accepted as an output."""
    import rasterio

    paths = [Path(p) for p in images]
    band_lists = list(bands) if bands is not None else [None] * len(paths)
    check_precision(precision)
    # cheap (headers only), and the rasters of a batch are not checked before its first scene starts
    _check_request(checkpoint, paths, band_lists, output, probabilities, tile, overlap, batch_size, overwrite)
    device = torch.device(device)
    source = checkpoint if checkpoint is not None else "the model"
    detection = task.spec.output == "boxes"
    if not detection and task.spec.dense is None:
        raise ValueError(f"{source} is a {task.name}: predict-scene maps segmentation, change and detection models")
    suffixes, kind = (
        (GEOJSON, "boxes (GeoJSON, or JSON in pixels)") if detection else (TIFF, f"the {task.name} map (a GeoTIFF)")
    )
    check_output(output, overwrite, suffixes, kind)
    if detection and probabilities is not None:
        raise ValueError(f"{source} is a detection model: it writes boxes only, drop --probabilities")
    set_score_threshold(task, score_threshold, source)
    if not meta.get("stats"):
        raise ValueError(
            f"{source} stores no input normalisation (a TorchGeo checkpoint: its data module normalised the "
            "images): give the mean and std it applied, e.g. --mean 0 --std 255"
        )
    inputs = _scene_inputs(task, paths, band_lists)
    with (
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
        Scene(inputs, task.modalities, meta["stats"]) as scene,
        low_precision_weights(task.model, precision),  # bf16: the weights cast once for all tiles
    ):
        scene.check_statistics()  # a scene in other units than the training data: say so before the long run
        if detection:
            geojson = Path(output).suffix.lower() == ".geojson"
            if geojson:
                check_geojson(scene)  # before the work: a scene without CRS has no lon/lat to give
            found = detect_scene(
                scene,
                _at_precision(task.model, precision, device),
                tile,
                overlap,
                batch_size,
                device=device,  # after iou_threshold: by keyword
                progress=progress,
            )
            write = write_geojson if geojson else write_box_json
            return [write(scene, found, list(meta["classes"]), output, overwrite)]
        predict, outputs, names, encode, legend = _dense_head(task, meta)
        targets: list[MapTarget] = [(Path(output), encode, 1, "uint8", 255, None, legend)]
        if probabilities is not None:
            targets.append((Path(probabilities), lambda v: v, outputs, "float32", -1.0, names, None))
        predict = _at_precision(predict, precision, device)
        strips = dense_strips(scene, predict, outputs, tile, overlap, batch_size, device, progress)
        return write_dense(scene, strips, targets, overwrite=overwrite, cog=cog, progress=progress)


def set_score_threshold(task: ServedTask, score_threshold: float | None, source: str | Path = "the model") -> None:
    """Make a detection ``task`` keep the boxes scoring at least ``score_threshold`` (``None``: its trained
    ``box_score_thresh``; set on every call, so an earlier call's value never lingers). Other tasks take ``None``
    only."""
    if task.spec.output != "boxes":
        if score_threshold is not None:
            raise ValueError(f"{source} is a {task.name}: --score-threshold applies to detection models")
        return
    if score_threshold is not None and not 0 <= score_threshold <= 1:
        raise ValueError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    # torchvision drops the boxes below it inside the detector
    trained = task.hparams["box_score_thresh"]
    task.model.roi_heads.score_thresh = trained if score_threshold is None else score_threshold  # type: ignore[union-attr]


def _at_precision(predict, precision: str, device: torch.device):
    """``predict`` run under :func:`~rsvheat.models.precision.autocast`, entered per call so that it covers the
    model's forward passes only, never the blending and writing around them."""

    def run(*args):
        with autocast(precision, device):
            return predict(*args)

    return run


def _check_request(checkpoint, images, bands, output, probabilities, tile, overlap, batch_size, overwrite) -> None:
    """Everything about a ``predict_scene`` call that can be checked before the model is loaded: option values,
    output names, and that every raster exists and can be read."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    check_tile(tile, "--tile")
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap ({overlap}) must be in [0, tile) with tile = {tile}")
    if len(bands) != len(images):
        raise ValueError(
            f"give one band selection per image: {len(images)} image(s), {len(bands)} selection(s) "
            "(e.g. --bands 3,2,1 1 for an optical and a SAR raster)"
        )
    refuse_existing(output, overwrite)
    if probabilities is not None:
        check_output(probabilities, overwrite, TIFF, "probabilities (a GeoTIFF)")
    refuse_inputs_as_outputs([output, probabilities], [p for p in (checkpoint, *images) if p is not None])
    for image in images:  # a bad raster is named before the (possibly large) checkpoint is read
        image_header(image)


def _scene_inputs(task: ServedTask, images: list[Path], bands: list) -> dict[str, Input]:
    """``{role: Input}`` of the rasters a task reads, in its spec's order (one per stem for segmentation,
    ``before``/``after`` for change detection, one image for detection)."""
    roles = task.spec.roles(task.modalities)
    if len(images) != len(roles):
        wanted = f"{len(roles)} image(s) ({', '.join(roles)})"
        raise ValueError(f"{task.name} takes {wanted}, got {len(images)}")
    return {
        role: Input(path, modality, tuple(b) if b else None)
        for (role, modality), path, b in zip(roles.items(), images, bands, strict=True)
    }


def _dense_head(task: ServedTask, meta: dict):
    """``(predict, outputs, names, encode, legend)`` of a dense task: ``predict({role: (B, C, t, t)}) -> (B, outputs,
    t, t)`` probabilities, the band names of the probability map, ``encode`` from blended probabilities
    ``(outputs, rows, W)`` to the class/change map ``(1, rows, W)``, and the class map's colours and class names."""
    dense = task.spec.dense

    def predict(batch):
        return dense(task.model, batch)

    if task.spec.output == "change_map":
        threshold = task.hparams["threshold"]

        def encode_change(values: np.ndarray) -> np.ndarray:
            return (values > threshold).astype(np.uint8)

        return predict, 1, ["change"], encode_change, [("unchanged", (0, 0, 0)), ("changed", (255, 255, 255))]

    def encode(values: np.ndarray) -> np.ndarray:
        return values.argmax(0)[None].astype(np.uint8)

    num_classes = task.hparams["num_classes"]
    names = meta.get("classes") or [str(i) for i in range(num_classes)]
    return predict, num_classes, meta.get("classes"), encode, class_legend(list(names))
