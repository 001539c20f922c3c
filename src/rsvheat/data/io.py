"""Reading images of any remote-sensing format as ``(C, H, W)`` float32 arrays, with errors that name the file.

Everything goes through rasterio (GDAL), which reads GeoTIFF, TIFF, PNG and JPEG alike, so a folder may mix formats.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rsvheat.files import write_atomic

if TYPE_CHECKING:
    from rasterio.io import DatasetReader

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")  # what GDAL reads through rasterio


class ImageReadError(ValueError):
    """An image that is missing, corrupt, truncated, of the wrong band count, or holds NaN/Inf pixels."""


def list_images(root: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, hidden files and folders below ``root`` skipped); error if
    the folder is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    # only the parts below root count as hidden: a dataset kept under e.g. ~/.cache must not look empty
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in suffixes
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def image_key(path: Path, root: Path, suffix: str = "") -> str:
    """The sample name of ``path`` in the folder ``root``: its path relative to ``root`` without the file extension,
    ``/``-separated, with ``suffix`` (e.g. Potsdam's ``_RGB``) removed from the end of the file name.

    ``root/a/tile_RGB.tif`` -> ``"a/tile"`` with ``suffix="_RGB"``; files at the top level keep their bare stem
    (``root/tile.tif`` -> ``"tile"``), so flat folders are named as they always were.
    """
    rel = Path(path).relative_to(root)
    stem = rel.stem
    if suffix and stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    parent = rel.parent.as_posix()
    # string join, not Path: a stem left empty by the suffix must not collapse into its folder's name
    return stem if parent == "." else f"{parent}/{stem}"


def images_by_key(root: str | Path, suffix: str = "") -> dict[str, Path]:
    """``{image_key: path}`` of every image under ``root`` (see :func:`image_key`).

    Two files with the same key (``x.png`` beside ``x.tif``, or ``x.tif`` and ``x.tiff``) raise
    :class:`ImageReadError` naming both: keeping either would silently drop the other, and their partners in other
    folders (masks, SAR, the second date) or their predictions could not tell them apart.
    """
    root = Path(root)
    found: dict[str, Path] = {}
    for path in list_images(root):
        key = image_key(path, root, suffix)
        if key in found:
            how = f" once {suffix!r} is removed" if suffix else ""
            raise ImageReadError(
                f"{found[key]} and {path} both give the sample name {key!r}{how} (file names are matched without "
                "their extension): keep one of them"
            )
        found[key] = path
    return found


def match_files(folders: dict[str, Path], suffixes: dict[str, str], required: Sequence[str]) -> list[dict[str, Path]]:
    """Group the files of several folders into samples, one per file of the first folder, sorted by name.

    A file's name is its path relative to its folder without the extension, minus the folder's suffix in
    ``suffixes`` (:func:`image_key`): ``images/a/tile.tif`` and ``images/b/tile.tif`` are two samples
    (``"a/tile"``, ``"b/tile"``), partnered by ``masks/a/tile.png`` and ``masks/b/tile.png``. Two files of one folder
    with the same name (``x.png`` beside ``x.tif``) raise naming both; a file of the first folder without a partner in
    a ``required`` folder raises naming it.

    Returns:
        ``[{folder key: path}]``, every ``required`` key present in every record.
    """
    listed = {k: images_by_key(folder, suffixes.get(k, "")) for k, folder in folders.items()}
    first = next(iter(folders))
    if not listed[first]:
        raise ValueError(f"no images in {folders[first]}")
    records = []
    for name, path in sorted(listed[first].items()):
        record = {first: path}
        for k in folders:
            if k == first:
                continue
            if name not in listed[k]:
                if k in required:
                    raise ImageReadError(f"{path}: no {k} file named like it in {folders[k]}{_hint(name, k, listed)}")
                continue
            record[k] = listed[k][name]
        records.append(record)
    return records


def _hint(name: str, k: str, listed: dict[str, dict[str, Path]]) -> str:
    """What the error of a missing partner adds: the name looked for, and a file of the same name in another
    sub-folder (partners used to be matched by file name alone: a flat mask folder beside nested images)."""
    base = name.rsplit("/", 1)[-1]
    elsewhere = [p for key, p in listed[k].items() if key.rsplit("/", 1)[-1] == base]
    hint = f" (looked for {name!r} relative to the folder, any image extension)"
    if elsewhere:
        hint += f"; {elsewhere[0]} has that file name in another sub-folder: partners need the same relative path"
    return hint


def integer_labels(values: np.ndarray, path: str | Path) -> np.ndarray:
    """``(H, W)`` or ``(C, H, W)`` label values read as float -> the same shape as int64.

    Masks are read through :func:`read_image` (float32), so a float mask holding 0.9 would otherwise be truncated to
    class 0. Integer-valued floats (3.0 in a float32 TIFF) are accepted; any other value raises
    :class:`ImageReadError` naming the file, an example value and where it is.
    """
    fraction = values != np.round(values)
    if fraction.any():
        where = np.argwhere(fraction)[0]
        value = float(values[tuple(where)])
        position = f"row {where[-2]}, col {where[-1]}" + (f", band {where[0] + 1}" if values.ndim == 3 else "")
        raise ImageReadError(
            f"{path}: label value {value:g} at ({position}) is not an integer ({int(fraction.sum())} such pixel(s)); "
            "masks hold class ids, not probabilities or resampled values (resample masks with nearest neighbour)"
        )
    return values.astype(np.int64)


@contextlib.contextmanager
def quiet_georeferencing() -> Iterator[None]:
    """rasterio's ``NotGeoreferencedWarning`` silenced: PNG/JPEG tiles and plain TIFFs have no CRS, which is fine for
    training data (whole-scene inference says it once, where outputs lose their georeferencing). rasterio warns when
    a dataset is opened, so only the opening needs it."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


@contextlib.contextmanager
def open_raster(path: str | Path, what: str = "image") -> Iterator[DatasetReader]:
    """``rasterio.open(path)`` for reading, without the not-georeferenced warning (:func:`quiet_georeferencing`).

    A missing file raises :class:`ImageReadError` ``"{what} not found: {path}"``; GDAL's errors while opening or
    reading in the ``with`` block (corrupt or truncated files) raise ``"cannot read {what} {path}: {reason}"``.
    """
    import rasterio
    from rasterio.errors import RasterioError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{what} not found: {path}")
    try:
        with quiet_georeferencing():
            src = rasterio.open(path)
        with src:
            yield src
    except RasterioError as err:
        raise ImageReadError(f"cannot read {what} {path}: {err}") from err


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
    from rasterio.enums import Resampling

    with open_raster(path) as src:  # corrupt or truncated files surface here (GDAL read errors)
        if bands is not None and (min(bands) < 1 or max(bands) > src.count):
            raise ImageReadError(f"{path}: bands {list(bands)} requested, the file has {src.count} band(s)")
        shape = None if out_shape is None else (len(bands or range(src.count)), *out_shape)
        data = src.read(list(bands) if bands is not None else None, out_shape=shape, resampling=Resampling.bilinear)
    if expected_bands is not None and data.shape[0] != expected_bands:
        raise ImageReadError(f"{path}: expected {expected_bands} band(s), got {data.shape[0]}")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ImageReadError(f"{path}: {int((~np.isfinite(data)).sum())} NaN/Inf pixel value(s)")
    return data


def check_band_selection(path: str | Path, bands: Sequence[int] | None, count: int) -> None:
    """1-based ``bands`` picked from a file of ``count`` bands: an :class:`ImageReadError` naming the file when one
    is not there."""
    if bands and max(bands) > count:
        raise ImageReadError(f"{path}: bands {list(bands)} requested, the file has {count}")


def image_header(path: str | Path) -> tuple[int, int, int]:
    """``(bands, H, W)`` from the file header, with :class:`ImageReadError` for missing or unreadable files."""
    with open_raster(path) as src:
        return src.count, src.height, src.width


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

    path = Path(path)
    data = data[None] if data.ndim == 2 else data
    profile = {"count": data.shape[0], "height": data.shape[1], "width": data.shape[2], "dtype": data.dtype.name}
    if like is not None:
        with open_raster(like, "raster") as src:
            if (src.height, src.width) == data.shape[1:] and src.crs is not None:
                profile.update(crs=src.crs, transform=src.transform)
    tiff = path.suffix.lower() in (".tif", ".tiff")
    profile["driver"] = "GTiff" if tiff else {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}[path.suffix.lower()]
    if tiff:
        profile.update(compress="deflate", tiled=data.shape[1] >= 256 and data.shape[2] >= 256)
    if nodata is not None:
        profile["nodata"] = nodata

    def write(tmp: Path) -> None:
        with quiet_georeferencing(), rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)

    write_atomic(path, write)
    return path
