"""Whole-scene inference on georeferenced rasters of any size, in bounded memory.

The scene is read in strips of ``tile`` rows (rasterio windowed reads). Each strip is cut into overlapping tiles that
are predicted in batches and blended with the weights of :mod:`rsvheat.models.sliding`; rows that no later strip
touches are final and are written out at once. Memory therefore grows with ``tile × scene width``, never with the
scene's height or area. Maps are written as tiled, compressed GeoTIFFs (converted to Cloud Optimized GeoTIFF when
GDAL has the COG driver) with the input's CRS and transform; boxes as GeoJSON in longitude/latitude (with each box
also in the scene's CRS). Outputs are written to temporary files in the destination folder and renamed only once all
of them are complete, so a crash or a full disk never leaves a half-written result under a final name, nor a new
class map next to the probabilities of an older run.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import torch

from rsvheat import STRIDE
from rsvheat.data.io import ImageReadError, check_band_selection, open_raster, quiet_georeferencing
from rsvheat.files import refuse_existing, staged_outputs, write_atomic
from rsvheat.models.sliding import blend_weights, window_grid
from rsvheat.progress import bar as progress_bar

if TYPE_CHECKING:
    from rasterio.io import DatasetReader

#: GDAL's block cache for whole-scene runs (MB). Its default, 5 % of RAM, would grow with the scene's width as
#: partly written output blocks pile up; the strips are written in order, so a small cache costs nothing.
GDAL_CACHE_MB = 128

#: Smallest tile the backbone accepts: its four stages downsample by ``STRIDE`` in total.
MIN_TILE = STRIDE


@dataclass(frozen=True)
class Input:
    """One raster of a scene: ``path`` read through the stem of ``modality`` (bands ``bands``, 1-based, or all)."""

    path: Path
    modality: str
    bands: tuple[int, ...] | None = None


class Scene:
    """Co-registered rasters read window by window: ``{role: Input}`` (roles: the modality names for segmentation,
    ``before``/``after`` for change detection). Checks that they share size, CRS and transform, that each has the
    bands its stem expects, and that the scene is at least :data:`MIN_TILE` pixels on each side; a raster without CRS
    is accepted with a warning (outputs then have none either, but keep its transform if it has one), unless
    ``georeferenced_outputs`` is false (outputs that are not maps, such as figures)."""

    def __init__(
        self,
        inputs: Mapping[str, Input],
        channels: Mapping[str, int],
        stats: Mapping[str, Mapping],
        georeferenced_outputs: bool = True,
    ) -> None:
        self.inputs = dict(inputs)
        self._stack = ExitStack()
        self.sources: dict[str, DatasetReader] = {}
        try:
            self._open_and_check(channels)
        except BaseException:
            self.close()  # the rasters opened before the problem was found
            raise
        first = next(iter(self.sources.values()))
        if georeferenced_outputs and self.crs is None:  # figures (heat maps) lose nothing without a CRS
            if self.transform.is_identity:
                warnings.warn(f"{first.name} is not georeferenced: the outputs will have no CRS", stacklevel=2)
            else:
                warnings.warn(
                    f"{first.name} has a transform but no CRS: the outputs keep the transform and have no CRS",
                    stacklevel=2,
                )
        self.stats = {
            role: (
                np.asarray(stats[item.modality]["mean"], np.float32)[:, None, None],
                np.asarray(stats[item.modality]["std"], np.float32)[:, None, None],
            )
            for role, item in self.inputs.items()
        }

    def _open_and_check(self, channels: Mapping[str, int]) -> None:
        for role, item in self.inputs.items():
            src = self._stack.enter_context(open_raster(item.path, f"{role} raster"))
            self.sources[role] = src
            count = len(item.bands) if item.bands else src.count
            check_band_selection(item.path, item.bands, src.count)
            if count != channels[item.modality]:
                raise ImageReadError(
                    f"{item.path}: {count} band(s), the model's {item.modality} stem takes {channels[item.modality]}"
                    " (select bands with --bands)"
                )
        first_role, first = next(iter(self.sources.items()))
        for role, src in self.sources.items():
            if (src.height, src.width) != (first.height, first.width):
                raise ImageReadError(
                    f"{first_role} and {role} rasters differ in size: {first.name} is {first.height}×{first.width}, "
                    f"{src.name} is {src.height}×{src.width} (resample one onto the other's grid first)"
                )
            if src.crs != first.crs:
                raise ImageReadError(
                    f"{first_role} and {role} rasters are in different CRS: {first.name} is {first.crs}, "
                    f"{src.name} is {src.crs} (reproject one onto the other's grid first, e.g. gdalwarp)"
                )
            if not src.transform.almost_equals(first.transform):
                raise ImageReadError(
                    f"{first_role} and {role} rasters are on different grids (same size and CRS, different "
                    f"transform): {first.name} vs {src.name}"
                )
        self.height, self.width = first.height, first.width
        self.crs, self.transform = first.crs, first.transform
        #: the raster(s) in error messages
        self.name = ", ".join(src.name for src in self.sources.values())
        if min(self.height, self.width) < MIN_TILE:
            raise ImageReadError(
                f"{self.name} is {self.height}×{self.width} px: the model needs at least {MIN_TILE} px on each side "
                "(its output stride)"
            )

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, top: int, left: int, height: int, width: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Normalised ``{role: (C, h, w)}`` float32 and the valid-pixel mask ``(h, w)``: False where any raster has
        nodata (its nodata value, alpha band or mask) or a non-finite value. Invalid pixels read as 0 (the mean)."""
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        window = Window(left, top, width, height)
        arrays, valid = {}, np.ones((height, width), bool)
        for role, src in self.sources.items():
            given = self.inputs[role].bands
            bands = list(given) if given else None
            try:
                data = src.read(bands, window=window).astype(np.float32, copy=False)
                valid &= src.dataset_mask(window=window) > 0
            except RasterioError as err:
                raise ImageReadError(f"cannot read {src.name} at rows {top}-{top + height}: {err}") from err
            valid &= np.isfinite(data).all(0)
            mean, std = self.stats[role]
            data = (data - mean) / std
            data[:, ~valid] = 0.0
            arrays[role] = data
        for data in arrays.values():
            data[:, ~valid] = 0.0  # a pixel missing in one raster is missing in all
        return arrays, valid

    def band_statistics(self, max_side: int = 1024) -> dict[str, tuple[np.ndarray, ...]]:
        """``{role: (mean (C,), std (C,), 1st percentile (C,), 99th percentile (C,))}`` of the raw bands (before
        normalisation) over the valid pixels of a decimated read (nearest neighbour, at most ``max_side`` px a side:
        a few MB whatever the scene's size). A role without a valid pixel is left out."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError

        scale = min(1.0, max_side / max(self.height, self.width))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        found: dict[str, tuple[np.ndarray, ...]] = {}
        for role, src in self.sources.items():
            given = self.inputs[role].bands
            bands = list(given) if given else list(range(1, src.count + 1))
            try:
                data = src.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
                mask = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest)
            except RasterioError as err:  # GDAL's "Read failed" names no file
                raise ImageReadError(f"cannot read {src.name} (truncated or corrupt?): {err}") from err
            data = data.astype(np.float64)
            valid = (mask > 0) & np.isfinite(data).all(0)
            if valid.any():
                pixels = data[:, valid]
                low, high = np.percentile(pixels, (1, 99), axis=1)
                found[role] = (pixels.mean(1), pixels.std(1), low, high)
        return found

    def check_statistics(self, max_z: float = 3.0, max_ratio: float = 10.0, max_tail_z: float = 4.0) -> str | None:
        """Warn (once, naming the raster and the band furthest off) when the input's statistics are far outside the
        training statistics it is normalised with: a band mean more than ``max_z`` training standard deviations from
        the training mean, a standard deviation more than ``max_ratio`` times larger or smaller than the training
        one (a uint16 scene under a model trained on uint8 images; reflectance scaled by 10 000 or not), or a 1st or
        99th percentile more than ``max_tail_z`` training standard deviations out (a percent of the pixels where the
        training data had almost none: uint8 data read as int8, whose bright half wraps to negative values). The
        model would then see inputs it never saw and write a degenerate map. Returns the warning's text, or
        ``None``."""
        worst, offending = None, 0
        for role, (mean, std, low, high) in self.band_statistics().items():
            train_mean, train_std = (v.reshape(-1).astype(np.float64) for v in self.stats[role])
            spread = np.maximum(train_std, 1e-12)
            z = np.abs(mean - train_mean) / spread
            ratio = np.maximum(std, 1e-12) / spread
            tail = np.maximum(train_mean - low, high - train_mean) / spread
            # one score per band: how many "tolerances" it is off, on the mean, the spread and the tails
            score = np.maximum.reduce([z / max_z, np.abs(np.log(ratio)) / np.log(max_ratio), tail / max_tail_z])
            offending += int((score > 1).sum())
            band = int(score.argmax())
            if score[band] > 1 and (worst is None or score[band] > worst[0]):
                worst = (
                    score[band],
                    role,
                    band,
                    mean[band],
                    std[band],
                    train_mean[band],
                    train_std[band],
                    low[band],
                    high[band],
                )
        if worst is None:
            return None
        _, role, band, mean, std, train_mean, train_std, low, high = worst
        given = self.inputs[role].bands
        number = given[band] if given else band + 1
        others = f" ({offending - 1} other band(s) too)" if offending > 1 else ""
        message = (
            f"{self.sources[role].name}: band {number} has mean {mean:.4g}, std {std:.4g}, 1-99 % range {low:.4g} to "
            f"{high:.4g} (decimated read), far from "
            f"the training statistics the model normalises it with (mean {train_mean:.4g}, std {train_std:.4g})"
            f"{others}: the map may be degenerate. Is the scene in the units and scaling of the training data "
            "(e.g. uint16 reflectance vs uint8 images)?"
        )
        warnings.warn(message, stacklevel=2)
        return message


def check_tile(tile: int, name: str | Path) -> None:
    """A tile must hold at least one output cell of the backbone; ``name``: the raster, for the message."""
    if tile < MIN_TILE:
        raise ValueError(f"{name}: tile ({tile}) is smaller than the model's output stride ({MIN_TILE} pixels)")


#: Host bytes per pixel of a tile in a CPU forward pass: a generous bound on the live activations (the widest stage's
#: maps and its spectral buffers); on a GPU the activations are in device memory and only the strips count here.
FORWARD_BYTES_PER_PIXEL = 512


def check_memory(
    name: str | Path, tile: tuple[int, int], width: int, channels: int, batch_size: int, device: torch.device | str
) -> None:
    """Refuse, before anything is allocated, a tile whose strip buffers (``tile rows x scene width``, inputs and
    outputs in float32) and, on the CPU, forward activations would not fit in the memory available now."""
    th, tw = tile
    need = 4 * th * width * (channels + 2)
    if torch.device(device).type == "cpu":
        need += batch_size * th * tw * FORWARD_BYTES_PER_PIXEL
    available = psutil.virtual_memory().available
    if need > available:
        raise ValueError(
            f"{name}: a {th}×{tw} tile (batch {batch_size}) over this {width} px wide scene needs about "
            f"{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available: use a smaller --tile "
            "(or --batch-size)"
        )


def _windows(scene: Scene, tile: int, overlap: int, outputs: int, batch_size: int, device) -> tuple:
    check_tile(tile, scene.name)
    th, tw, overlap, ys, xs = window_grid(scene.height, scene.width, tile, overlap)
    channels = sum(scene.sources[role].count for role in scene.inputs) + outputs
    check_memory(scene.name, (th, tw), scene.width, channels, batch_size, device)
    return th, tw, overlap, ys, xs


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _to_batch(arrays: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
    return {role: torch.from_numpy(np.stack([a[role] for a in arrays])).to(device) for role in arrays[0]}


def dense_strips(
    scene: Scene,
    predict: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    outputs: int,
    tile: int = 512,
    overlap: int = 128,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(top, values (outputs, rows, W), valid (rows, W))`` for consecutive row blocks covering the scene,
    where ``values`` blends ``predict({role: (B, C, t, t)}) -> (B, outputs, t, t)`` over overlapping tiles. Tiles
    without a single valid pixel are not predicted."""
    device = torch.device(device)
    th, tw, overlap, ys, xs = _windows(scene, tile, overlap, outputs, batch_size, device)
    width = scene.width
    acc = np.zeros((outputs, th, width), np.float32)
    norm = np.zeros((th, width), np.float32)
    wx = [blend_weights(tw, x, width, overlap).numpy() for x in xs]
    bar = progress_bar(total=len(ys) * len(xs), desc="tiles", unit="tile", progress=progress)
    try:
        for i, top in enumerate(ys):
            strip, valid = scene.read(top, 0, th, width)
            wy = blend_weights(th, top, scene.height, overlap).numpy()
            tiles = [(x, w) for x, w in zip(xs, wx, strict=True) if valid[:, x : x + tw].any()]
            for chunk in _batches(tiles, batch_size):
                batch = _to_batch([{r: a[:, :, x : x + tw] for r, a in strip.items()} for x, _ in chunk], device)
                with torch.inference_mode():
                    out = predict(batch).float().cpu().numpy()
                for (x, w), pred in zip(chunk, out, strict=True):
                    weight = wy[:, None] * w[None, :]
                    acc[:, :, x : x + tw] += pred * weight
                    norm[:, x : x + tw] += weight
            bar.update(len(xs))
            # rows above the next strip are final; the rows it overlaps are carried over
            done = (ys[i + 1] - top) if i + 1 < len(ys) else th
            covered = norm[:done] > 0
            yield top, acc[:, :done] / np.where(covered, norm[:done], 1.0), valid[:done] & covered
            keep = th - done
            acc[:, :keep], norm[:keep] = acc[:, done:].copy(), norm[done:].copy()
            acc[:, keep:], norm[keep:] = 0.0, 0.0
    finally:
        bar.close()


