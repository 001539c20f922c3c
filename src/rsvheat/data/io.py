"""Reading images of any remote-sensing format as ``(C, H, W)`` float32 arrays, with errors that name the file.

Everything goes through rasterio (GDAL), which reads GeoTIFF, TIFF, PNG and JPEG alike, so a folder may mix formats.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class ImageReadError(ValueError):
    """An image that is missing, corrupt, truncated, of the wrong band count, or holds NaN/Inf pixels."""


def list_images(root: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, hidden files skipped); error if the folder is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in suffixes and p.is_file() and not any(part.startswith(".") for part in p.parts)
    )


def read_image(
    path: str | Path,
    bands: Sequence[int] | None = None,
    expected_bands: int | None = None,
    out_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read ``path`` as a float32 ``(C, H, W)`` array.

    Args:
        bands: 1-based band indices to read (rasterio's convention); all bands by default.
        expected_bands: raise if the number of bands read differs.
        out_shape: resample (bilinear) to this ``(H, W)`` while reading, e.g. 20 m Sentinel-2 bands onto the 10 m grid.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if bands is not None and (min(bands) < 1 or max(bands) > src.count):
                    raise ImageReadError(f"{path}: bands {list(bands)} requested, the file has {src.count} band(s)")
                shape = None if out_shape is None else (len(bands or range(src.count)), *out_shape)
                data = src.read(
                    list(bands) if bands is not None else None,
                    out_shape=shape,
                    resampling=Resampling.bilinear,
                )
    except RasterioError as err:  # corrupt or truncated files surface here (GDAL read errors)
        raise ImageReadError(f"cannot read image {path}: {err}") from err
    if expected_bands is not None and data.shape[0] != expected_bands:
        raise ImageReadError(f"{path}: expected {expected_bands} band(s), got {data.shape[0]}")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ImageReadError(f"{path}: {int((~np.isfinite(data)).sum())} NaN/Inf pixel value(s)")
    return data


def image_header(path: str | Path) -> tuple[int, int, int]:
    """``(bands, H, W)`` from the file header, with :class:`ImageReadError` for missing or unreadable files."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.count, src.height, src.width
    except RasterioError as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def to_decibels(linear: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """SAR backscatter, linear power (sigma0) -> dB: ``10 log10(max(x, floor))``."""
    return (10.0 * np.log10(np.maximum(linear, floor))).astype(np.float32)


def write_raster(
    path: str | Path, data: np.ndarray, like: str | Path | None = None, nodata: float | None = None
) -> Path:
    """Write ``(C, H, W)`` or ``(H, W)`` ``data`` to ``path`` (GeoTIFF for ``.tif``, else the format of the suffix,
    e.g. PNG), atomically (temporary file, then rename). With ``like`` (a raster of the same size), its CRS and
    transform are copied, so maps predicted from a GeoTIFF stay georeferenced."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    path = Path(path)
    data = data[None] if data.ndim == 2 else data
    profile = {"count": data.shape[0], "height": data.shape[1], "width": data.shape[2], "dtype": data.dtype.name}
    if like is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(like) as src:
                if (src.height, src.width) == data.shape[1:] and src.crs is not None:
                    profile.update(crs=src.crs, transform=src.transform)
    tiff = path.suffix.lower() in (".tif", ".tiff")
    profile["driver"] = "GTiff" if tiff else {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}[path.suffix.lower()]
    if tiff:
        profile.update(compress="deflate", tiled=data.shape[1] >= 256 and data.shape[2] >= 256)
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(data)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".aux.xml")):
            if leftover.exists():
                leftover.unlink()
    return path
