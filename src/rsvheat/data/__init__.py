"""Data: embedded samples and raster I/O."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np


def sample_scene_path() -> Path:
    """Path of the embedded CC0 Landsat-7 scene (791 x 718, 3 bands uint8, EPSG:32618, nodata 0)."""
    return Path(str(resources.files("rsvheat.data") / "RGB.byte.tif"))


def read_raster(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a whole raster as ``(bands, H, W)`` with its rasterio profile; clear errors for missing/corrupt files."""
    from rsvheat.data.io import open_raster

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"raster not found: {path}")
    with open_raster(path, "raster") as src:
        return src.read(), dict(src.profile)