def _has_driver(name: str) -> bool:
    import rasterio

    with rasterio.Env() as env:
        return name in env.drivers()


#: A class map's legend: ``(class name, (r, g, b))`` of class ids 0, 1, ... in order.
Legend = list[tuple[str, tuple[int, int, int]]]

#: One map written from the blended values: ``(path, encode(values) -> (bands, rows, W), bands, dtype, nodata,
#: band descriptions or None, legend or None)``; a ``legend`` (:data:`Legend`) marks a class map.
MapTarget = tuple[Path, Callable[[np.ndarray], np.ndarray], int, str, float, list[str] | None, Legend | None]

#: Colours of class ids 0..19 (matplotlib's qualitative "tab20", in an order that keeps neighbours distinct); later
#: ids repeat them.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


def class_legend(names: list[str]) -> Legend:
    """A legend of ``names`` (class ids 0..K-1) in :data:`CLASS_COLOURS`."""
    return [(name, CLASS_COLOURS[i % len(CLASS_COLOURS)]) for i, name in enumerate(names)]


def write_legend(dst, legend: Legend, nodata: float) -> None:
    """Band 1 of ``dst`` (an open uint8 GeoTIFF) as a paletted class map: the colour table of ``legend`` (nodata
    transparent), so that GIS software draws the classes without a style; and the class names as band tags
    (``CLASS_NAMES``: a JSON list; ``CLASS_<id>``: one name each), which survive the COG conversion (GDAL keeps
    category names only in a side-car .aux.xml file, which the outputs do not have)."""
    colours = {i: (*rgb, 255) for i, (_, rgb) in enumerate(legend)}
    colours[int(nodata)] = (0, 0, 0, 0)
    dst.write_colormap(1, colours)
    names = [name for name, _ in legend]
    dst.update_tags(1, CLASS_NAMES=json.dumps(names), **{f"CLASS_{i}": name for i, name in enumerate(names)})


