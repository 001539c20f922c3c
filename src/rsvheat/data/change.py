"""Change detection data in the LEVIR-CD layout: ``root/A/<name>``, ``root/B/<name>`` (the two dates) and
``root/label/<name>`` (binary masks stored as 0/255, or 0/1), usually once per split: ``root/{train,val,test}``.
``<name>`` is the path relative to the date's folder without the extension, so sub-folders are allowed as long as the
three folders mirror them (``A/site1/p0.png`` ↔ ``B/site1/p0.tif`` ↔ ``label/site1/p0.png``).

Every A/B pair is checked at construction: the same size, and when both are georeferenced, the same CRS and
transform; a mismatch raises an error naming both files (resample one onto the other's grid first, e.g. with
``gdalwarp``, or use ``rsvheat predict``'s change-pair check, which can resample).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rsvheat.data.io import ImageReadError, image_key, integer_labels, match_files, open_raster, read_image
from rsvheat.data.transforms import crop_and_flip, normalise


def grid_of(path: Path):
    """``(crs, transform, (H, W))`` from the header (crs ``None`` when the file is not georeferenced)."""
    with open_raster(path) as src:
        return src.crs, src.transform, (src.height, src.width)


def check_same_grid(first: Path, second: Path) -> None:
    """Raise unless the two rasters share size (and, when both are georeferenced, CRS and transform)."""
    crs_a, transform_a, size_a = grid_of(first)
    crs_b, transform_b, size_b = grid_of(second)
    if size_a != size_b:
        raise ImageReadError(f"image pair of different sizes: {first} is {size_a}, {second} is {size_b}")
    if crs_a is not None and crs_b is not None:
        if crs_a != crs_b:
            raise ImageReadError(f"image pair in different CRS: {first} is {crs_a}, {second} is {crs_b}")
        if not transform_a.almost_equals(transform_b):
            raise ImageReadError(
                f"image pair on different grids (same size and CRS, different transform): {first} vs {second}"
            )


class ChangeDetectionFolder(Dataset):
    """``{"image": (2, C, H, W) (the dates A and B stacked, as TorchGeo 0.8's LEVIR-CD and OSCD), "mask": (H, W)
    int64 in {0, 1}, "name": str}`` samples."""

    def __init__(
        self,
        root: str | Path,
        channels: int,
        mean: list[float],
        std: list[float],
        crop_size: int | None = None,
        train: bool = False,
        bands: list[int] | None = None,
        folders: tuple[str, str, str] = ("A", "B", "label"),
    ) -> None:
        root = Path(root)
        a, b, label = folders
        self.records = match_files({"A": root / a, "B": root / b, "label": root / label}, {}, ["A", "B", "label"])
        self.before_root = root / a
        for record in self.records:
            check_same_grid(record["A"], record["B"])
            check_same_grid(record["A"], record["label"])
        self.channels, self.mean, self.std, self.bands = channels, mean, std, bands
        self.crop_size, self.train = crop_size, train

    def __len__(self) -> int:
        return len(self.records)

    def read_raw(self, index: int) -> dict[str, np.ndarray]:
        record = self.records[index]
        return {k: read_image(record[k], self.bands, self.channels) for k in ("A", "B")}

    def read_mask(self, index: int) -> np.ndarray:
        path = self.records[index]["label"]
        # fractional values are refused first, with their position: 0.9 is neither "changed" nor "unchanged"
        mask = integer_labels(read_image(path)[0], path)
        values = set(np.unique(mask).tolist())
        if not values <= {0, 255} and not values <= {0, 1}:
            raise ImageReadError(f"{path}: a change mask holds 0/255 (or 0/1), found values {sorted(values)[:6]}")
        return (mask > 0).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        raw = self.read_raw(index)
        tensors = {
            "image": torch.stack([normalise(raw[k], self.mean, self.std) for k in ("A", "B")]),
            "mask": torch.from_numpy(self.read_mask(index)),
        }
        sample: dict[str, torch.Tensor | str] = {
            **crop_and_flip(tensors, self.crop_size if self.train else None, self.train),
            "name": image_key(self.records[index]["A"], self.before_root),  # sub-folders kept: names stay distinct
        }
        return sample
