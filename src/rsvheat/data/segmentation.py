"""Semantic segmentation data: an image folder and a mask folder with matching names, optionally a co-registered SAR
folder (WHU-OPT-SAR style optical + SAR fusion).

Masks are either index maps (LoveDA, iSAID converted masks, WHU-OPT-SAR, AIR-PolSAR-Seg: one class id per pixel) or
RGB-coded (ISPRS Potsdam/Vaihingen: one colour per class, mapped to ids through ``palette``). ``ignore_index`` pixels
are left out of the loss and the metrics; in RGB masks ``ignore_colors`` (default black, the eroded-boundary colour of
the ISPRS ``*_noBoundary`` labels) map to it. Index masks whose stored values are not the class ids are remapped while
reading, so the files stay as distributed:

* ``reduce_zero_label=True`` (LoveDA: 0 = no data, classes 1..7): 0 becomes ``ignore_index``, ``v`` becomes ``v - 1``
  (``ignore_index`` itself stays ignored);
* ``label_map={raw value: class id}`` (WHU-OPT-SAR: ``{10: 0, 20: 1, ..., 70: 6}``): every value not in the map
  (WHU-OPT-SAR's 0 background) becomes ``ignore_index``.

Files are matched by their path relative to their folder, without the extension and after removing
``image_suffix`` / ``mask_suffix`` / ``sar_suffix`` from the file name, e.g. Potsdam ``top_potsdam_2_10_RGB.tif`` ↔
``top_potsdam_2_10_label.tif`` with ``image_suffix="_RGB"``, ``mask_suffix="_label"``; ``images/a/tile.tif`` ↔
``masks/a/tile.png``, and ``images/b/tile.tif`` is another sample (see :func:`~rsvheat.data.io.match_files`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rsvheat.data.io import ImageReadError, image_header, image_key, integer_labels, match_files, read_image
from rsvheat.data.transforms import crop_and_flip, normalise, sample_keys

# ISPRS Potsdam / Vaihingen: impervious surfaces, building, low vegetation, tree, car, clutter.
ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))


def rgb_to_index(
    mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_colors: Sequence[Sequence[int]], ignore_index: int, path
) -> np.ndarray:
    """``(3, H, W)`` colour mask -> ``(H, W)`` int64 class ids; an unknown colour raises, naming the file."""
    if mask.shape[0] < 3:
        raise ImageReadError(f"{path}: an RGB-coded mask needs 3 bands, got {mask.shape[0]}")
    code = (mask[0].astype(np.int64) << 16) | (mask[1].astype(np.int64) << 8) | mask[2].astype(np.int64)
    out = np.full(code.shape, -1, dtype=np.int64)
    for value, (r, g, b) in enumerate(palette):
        out[code == (r << 16 | g << 8 | b)] = value
    for r, g, b in ignore_colors:
        out[code == (r << 16 | g << 8 | b)] = ignore_index
    if (out < 0).any():
        y, x = np.argwhere(out < 0)[0]
        colour = tuple(int(c) for c in mask[:3, y, x])
        raise ImageReadError(f"{path}: colour {colour} at (row {y}, col {x}) is not in the palette {list(palette)}")
    return out


def check_label_map(
    label_map: Mapping[int, int] | None,
    reduce_zero_label: bool,
    palette: Sequence[Sequence[int]] | None,
    num_classes: int,
    ignore_index: int,
) -> dict[int, int] | None:
    """``label_map`` as ``{int: int}`` after checking it and its combination with the other label options."""
    if label_map is not None and reduce_zero_label:
        raise ValueError("give label_map or reduce_zero_label, not both (fold the -1 into the label_map)")
    if palette is not None and (label_map is not None or reduce_zero_label):
        raise ValueError("label_map and reduce_zero_label apply to index masks; RGB masks (palette) map colours")
    if label_map is None:
        return None
    mapping = {int(k): int(v) for k, v in label_map.items()}
    bad = {k: v for k, v in mapping.items() if not (0 <= v < num_classes or v == ignore_index)}
    if bad:
        raise ValueError(
            f"label_map {bad}: class ids must lie in [0, {num_classes}) or be the ignore index {ignore_index}"
        )
    return mapping


def remap_labels(mask: np.ndarray, label_map: Mapping[int, int], ignore_index: int) -> np.ndarray:
    """``(H, W)`` stored values -> class ids through ``label_map``; values not in it become ``ignore_index``."""
    out = np.full(mask.shape, ignore_index, dtype=np.int64)
    for stored, class_id in label_map.items():
        out[mask == stored] = class_id
    return out


def reduce_zero(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """``(H, W)`` masks whose 0 means "no data" (LoveDA): 0 -> ``ignore_index``, ``v`` -> ``v - 1``; pixels already
    at ``ignore_index`` stay there."""
    out = mask - 1
    out[(mask == 0) | (mask == ignore_index)] = ignore_index
    return out


class SegmentationFolder(Dataset):
    """``{"image": (C, H, W), ["sar": (C_s, H, W),] "mask": (H, W) int64, "name": str}`` samples: the optical bands
    in ``image`` and the other stems' under their names (:func:`~rsvheat.data.transforms.sample_keys`).

    Args:
        images, masks, sar: folders (``sar`` optional: co-registered SAR, fused with the optical image in the stem).
        num_classes: ids must lie in ``[0, num_classes)`` or equal ``ignore_index``; others raise naming the file.
        channels: ``{"optical": C, "sar": C_s}`` band counts after ``bands`` selection.
        stats: ``{modality: {"mean": [...], "std": [...]}}``.
        crop_size: random crops for training (``None``: whole images, for evaluation).
        palette: RGB colours of classes 0..K-1 for RGB-coded masks; ``None`` for index masks.
        label_map: index masks only: ``{stored value: class id}``; values not in it become ``ignore_index``.
        reduce_zero_label: index masks only: 0 becomes ``ignore_index`` and ``v`` becomes ``v - 1``.
    """

    def __init__(
        self,
        images: str | Path,
        masks: str | Path,
        num_classes: int,
        channels: dict[str, int],
        stats: dict[str, dict[str, list[float]]],
        sar: str | Path | None = None,
        crop_size: int | None = None,
        train: bool = False,
        ignore_index: int = 255,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_colors: Sequence[Sequence[int]] = ((0, 0, 0),),
        image_suffix: str = "",
        mask_suffix: str = "",
        sar_suffix: str = "",
        bands: Mapping[str, Sequence[int]] | None = None,
        label_map: Mapping[int, int] | None = None,
        reduce_zero_label: bool = False,
    ) -> None:
        self.label_map = check_label_map(label_map, reduce_zero_label, palette, num_classes, ignore_index)
        self.reduce_zero_label = reduce_zero_label
        folders = {"optical": Path(images), "mask": Path(masks)}
        if sar is not None:
            folders["sar"] = Path(sar)
        suffixes = {"optical": image_suffix, "mask": mask_suffix, "sar": sar_suffix}
        self.records = match_files(folders, suffixes, required=list(folders))
        self.image_root = folders["optical"]
        for record in self.records:
            sizes = {k: image_header(p)[1:] for k, p in record.items()}
            if len(set(sizes.values())) > 1:
                detail = ", ".join(f"{record[k]}: {h}×{w}" for k, (h, w) in sizes.items())
                raise ImageReadError(f"image and mask sizes differ ({detail})")
        if palette is not None and len(palette) != num_classes:
            raise ValueError(f"the palette has {len(palette)} colours for {num_classes} classes")
        self.num_classes, self.channels, self.stats = num_classes, dict(channels), stats
        self.crop_size, self.train, self.ignore_index = crop_size, train, ignore_index
        self.palette, self.ignore_colors = palette, ignore_colors
        self.bands = dict(bands or {})

    def __len__(self) -> int:
        return len(self.records)

    def read_raw(self, index: int) -> dict[str, np.ndarray]:
        record = self.records[index]
        return {m: read_image(record[m], self.bands.get(m), c) for m, c in self.channels.items()}

    def read_mask(self, index: int) -> np.ndarray:
        path = self.records[index]["mask"]
        raw = read_image(path)
        if self.palette is not None:
            # a fractional colour (a float or resampled mask) would otherwise be truncated onto a palette colour
            integer_labels(raw[:3], path)
            return rgb_to_index(raw, self.palette, self.ignore_colors, self.ignore_index, path)
        stored = integer_labels(raw[0], path)
        if self.label_map is not None:
            # every class id of the map is valid (checked at construction): nothing left to check
            return remap_labels(stored, self.label_map, self.ignore_index)
        mask = reduce_zero(stored, self.ignore_index) if self.reduce_zero_label else stored
        bad = (mask >= self.num_classes) & (mask != self.ignore_index) | (mask < 0)
        if bad.any():
            values = sorted(set(np.unique(stored[bad]).tolist()))[:5]
            how = " (with reduce_zero_label: 0 is ignored, v becomes v - 1)" if self.reduce_zero_label else ""
            raise ImageReadError(
                f"{path}: label values {values}{how} are outside [0, {self.num_classes}) and are not the ignore "
                f"index {self.ignore_index}"
            )
        return mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        keys = sample_keys(self.channels)
        tensors = {keys[m]: normalise(x, **self.stats[m]) for m, x in self.read_raw(index).items()}
        tensors["mask"] = torch.from_numpy(self.read_mask(index))
        sample: dict[str, torch.Tensor | str] = {
            **crop_and_flip(tensors, self.crop_size if self.train else None, self.train),
            # the image's path relative to the image folder, without extension: tiles of the same file name in
            # different sub-folders keep distinct names (and distinct prediction files)
            "name": image_key(self.records[index]["optical"], self.image_root),
        }
        return sample