def _profile(scene: Scene, target: MapTarget) -> dict:
    """Tiled, deflate-compressed GeoTIFF on the scene's grid for one output map."""
    bands, dtype, nodata = target[2:5]
    profile = {
        "driver": "GTiff",
        "count": bands,
        "height": scene.height,
        "width": scene.width,
        "dtype": dtype,
        "nodata": nodata,
        "compress": "deflate",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "BIGTIFF": "IF_SAFER",
    }
    if scene.crs is not None:
        profile["crs"] = scene.crs
    if scene.crs is not None or not scene.transform.is_identity:
        profile["transform"] = scene.transform  # a grid without CRS is still a grid: keep it
    return profile


def write_dense(
    scene: Scene,
    strips: Iterator[tuple[int, np.ndarray, np.ndarray]],
    targets: list[MapTarget],
    overwrite: bool = False,
    cog: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Write each target's ``encode(values)`` of every strip into its GeoTIFF (``nodata`` where the input is invalid),
    all from one pass over the scene; tiled and deflate-compressed, converted to COG when ``cog`` and GDAL has the
    driver. The files appear under their names only when all of them are complete, together (with ``overwrite``,
    replacing the old ones together: a failure leaves the old set, never a mix). ``progress``: a bar over the COG
    conversion (in pixels, so its ETA holds across outputs of different sizes), on stderr when it is a terminal."""
    import rasterio
    from rasterio.windows import Window

    paths = [Path(t[0]) for t in targets]
    for path in paths:
        refuse_existing(path, overwrite)
    convert = cog and _has_driver("COG")
    with staged_outputs(paths, overwrite) as temporaries, quiet_georeferencing():
        # without COG the tiled GeoTIFF is the output; with it, the scratch file beside it is converted at the end
        plain = [t.with_name(f"plain-{t.name}") if convert else t for t in temporaries]
        with ExitStack() as stack:
            outs = [
                stack.enter_context(rasterio.open(tmp, "w", **_profile(scene, target)))
                for tmp, target in zip(plain, targets, strict=True)
            ]
            for top, values, valid in strips:
                for dst, (_, encode, _, dtype, nodata, *_) in zip(outs, targets, strict=True):
                    out = encode(values).astype(dtype, copy=False)
                    out[:, ~valid] = nodata
                    dst.write(out, window=Window(0, top, scene.width, out.shape[1]))
            for dst, target in zip(outs, targets, strict=True):
                for i, name in enumerate(target[5] or [], start=1):
                    dst.set_band_description(i, name)
                if target[6]:
                    write_legend(dst, target[6], target[4])
        if convert:
            from rasterio.shutil import copy as raster_copy

            # GDAL's copy reports nothing while it runs (rasterio passes no callback): the bar advances per output,
            # weighted by its pixels x bands, which is what the conversion's time follows
            sizes = [scene.width * scene.height * t[2] for t in targets]
            with progress_bar(total=sum(sizes), desc="COG", unit="px", unit_scale=True, progress=progress) as cog_bar:
                for source, tmp, target, size in zip(plain, temporaries, targets, sizes, strict=True):
                    # class ids: the most frequent class of the pixels an overview pixel covers, never an average
                    resampling = "MODE" if np.issubdtype(np.dtype(target[3]), np.integer) else "AVERAGE"
                    cog_bar.set_postfix_str(Path(target[0]).name)
                    raster_copy(source, tmp, driver="COG", compress="DEFLATE", overview_resampling=resampling)
                    cog_bar.update(size)
    return paths


def detect_scene(
    scene: Scene,
    detect: Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]],
    tile: int = 800,
    overlap: int = 200,
    batch_size: int = 2,
    iou_threshold: float = 0.5,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Boxes over the whole scene: ``detect([(C, t, t), ...]) -> [{boxes, labels, scores}]`` on overlapping tiles,
    shifted to scene pixels, boxes centred on nodata dropped, duplicates across tiles removed by per-class NMS and,
    for boxes cut by a tile edge, by containment in a larger box of the same class (see :func:`_partial_views`).
    Returns ``{boxes (N, 4) xyxy pixels, labels (N,), scores (N,)}`` sorted by score."""
    from torchvision.ops import batched_nms

    device = torch.device(device)
    th, tw, overlap, ys, xs = _windows(scene, tile, overlap, 0, batch_size, device)
    (role,) = scene.inputs
    found: dict[str, list[torch.Tensor]] = {"boxes": [], "labels": [], "scores": [], "cut": []}
    bar = progress_bar(total=len(ys) * len(xs), desc="tiles", unit="tile", progress=progress)
    try:
        for top in ys:
            strip, valid = scene.read(top, 0, th, scene.width)
            tiles = [x for x in xs if valid[:, x : x + tw].any()]
            for chunk in _batches(tiles, batch_size):
                images = [torch.from_numpy(strip[role][:, :, x : x + tw]).to(device) for x in chunk]
                with torch.inference_mode():
                    outputs = detect(images)
                for x, out in zip(chunk, outputs, strict=True):
                    boxes = out["boxes"].float().cpu() + torch.tensor([x, top, x, top], dtype=torch.float32)
                    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 - x).long().clamp(0, tw - 1)
                    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 - top).long().clamp(0, th - 1)
                    keep = torch.from_numpy(valid[cy.numpy(), (cx + x).numpy()])
                    # touching an edge this tile shares with a neighbour: possibly a partial view of the object
                    cut = ((boxes[:, 0] <= x + 1) & (x > 0)) | ((boxes[:, 2] >= x + tw - 1) & (x + tw < scene.width))
                    cut |= ((boxes[:, 1] <= top + 1) & (top > 0)) | (
                        (boxes[:, 3] >= top + th - 1) & (top + th < scene.height)
                    )
                    found["cut"].append(cut[keep])
                    found["boxes"].append(boxes[keep])
                    found["labels"].append(out["labels"].cpu()[keep])
                    found["scores"].append(out["scores"].float().cpu()[keep])
            bar.update(len(xs))
    finally:
        bar.close()
    if not found["boxes"]:
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    result = {k: torch.cat(v) for k, v in found.items()}
    keep = batched_nms(result["boxes"], result["scores"], result["labels"], iou_threshold)
    result = {k: v[keep] for k, v in result.items()}
    whole = ~_partial_views(result["boxes"], result["labels"], result.pop("cut"))
    return {k: v[whole] for k, v in result.items()}


