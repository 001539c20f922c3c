"""Small task datasets cut from the embedded CC0 Landsat-7 scene (``RGB.byte.tif``), written in the real on-disk
layouts (class folders, image/mask folders, VOC XML, LEVIR-CD), for the demo, the CPU runs in ``benchmarks/`` and the
tests. The pixels are real; the labels are derived from them:

* land cover = k-means (k = 3, deterministic) of the valid pixels' RGB, smoothed by a 5×5 majority: ``dark`` (deep
  water and dense forest), ``shallow_water`` (turquoise coastal water), ``cloud`` (clouds, bright sand); the nodata
  border is the ignore index;
* classification: tiles labelled by their dominant land cover (tiles with no class over 60 % are left out);
* change detection: the "after" image is the "before" tile with a few rectangles replaced by pixels from elsewhere in
  the scene and a small radiometric shift; the mask marks the replaced rectangles;
* detection: patches of ``cloud`` and ``shallow_water`` pixels pasted into ``dark`` tiles, boxed in VOC XML.

Every tile is a GeoTIFF georeferenced on the scene's grid (EPSG:32618), except the detection JPEGs (as DIOR).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import torch
import torch.nn.functional as F

from rsvheat.data import sample_scene_path
from rsvheat.files import claim_folder

LAND_COVER = ("dark", "shallow_water", "cloud")
IGNORE = 255


def read_scene(path: str | Path | None = None):
    """``(image (C, H, W), rasterio profile)`` of ``path``, by default the embedded scene."""
    from rsvheat.data.io import open_raster

    with open_raster(path or sample_scene_path(), "scene") as src:
        return src.read(), src.profile


def land_cover(image: np.ndarray, iterations: int = 15) -> np.ndarray:
    """``(3, H, W)`` -> ``(H, W)`` uint8 labels (0 dark, 1 shallow water, 2 cloud, 255 nodata)."""
    valid = image.sum(0) > 0
    pixels = image[:, valid].T.astype(np.float64)
    brightness = pixels.mean(1)
    centres = np.stack([pixels[brightness <= np.quantile(brightness, q)].mean(0) for q in (0.2, 0.6, 1.0)])
    for _ in range(iterations):
        assign = ((pixels[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([pixels[assign == k].mean(0) for k in range(3)])
    order = np.argsort(centres.mean(1))  # classes ordered by brightness
    rank = np.empty(3, dtype=np.int64)
    rank[order] = np.arange(3)
    labels = np.full(valid.shape, -1, dtype=np.int64)
    labels[valid] = rank[assign]
    one_hot = torch.from_numpy(np.stack([labels == k for k in range(3)]).astype(np.float32))[None]
    smooth = F.avg_pool2d(one_hot, 5, 1, 2, count_include_pad=False)[0].argmax(0).numpy().astype(np.uint8)
    smooth[~valid] = IGNORE
    return smooth


def _tiles(shape: tuple[int, int], tile: int, stride: int):
    for top in range(0, shape[0] - tile + 1, stride):
        for left in range(0, shape[1] - tile + 1, stride):
            yield top, left


def _write_tile(path: Path, data: np.ndarray, profile: dict, top: int, left: int) -> None:
    import rasterio
    from rasterio.windows import Window, transform

    data = data[None] if data.ndim == 2 else data
    window = Window(left, top, data.shape[2], data.shape[1])
    out = dict(profile, driver="GTiff", count=data.shape[0], height=data.shape[1], width=data.shape[2])
    out.update(dtype=data.dtype.name, transform=transform(window, profile["transform"]), nodata=None)
    out.pop("tiled", None), out.pop("blockxsize", None), out.pop("blockysize", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **out) as dst:
        dst.write(data)


def write_classification(root: str | Path, tile: int = 32, stride: int = 16, per_class: int = 12) -> list[str]:
    """``root/<class>/<name>.tif`` scene tiles labelled by dominant land cover; returns the class names."""
    image, profile = read_scene()
    labels = land_cover(image)
    counts = dict.fromkeys(LAND_COVER, 0)
    for top, left in _tiles(labels.shape, tile, stride):
        window = labels[top : top + tile, left : left + tile]
        if (window == IGNORE).any():
            continue
        shares = np.bincount(window.ravel(), minlength=3) / window.size
        k = int(shares.argmax())
        name = LAND_COVER[k]
        if shares[k] < 0.6 or counts[name] >= per_class:
            continue
        counts[name] += 1
        _write_tile(
            Path(root) / name / f"{name}_{top}_{left}.tif",
            image[:, top : top + tile, left : left + tile],
            profile,
            top,
            left,
        )
    return sorted(name for name, n in counts.items() if n)  # the class folders, in the order a data module reads them


def write_segmentation(
    root: str | Path, tile: int = 96, stride: int = 96, val_every: int = 4, scene: str | Path | None = None
) -> list[str]:
    """``root/{train,val}/{images,masks}/<name>.tif`` tiles of ``scene`` (default: the embedded one; its first three
    bands are clustered) with land-cover index masks (255 = nodata); returns the class names."""
    image, profile = read_scene(scene)
    image = image[:3]
    labels = land_cover(image)
    for i, (top, left) in enumerate(_tiles(labels.shape, tile, stride)):
        mask = labels[top : top + tile, left : left + tile]
        if (mask == IGNORE).mean() > 0.5:
            continue
        split = "val" if i % val_every == 0 else "train"
        name = f"tile_{top}_{left}"
        _write_tile(
            Path(root) / split / "images" / f"{name}.tif",
            image[:, top : top + tile, left : left + tile],
            profile,
            top,
            left,
        )
        _write_tile(Path(root) / split / "masks" / f"{name}.tif", mask, profile, top, left)
    return list(LAND_COVER)


def write_change(root: str | Path, tile: int = 96, stride: int = 96, val_every: int = 4, seed: int = 0) -> None:
    """LEVIR-CD layout ``root/{train,val}/{A,B,label}/<name>.tif``: B = A with rectangles of other scene pixels."""
    image, profile = read_scene()
    rng = np.random.default_rng(seed)
    valid = image.sum(0) > 0
    height, width = valid.shape
    for i, (top, left) in enumerate(_tiles(valid.shape, tile, stride)):
        if not valid[top : top + tile, left : left + tile].all():
            continue
        before = image[:, top : top + tile, left : left + tile]
        after = np.clip(before.astype(np.int16) + rng.integers(-6, 7), 0, 255).astype(np.uint8)
        mask = np.zeros((tile, tile), np.uint8)
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(tile // 8, tile // 3, size=2)
            y, x = rng.integers(0, tile - h), rng.integers(0, tile - w)
            while True:  # a source window of valid pixels, far from this tile, that visibly differs from it
                sy, sx = rng.integers(0, height - h), rng.integers(0, width - w)
                far = abs(sy - top) > tile or abs(sx - left) > tile
                if far and valid[sy : sy + h, sx : sx + w].all():
                    source = image[:, sy : sy + h, sx : sx + w].astype(np.int16)
                    if np.abs(source - before[:, y : y + h, x : x + w]).mean() > 20:
                        break
            after[:, y : y + h, x : x + w] = image[:, sy : sy + h, sx : sx + w]
            mask[y : y + h, x : x + w] = 255
        split = "val" if i % val_every == 0 else "train"
        name = f"tile_{top}_{left}"
        for folder, data in (("A", before), ("B", after), ("label", mask)):
            _write_tile(Path(root) / split / folder / f"{name}.tif", data, profile, top, left)


def write_detection(root: str | Path, tile: int = 128, count: int = 12, seed: int = 0) -> list[str]:
    """VOC layout ``root/{JPEGImages,Annotations}``: ``dark`` tiles with pasted ``cloud`` and ``shallow_water``
    patches; ``root/{train,val}.txt`` list the image names. Returns the class names."""
    from PIL import Image

    image, _ = read_scene()
    labels = land_cover(image)
    rng = np.random.default_rng(seed)
    classes = ["cloud", "shallow_water"]
    sources = {c: np.argwhere(labels == LAND_COVER.index(c)) for c in classes}
    backgrounds = [
        (top, left)
        for top, left in _tiles(labels.shape, tile, tile // 2)
        if (labels[top : top + tile, left : left + tile] == 0).mean() > 0.9
    ]
    names = []
    for n in range(count):
        top, left = backgrounds[rng.integers(len(backgrounds))]
        canvas = image[:, top : top + tile, left : left + tile].copy()
        objects = []
        for _ in range(rng.integers(0, 4) if n % 6 else 0):  # every 6th image has no objects: a valid negative
            c = classes[rng.integers(2)]
            size = int(rng.integers(12, 28))
            y, x = rng.integers(0, tile - size, size=2)
            cy, cx = sources[c][rng.integers(len(sources[c]))]
            cy, cx = min(cy, image.shape[1] - size), min(cx, image.shape[2] - size)
            canvas[:, y : y + size, x : x + size] = image[:, cy : cy + size, cx : cx + size]
            # VOC: 1-based inclusive pixel indices; the pasted pixels x .. x + size - 1 (0-based) are written as
            # xmin = x + 1 .. xmax = x + size (the loader turns them back into [x, x + size))
            objects.append((c, x + 1, y + 1, x + size, y + size))
        name = f"{n:05d}"
        (Path(root) / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas.transpose(1, 2, 0)).save(Path(root) / "JPEGImages" / f"{name}.jpg", quality=95)
        write_voc(Path(root) / "Annotations" / f"{name}.xml", f"{name}.jpg", (tile, tile), objects)
        names.append(name)
    split = max(1, count // 4)
    (Path(root) / "val.txt").write_text("\n".join(names[:split]) + "\n")
    (Path(root) / "train.txt").write_text("\n".join(names[split:]) + "\n")
    return classes


def write_voc(path: Path, filename: str, size: tuple[int, int], objects: list[tuple[str, float, float, float, float]]):
    """A Pascal VOC annotation file (``objects``: class name and x1, y1, x2, y2)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    s = ET.SubElement(root, "size")
    for key, value in (("width", size[1]), ("height", size[0]), ("depth", 3)):
        ET.SubElement(s, key).text = str(value)
    for name, *box in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        bnd = ET.SubElement(obj, "bndbox")
        for key, coord in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bnd, key).text = str(int(coord))
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)


def write_all(root: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Every task's samples under ``root/{classification,segmentation,change,detection}``. A folder an earlier
    ``make-samples`` wrote is refreshed; any other non-empty folder is refused unless ``overwrite`` (then only those
    four subfolders are replaced; see :func:`rsvheat.files.claim_folder`)."""
    writers: dict[str, Callable[[Path], object]] = {
        "classification": write_classification,
        "segmentation": write_segmentation,
        "change": write_change,
        "detection": write_detection,
    }
    root = claim_folder(root, "make-samples", list(writers), overwrite)
    for task, write in writers.items():
        write(root / task)
    return {task: root / task for task in writers}
