"""Writing small rasters in the layouts the tests need."""

import warnings

import numpy as np
import rasterio
from rasterio.transform import from_origin


def write(path, data, driver=None, crs="EPSG:32633"):
    """Write ``(C, H, W)`` ``data``; GeoTIFFs get a CRS and transform, PNG/JPEG none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    driver = driver or {".png": "PNG", ".jpg": "JPEG"}.get(path.suffix, "GTiff")
    profile = dict(driver=driver, count=data.shape[0], height=data.shape[1], width=data.shape[2], dtype=data.dtype)
    if driver == "GTiff":
        profile.update(crs=crs, transform=from_origin(400000, 5300000, 10, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def ramp(c, h, w, dtype=np.uint8, scale=1.0):
    grid = np.add.outer(np.arange(h), np.arange(w))[None] + 7 * np.arange(c)[:, None, None]
    return (grid * scale).astype(dtype)