def _partial_views(boxes: torch.Tensor, labels: torch.Tensor, cut: torch.Tensor, cover: float = 0.7) -> torch.Tensor:
    """``(N,)`` True for boxes cut by a tile edge that lie mostly (``cover`` of their area) inside a larger box of the
    same class: the part of an object a tile saw, whose IoU with the whole object (seen by the overlapping tile) can
    be too low for NMS to merge them."""
    partial = torch.zeros(len(boxes), dtype=torch.bool)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in cut.nonzero().flatten().tolist():
        others = (labels == labels[i]) & (area > area[i])
        if not others.any():
            continue
        lt = torch.maximum(boxes[others, :2], boxes[i, :2])
        rb = torch.minimum(boxes[others, 2:], boxes[i, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        partial[i] = bool((inter >= cover * area[i]).any())
    return partial


def _counter_clockwise(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A closed ring in counter-clockwise order (positive shoelace area), as RFC 7946 §3.1.6 asks of exterior rings."""
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True))
    return ring if area > 0 else ring[::-1]


def check_geojson(scene: Scene) -> None:
    """GeoJSON holds longitude/latitude (RFC 7946): a scene without CRS cannot give them."""
    if scene.crs is None:
        raise ValueError(
            f"{scene.name} has no CRS, so its boxes have no longitude/latitude for GeoJSON: name the output .json to "
            "get them in pixels (and in the scene's grid when it has a transform)"
        )


def _box_records(scene: Scene, detections: Mapping[str, torch.Tensor], class_names: list[str]) -> list[dict]:
    """One dict per box: ``class``, ``label`` (its index in ``class_names``, 0-based like every other task's labels;
    the detector's own labels count from 1, 0 being torchvision's background), ``score``, the pixel box ``bbox_xyxy``,
    the box in the scene's grid ``bbox_map`` ``[xmin, ymin, xmax, ymax]`` and its ``corners_map`` (4 points)."""
    records = []
    for box, label, score in zip(
        detections["boxes"].tolist(), detections["labels"].tolist(), detections["scores"].tolist(), strict=True
    ):
        x1, y1, x2, y2 = box
        corners = [scene.transform @ c for c in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))]
        xs, ys = zip(*corners, strict=True)
        records.append(
            {
                "class": class_names[label - 1],
                "label": label - 1,
                "score": round(score, 4),
                "bbox_xyxy": [round(v, 2) for v in box],
                "bbox_map": [min(xs), min(ys), max(xs), max(ys)],
                "corners_map": corners,
            }
        )
    return records


def write_box_json(
    scene: Scene,
    detections: Mapping[str, torch.Tensor],
    class_names: list[str],
    path: str | Path,
    overwrite: bool = False,
) -> Path:
    """Boxes ``{boxes (N, 4) xyxy pixels, labels (N,), scores (N,)}`` as plain JSON for any scene, georeferenced or
    not: ``{"image", "crs", "boxes": [{class, label, score, bbox_xyxy (pixels), bbox_map (the scene's grid)}]}``."""
    path = Path(path)
    refuse_existing(path, overwrite)
    boxes = [{k: v for k, v in r.items() if k != "corners_map"} for r in _box_records(scene, detections, class_names)]
    content = {"image": scene.name, "crs": scene.crs.to_string() if scene.crs is not None else None, "boxes": boxes}
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(content)), overwrite=overwrite)


