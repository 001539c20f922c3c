"""Heat maps: what each Heat Conduction Operator does to an image (``rsvheat explain``).

For every stage and block, the HCO's fields are recorded on the way through the backbone and reduced over channels:

* ``entering``: the HCO's input ``x`` as the block hands it over (the block input; after ``norm1`` in the pre-norm
  vHeat-T), before any correction;
* ``corrected``: that input after the spatial correction embedding, ``LN(ReLU(x + SCE))`` (RS-vHeat; vHeat has no
  SCE, so there it equals ``entering``);
* ``source``: the heat source ``u`` (after the depth-wise conv and input projection) whose diffusion the HCO computes;
* ``conducted``: ``u`` after conduction, ``IDCT(DCT(u) · exp(-k·t·ω²))``, where features have spread;
* ``spectrum``: ``log(1 + |DCT(u)|)``, the source's frequency content (DC at the top-left);
* ``kt``: the learned diffusivity × time ``k·t`` per frequency (high = that frequency is damped hard).

Spatial fields are mean absolute values over channels; spectra are channel means. Every panel has a colour bar in the
field's own units (spatial fields are drawn between their 1st and 99th percentiles), and every figure says which
weights produced it (a checkpoint, a weights file, or a random initialisation, whose k·t is not learned). An image with
an alpha band (RGBA PNG, GeoTIFF with an alpha sample) is read without it unless bands are selected: its alpha is the
valid-pixel mask, as a nodata value is. Scenes larger than ``tile`` are
explained tile by tile (no overlap): spatial fields are stitched, spectra averaged over tiles. Each tile is its own
conduction domain (the DCT's insulated borders), so tile edges can show as seams: a tile as large as memory allows
shows the field closest to a whole-scene pass. Figures are drawn at a
display size of at most ``max_side`` pixels, so a 10 000² scene costs one tile's activations plus the small canvases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsvheat.data.io import check_band_selection, image_header, open_raster
from rsvheat.files import write_atomic
from rsvheat.inference.scene import Input, Scene, check_memory, check_tile
from rsvheat.models.precision import autocast, check_precision, low_precision_weights
from rsvheat.models.rsvheat import fold_backbones
from rsvheat.models.sliding import window_grid
from rsvheat.progress import bar as progress_bar

SPATIAL = ("entering", "corrected", "source", "conducted")
SPECTRAL = ("spectrum", "kt")
TITLES = {
    "entering": "HCO input x",
    "corrected": "SCE-corrected input",
    "source": "heat source u",
    "conducted": "after conduction",
    "spectrum": "log |DCT(u)|",
    "kt": "learned k·t",
}


@torch.no_grad()
def heat_fields(model, x: torch.Tensor | Mapping[str, torch.Tensor], modality: str | None = None) -> dict:
    """Channel-reduced HCO fields of one forward pass: ``{(stage, block): {name: (B, h, w) or (h, w)}}``.

    ``x``: ``(B, C, H, W)`` normalised image (or a ``{modality: image}`` mapping, as the model's ``stem`` takes).
    """
    fields: dict = {}
    hooks = []
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):

            def record(module, args, output, key=(s, b)):
                _, states = module.forward(*args, return_states=True)
                fields[key] = {
                    "entering": args[0].abs().mean(-1),
                    "corrected": states["corrected"].abs().mean(-1),
                    "source": states["source"].abs().mean(-1),
                    "conducted": states["conducted"].abs().mean(-1),
                    "spectrum": states["spectrum"].abs().log1p().mean(-1),
                    "kt": module.kt(args[1]).mean(-1),
                }

            hooks.append(block.hco.register_forward_hook(record))
    try:
        model.forward_features(x, modality) if not isinstance(x, Mapping) else model.forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
    return fields


def image_stats(path: str | Path, bands: Sequence[int] | None = None, max_side: int = 1024) -> dict:
    """Per-band mean/std over the valid pixels of a decimated read: normalisation when no training statistics are
    known (e.g. an encoder without its data)."""
    from rasterio.enums import Resampling

    with open_raster(path) as src:
        scale = min(1.0, max_side / max(src.height, src.width))
        shape = (max(1, round(src.height * scale)), max(1, round(src.width * scale)))
        data = src.read(list(bands) if bands else None, out_shape=shape, resampling=Resampling.nearest)
        valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
    data = data.astype(np.float64)
    valid &= np.isfinite(data).all(0)
    if not valid.any():
        raise ValueError(f"{path}: no valid pixel (all nodata or non-finite)")
    pixels = data[:, valid]
    return {"mean": pixels.mean(1).tolist(), "std": (pixels.std(1) + 1e-6).tolist()}


def _overview(path: Path, bands: Sequence[int] | None, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Display image ``(h, w, 3)`` in [0, 1] (first three bands, or grey for one band) and its valid mask."""
    from rasterio.enums import Resampling

    with open_raster(path) as src:
        data = src.read(list(bands) if bands else None, out_shape=shape, resampling=Resampling.bilinear)
        valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
    data = data[:3].astype(np.float64) if data.shape[0] >= 3 else np.repeat(data[:1].astype(np.float64), 3, 0)
    valid &= np.isfinite(data).all(0)
    rgb = np.zeros((*shape, 3))
    for c in range(3):
        lo, hi = np.percentile(data[c][valid], (2, 98)) if valid.any() else (0.0, 1.0)
        rgb[..., c] = np.clip((data[c] - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb[~valid] = 1.0
    return rgb, valid


def _save_png(fig, path: Path, dpi: int) -> Path:
    """``fig`` as ``path``, atomically: an interrupted run leaves no truncated PNG under the final name."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def colour_bands(path: str | Path) -> tuple[int, ...] | None:
    """The 1-based bands of ``path`` other than its alpha band(s), or ``None`` when it has none.

    GDAL reads an alpha band as the raster's valid-pixel mask (``dataset_mask``), so dropping it from the bands leaves
    it where it belongs: transparent pixels are invalid (drawn blank, never fed to the model as a fourth band)."""
    from rasterio.enums import ColorInterp

    with open_raster(path) as src:
        interp = src.colorinterp
    if ColorInterp.alpha not in interp:
        return None
    return tuple(i for i, c in enumerate(interp, start=1) if c != ColorInterp.alpha)


def explain_scene(
    model,
    image: str | Path,
    out_dir: str | Path,
    modality: str = "optical",
    stats: Mapping | None = None,
    bands: Sequence[int] | None = None,
    tile: int = 1024,
    max_side: int = 768,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    weights: str | None = None,
    learned: bool = True,
    precision: str = "fp32",
) -> dict[str, Path]:
    """Write ``stage{S}_block{B}.png`` for every block and ``summary.png`` (last block of each stage) for ``image``
    through ``model`` (an :class:`~rsvheat.models.rsvheat.RSVHeat`), and return their paths (``"summary"`` first).

    ``stats``: ``{"mean": [...], "std": [...]}`` of the model's training data; computed from the image if ``None``.
    ``bands``: 1-based bands to read; by default every band but an alpha band (:func:`colour_bands`), which is read
    as the valid-pixel mask. ``weights``: what the model's weights are, for the figures' subtitle (e.g.
    ``"checkpoint run.ckpt"``); ``learned``: false for a random initialisation (its k·t is then not titled
    "learned"). ``precision``: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast of the forward passes, spectral
    transforms in float32; :mod:`rsvheat.models.precision`); the fields are drawn from float32 copies either way.
    ``out_dir`` must be new or empty unless ``overwrite`` (then heat maps of an earlier run that this one does not
    redraw, e.g. of a deeper model, are removed so the folder never mixes two runs). Each PNG is written atomically.
    """
    image, out_dir = Path(image), Path(out_dir)
    check_precision(precision)
    if modality not in model.modalities:
        raise ValueError(f"the model has no {modality!r} stem (it has {list(model.modalities)})")
    check_tile(tile, image)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty (pass --overwrite to replace its heat maps)")
    # no mkdir here: the first heat map written creates the folder, so a run that fails leaves none behind
    check_band_selection(image, bands, image_header(image)[0])  # before the statistics read them
    if not bands:
        bands = colour_bands(image)
    stats = dict(stats) if stats is not None else image_stats(image, bands)
    model = fold_backbones(model).to(device)  # the weights stay as they are: filters computed once per size
    source = Input(image, modality, tuple(bands) if bands else None)
    with Scene({modality: source}, model.modalities, {modality: stats}, georeferenced_outputs=False) as scene:
        size = (scene.height, scene.width)
        with low_precision_weights(model, precision):  # bf16: the weights cast once for all tiles
            canvases, spectra = _stitched_fields(model, scene, modality, tile, max_side, device, progress, precision)
    shape = next(iter(canvases.values())).shape
    rgb, valid = _overview(image, bands, shape)
    if weights is None:
        weights = "weights as passed" if learned else "random initialisation: not learned"
    title = f"Heat conduction in {type(model).__name__} ({modality}, {size[0]}×{size[1]} px)\n{weights}"
    written = _draw(canvases, spectra, rgb, valid, title, out_dir, progress, learned)
    for stale in set(out_dir.glob("stage*_block*.png")) - set(written.values()):
        stale.unlink()
    return written


def _stitched_fields(
    model, scene: Scene, modality: str, tile: int, max_side: int, device, progress: bool, precision: str = "fp32"
) -> tuple[dict, dict]:
    """The heat fields of every block over the whole scene, tile by tile: ``{(block, name): (h, w)}`` spatial
    fields stitched on a display canvas of at most ``max_side`` px, ``{(block, name): (h', w')}`` spectra averaged
    over tiles."""
    scale = min(1.0, max_side / max(scene.height, scene.width))
    shape = (max(1, round(scene.height * scale)), max(1, round(scene.width * scale)))
    th, tw, _, tops, lefts = window_grid(scene.height, scene.width, tile, 0)
    check_memory(scene.name, (th, tw), tw, scene.sources[modality].count, 1, device)  # one tile read at a time
    canvases: dict = {}
    spectra: dict = {}
    windows = [(top, left) for top in tops for left in lefts]
    for top, left in progress_bar(windows, desc="heat maps", unit="tile", progress=progress and len(windows) > 1):
        arrays, _ = scene.read(top, left, th, tw)
        with autocast(precision, device):
            fields = heat_fields(model, torch.from_numpy(arrays[modality])[None].to(device), modality)
        y0, x0 = round(top * scale), round(left * scale)
        y1, x1 = round((top + th) * scale), round((left + tw) * scale)
        for key, maps in fields.items():
            for name in SPATIAL:
                size = (max(1, y1 - y0), max(1, x1 - x0))
                field = F.interpolate(maps[name][:, None].float(), size, mode="bilinear", align_corners=False)
                canvas = canvases.setdefault((key, name), np.zeros(shape, np.float32))
                canvas[y0:y1, x0:x1] = field[0, 0].cpu().numpy()[: shape[0] - y0, : shape[1] - x0]
            for name in SPECTRAL:
                value = maps[name][0] if maps[name].ndim == 3 else maps[name]
                spectra[(key, name)] = spectra.get((key, name), 0) + value.float().cpu().numpy()
    tiles = len(tops) * len(lefts)
    return canvases, {k: v / tiles for k, v in spectra.items()}


def _draw(
    canvases: dict,
    spectra: dict,
    rgb: np.ndarray,
    valid: np.ndarray,
    title: str,
    out_dir: Path,
    progress: bool,
    learned: bool = True,
) -> dict:
    """``summary.png`` (last block of each stage) and one figure per block, each heat panel with its colour bar;
    ``title`` (its second line names the weights) heads every figure. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = dict(TITLES)
    if not learned:
        names["kt"] = "k·t (random init, not learned)"
    grey = rgb.mean(-1)

    def panel(key, name) -> tuple[np.ndarray, float, float]:
        """What ``name``'s panel shows for block ``key``, and its colour limits (the 1st and 99th percentiles)."""
        if name in SPATIAL:
            field = canvases[(key, name)]
            lo, hi = np.percentile(field[valid], (1, 99)) if valid.any() else (0, 1)
            # drawn in the field's own values (clipped at the percentiles) so that the colour bar reads them
            return np.where(valid, field, np.nan), lo, max(hi, lo + 1e-9)
        spectrum = spectra[(key, name)]
        lo, hi = np.percentile(spectrum, (1, 99))
        return spectrum, lo, max(hi, lo + 1e-9)

    def draw(fig, axes_row, key) -> Callable[[tuple], None]:
        """Block ``key``'s panels, each with its colour bar, on ``axes_row``; returns what redraws them for another
        block (new data and limits in the same artists: building a figure costs more than drawing it)."""
        axes = list(axes_row)
        axes.pop(0).imshow(rgb)
        images = {}
        for ax, name in zip(axes, SPATIAL + SPECTRAL, strict=True):
            data, lo, hi = panel(key, name)
            if name in SPATIAL:
                ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
                images[name] = ax.imshow(data, cmap="inferno", alpha=0.7, vmin=lo, vmax=hi)
            else:
                images[name] = ax.imshow(data, cmap="viridis", vmin=lo, vmax=hi)
            bar = fig.colorbar(images[name], ax=ax, fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=6)
        for ax in axes_row:
            ax.set_xticks([])
            ax.set_yticks([])

        def redraw(key) -> None:
            for name, image in images.items():
                data, lo, hi = panel(key, name)
                image.set_data(data)
                image.set_extent((-0.5, data.shape[1] - 0.5, data.shape[0] - 0.5, -0.5))  # spectra differ per stage
                image.set_clim(lo, hi)

        return redraw

    def titles(axes_row) -> None:
        for ax, name in zip(axes_row, ("input", *SPATIAL, *SPECTRAL), strict=True):
            ax.set_title(names.get(name, name), fontsize=9)

    blocks = sorted({key for key, _ in canvases})
    columns = 1 + len(SPATIAL) + len(SPECTRAL)
    last = [max(k for k in blocks if k[0] == s) for s in sorted({s for s, _ in blocks})]
    fig, axes = plt.subplots(len(last), columns, figsize=(3.0 * columns, 2.6 * len(last) + 0.3), squeeze=False)
    try:  # closed on failure too: pyplot keeps every open figure for the life of the process
        for row, key in zip(axes, last, strict=True):
            draw(fig, row, key)
            row[0].set_ylabel(f"stage {key[0] + 1}, block {key[1] + 1}")
        titles(axes[0])
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        written = {"summary": _save_png(fig, out_dir / "summary.png", dpi=90)}
    finally:
        plt.close(fig)

    # one figure for every block, redrawn
    heading = title.split("\n", 1)[1] if "\n" in title else ""
    fig, axes = plt.subplots(1, columns, figsize=(3.0 * columns, 3.2), squeeze=False)
    try:
        redraw = draw(fig, axes[0], blocks[0])
        titles(axes[0])
        suptitle = fig.suptitle("", fontsize=10)
        for key in progress_bar(blocks, desc="figures", unit="block", progress=progress):
            redraw(key)
            suptitle.set_text(f"stage {key[0] + 1}, block {key[1] + 1}" + (f"\n{heading}" if heading else ""))
            fig.tight_layout()  # again: the colour bars' tick labels change width
            path = _save_png(fig, out_dir / f"stage{key[0] + 1}_block{key[1] + 1}.png", dpi=80)
            written[path.stem] = path
    finally:
        plt.close(fig)
    return written