def write_geojson(
    scene: Scene,
    detections: Mapping[str, torch.Tensor],
    class_names: list[str],
    path: str | Path,
    overwrite: bool = False,
) -> Path:
    """Boxes ``{boxes (N, 4) xyxy pixels, labels (N,), scores (N,)}`` as a GeoJSON FeatureCollection of polygons.

    Geometry: the box's four corners in longitude/latitude (RFC 7946: WGS 84, counter-clockwise rings), reprojected
    from the scene's CRS. Properties: ``class``, ``label``, ``score``, the pixel box ``bbox_xyxy``, and the box in the
    scene's own map coordinates, ``bbox_map`` ``[xmin, ymin, xmax, ymax]`` in ``crs`` (e.g. ``"EPSG:32618"``). A
    scene without CRS is refused (:func:`check_geojson`; :func:`write_box_json` writes its boxes).
    """
    from rasterio.warp import transform as reproject_points

    check_geojson(scene)
    path = Path(path)
    refuse_existing(path, overwrite)
    crs = scene.crs.to_string()
    features = []
    for record in _box_records(scene, detections, class_names):
        xs, ys = zip(*record.pop("corners_map"), strict=True)
        lons, lats = reproject_points(scene.crs, "EPSG:4326", list(xs), list(ys))
        ring = _counter_clockwise([*zip(lons, lats, strict=True), (lons[0], lats[0])])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
                "properties": {**record, "crs": crs},
            }
        )
    collection = {"type": "FeatureCollection", "features": features}
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(collection)), overwrite=overwrite)
