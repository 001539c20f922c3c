"""Pre-training datasets: unpaired optical or SAR folders, paired OPT-SAR folders (SEN1-2-like) and BigEarthNet S1/S2.

Every dataset yields ``{modality: (C, crop, crop) float32 tensor}``: bands selected, SAR in dB, normalised per band,
randomly cropped (the same window for both images of a pair). Images smaller than the crop are first upsampled
(bilinear) so that their shorter side equals the crop.

**Scale.** With ``zoom_out=(1, 1)`` a crop is ``crop`` source pixels wide: pre-training sees the archive at its own
ground sampling only. Downstream tasks often see the same imagery coarser (a whole 600² AID scene resized to 224²
is 2.7x coarser); ``zoom_out=(1, f)`` makes each crop cover ``crop × s`` source pixels, ``s`` drawn log-uniformly in
``[1, f]`` (capped by the image's shorter side), area-resampled to ``crop``: multi-scale pre-training at the same
cost per step.

**Normalisation.** Per-band mean and standard deviation, given (``stats``) or computed from up to ``stats_samples``
images of the source and cached as JSON under ``$RSVHEAT_CACHE`` (default ``~/.cache/rsvheat``), keyed by the file
list and the band selection, so a second run starts at once.

**SAR.** ``sar_scale="db"`` (default) takes SAR pixels as backscatter in dB (BigEarthNet S1 GeoTIFFs, and 8-bit SEN1-2
PNGs, which are already a log-scaled quantity); ``sar_scale="linear"`` converts linear power (sigma0, e.g. float or
uint16 GRD) to dB first: ``10 log10(max(x, 1e-6))``. Normalisation then happens in dB.

**Bad files.** At construction every file's header is opened (missing, corrupt, wrong band count, a pair without its
partner, mismatched pair sizes); pixel-level problems (truncated data, NaN/Inf) are found when a sample is read. Each
raises :class:`ImageReadError` naming the file, or with ``skip_bad=True`` is skipped with a warning; an image that
fails to read is not tried again, in any DataLoader worker, and :func:`skipped_count` gives the total (construction
and reading) that the pre-training run reports at its end.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from rsvheat.data.io import ImageReadError, image_header, list_images, read_image, to_decibels
from rsvheat.data.stats import Stats, band_stats, check_stats
from rsvheat.data.transforms import random_window

SarScale = Literal["db", "linear"]
# One image of one modality = one or more files (BigEarthNet stores one band per file), each with its band list.
Record = dict[str, list[tuple[Path, tuple[int, ...] | None]]]


class PretrainImages(Dataset):
    """Base class: subclasses fill ``self.records`` (and ``self.channels``); this class reads, checks, normalises and
    crops.

    Args:
        crop_size: side of the random square crop.
        zoom_out: range of the crop's footprint in source pixels per output pixel (see the module docstring).
        repeat: the dataset is this many times its file list (each visit draws a new crop), for small archives.
        stats: ``{modality: {"mean": [...], "std": [...]}}``; computed from the data and cached when not given.
        stats_samples: images read to compute the statistics.
        sar_scale: how SAR pixels are stored (see module docstring).
        skip_bad: warn and skip bad files instead of raising.
    """

    def __init__(
        self,
        crop_size: int = 224,
        zoom_out: tuple[float, float] = (1.0, 1.0),
        repeat: int = 1,
        stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        stats_samples: int = 256,
        sar_scale: SarScale = "db",
        skip_bad: bool = False,
    ) -> None:
        if sar_scale not in ("db", "linear"):
            raise ValueError(f"sar_scale must be 'db' or 'linear', got {sar_scale!r}")
        low, high = (float(z) for z in zoom_out)
        if not 1 <= low <= high:
            raise ValueError(f"zoom_out must be a range (low, high) with 1 <= low <= high, got {tuple(zoom_out)}")
        self.crop_size = crop_size
        self.zoom_out = (low, high)
        self.repeat = max(1, int(repeat))
        self.sar_scale = sar_scale
        self.skip_bad = skip_bad
        self.skipped = 0
        self.records: list[Record] = []
        self.channels: dict[str, int] = {}
        self._stats_arg = stats
        self._stats_samples = stats_samples

    # -- to be called by subclasses once ``records`` and ``channels`` are set -----------------------------------------
    def _finish(self, origin: str) -> None:
        self.records = [r for r in self.records if self._header_ok(r)]
        if not self.records:
            raise ImageReadError(
                f"no usable images in {origin}" + (f" ({self.skipped} skipped)" if self.skipped else "")
            )
        if self.skipped:
            warnings.warn(f"{origin}: skipped {self.skipped} bad file(s), {len(self.records)} usable", stacklevel=3)
        # Shared memory: DataLoader workers mark what they could not read, the main process counts it.
        self.unreadable = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()
        self.stats = self._resolve_stats(self._stats_arg, self._stats_samples)
        self._mean = {m: torch.tensor(s["mean"], dtype=torch.float32)[:, None, None] for m, s in self.stats.items()}
        self._std = {m: torch.tensor(s["std"], dtype=torch.float32)[:, None, None] for m, s in self.stats.items()}

    def _problem(self, message: str) -> None:
        if not self.skip_bad:
            raise ImageReadError(message)
        warnings.warn(f"skipping: {message}", stacklevel=3)
        self.skipped += 1

    def _header_ok(self, record: Record) -> bool:
        shapes = {}
        for modality, files in record.items():
            n = 0
            for j, (path, bands) in enumerate(files):
                try:
                    count, h, w = image_header(path)
                except ImageReadError as err:
                    self._problem(str(err))
                    return False
                if bands is not None and max(bands) > count:
                    self._problem(f"{path}: bands {list(bands)} requested, the file has {count} band(s)")
                    return False
                n += len(bands) if bands is not None else count
                if j == 0:  # later files are resampled onto the first one's grid
                    shapes[modality] = (h, w, path)
            if n != self.channels[modality]:
                self._problem(f"{files[0][0]}: expected {self.channels[modality]} {modality} band(s), got {n}")
                return False
        if len({(h, w) for h, w, _ in shapes.values()}) > 1:
            detail = ", ".join(f"{p} is {h}x{w}" for h, w, p in shapes.values())
            self._problem(f"mismatched image pair: {detail}")
            return False
        return True

    # -- reading ------------------------------------------------------------------------------------------------------
    def _read_modality(self, modality: str, files: list[tuple[Path, tuple[int, ...] | None]]) -> np.ndarray:
        parts, shape = [], None
        for path, bands in files:
            part = read_image(path, bands, out_shape=shape)
            shape = shape or part.shape[1:]
            parts.append(part)
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if modality == "sar" and self.sar_scale == "linear":
            data = to_decibels(data)
        return data

    def read_raw(self, index: int) -> dict[str, np.ndarray]:
        """Un-normalised, uncropped ``{modality: (C, H, W)}`` of record ``index`` (no repeat)."""
        return {m: self._read_modality(m, files) for m, files in self.records[index].items()}

    def _resolve_stats(self, given, samples: int) -> Stats:
        if given is not None:
            return check_stats(given, self.channels)
        identity = [
            type(self).__name__,
            self.sar_scale,
            [{m: [(str(p), b) for p, b in f] for m, f in r.items()} for r in self.records],
        ]
        return band_stats(self.read_raw, len(self.records), self.channels, identity, samples, self.skip_bad)

    # -- Dataset protocol ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records) * self.repeat

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index %= len(self.records)
        while True:
            if self.unreadable[index]:
                readable = (~self.unreadable).nonzero().flatten()
                if not len(readable):
                    raise ImageReadError(f"every image failed to read ({len(self.records)} skipped)")
                index = int(readable[torch.randint(len(readable), ())])
            try:
                raw = self.read_raw(index)
                break
            except ImageReadError as err:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping: {err}", stacklevel=2)
                self.unreadable[index] = True
        images = {m: (torch.from_numpy(d) - self._mean[m]) / self._std[m] for m, d in raw.items()}
        return random_crop(images, self.crop_size, self.zoom_out)


def skipped_count(dataset: Dataset) -> int:
    """Files (records) a pre-training dataset, or a ``ConcatDataset`` of them, skipped as bad so far."""
    if isinstance(dataset, ConcatDataset):
        return sum(skipped_count(d) for d in dataset.datasets)
    if isinstance(dataset, PretrainImages):
        return dataset.skipped + int(dataset.unreadable.sum())
    return 0


def random_crop(
    images: Mapping[str, torch.Tensor], size: int, zoom_out: tuple[float, float] = (1.0, 1.0)
) -> dict[str, torch.Tensor]:
    """The same random window of every ``(C, H, W)`` image, ``size × size`` on output; upsample first if an image is
    smaller. The window is ``size × s`` source pixels wide, ``s`` log-uniform in ``zoom_out`` and capped by the
    shorter side, and is area-resampled (antialiased bilinear) to ``size`` when ``s > 1``."""
    h, w = next(iter(images.values())).shape[-2:]
    if min(h, w) < size:
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
        images = {m: F.interpolate(x[None], (h, w), mode="bilinear", align_corners=False)[0] for m, x in images.items()}
    low, high = (math.log(min(z, min(h, w) / size)) for z in zoom_out)
    window = max(size, round(size * math.exp(low + (high - low) * float(torch.rand(())))))
    top, left = random_window(h, w, window)
    crops = {m: x[:, top : top + window, left : left + window] for m, x in images.items()}
    if window == size:
        return {m: x.contiguous() for m, x in crops.items()}
    return {
        m: F.interpolate(x[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        for m, x in crops.items()
    }


def _as_bands(bands: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if bands is None else tuple(int(b) for b in bands)


class ImageFolderPretrain(PretrainImages):
    """Unpaired images of one modality, anywhere under ``root`` (PNG/JPG/TIFF/GeoTIFF).

    Args:
        modality: ``"optical"``, ``"sar"`` or any stem name of the model.
        channels: bands each image must provide (after ``bands`` selection).
        bands: 1-based band indices to use, e.g. ``[4, 3, 2]``; all bands by default.
    """

    def __init__(
        self,
        root: str | Path,
        modality: str = "optical",
        channels: int = 3,
        bands: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if bands is not None and len(bands) != channels:
            raise ValueError(f"{len(bands)} bands selected ({list(bands)}) for a {channels}-channel {modality} stem")
        self.channels = {modality: channels}
        self.records = [{modality: [(p, _as_bands(bands))]} for p in list_images(root)]
        self._finish(str(root))


_S1_TOKEN = re.compile(r"(?:(?<=[_/\-])|^)s1(?=[_./\-]|$)", re.IGNORECASE)


class PairedFolderPretrain(PretrainImages):
    """Co-registered optical/SAR pairs in a SEN1-2-like layout: ``root/<sar_dir>/...`` and ``root/<optical_dir>/...``.

    The partner of ``root/s1/a/b_s1_p3.png`` is ``root/s2/a/b_s1_p3.png`` or, with SEN1-2's naming,
    ``root/s2/a/b_s2_p3.png`` (an ``s1`` token in folder or file names is replaced by ``s2``; any suffix).
    """

    def __init__(
        self,
        root: str | Path,
        sar_dir: str = "s1",
        optical_dir: str = "s2",
        optical_channels: int = 3,
        sar_channels: int = 1,
        optical_bands: Sequence[int] | None = None,
        sar_bands: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        root = Path(root)
        self.channels = {"optical": optical_channels, "sar": sar_channels}
        optical_root = root / optical_dir
        if not optical_root.is_dir():
            raise FileNotFoundError(f"optical folder of the paired set not found: {optical_root}")
        by_stem: dict[str, Path] = {}
        for p in list_images(optical_root):
            key = str(p.relative_to(optical_root).with_suffix("")).lower()
            if key in by_stem:  # x.png beside x.tif: keeping one would drop the other without a word
                raise ImageReadError(f"{by_stem[key]} and {p} have the same name: keep one of them")
            by_stem[key] = p
        paired: set[Path] = set()
        for sar in list_images(root / sar_dir):
            rel = str(sar.relative_to(root / sar_dir).with_suffix("")).lower()
            partner = by_stem.get(rel) or by_stem.get(_S1_TOKEN.sub("s2", rel))
            if partner is None:
                self._problem(f"{sar}: no optical partner in {optical_root} (looked for {rel!r} and its s2 name)")
                continue
            paired.add(partner)
            self.records.append(
                {"optical": [(partner, _as_bands(optical_bands))], "sar": [(sar, _as_bands(sar_bands))]}
            )
        for optical in sorted(set(by_stem.values()) - paired):
            self._problem(f"{optical}: no SAR partner in {root / sar_dir}")
        self._finish(str(root))


class BigEarthNetPretrain(PretrainImages):
    """BigEarthNet (v1) Sentinel-1/Sentinel-2 patch pairs: one folder per patch, one GeoTIFF per band.

    Pairs come from each S1 patch's ``*_labels_metadata.json`` (``corresponding_s2_patch``). S2 bands on 20 m / 60 m
    grids are resampled (bilinear) onto the 10 m grid of the first band listed.

    Args:
        s1_root, s2_root: folders holding the S1 and S2 patch folders.
        s2_bands: optical bands, e.g. ``("B04", "B03", "B02")`` (RGB) or all twelve.
        s1_bands: SAR polarisations, ``("VV",)`` or ``("VV", "VH")`` (BigEarthNet S1 is in dB).
    """

    def __init__(
        self,
        s1_root: str | Path,
        s2_root: str | Path,
        s2_bands: Sequence[str] = ("B04", "B03", "B02"),
        s1_bands: Sequence[str] = ("VV",),
        **kwargs,
    ) -> None:
        if kwargs.setdefault("sar_scale", "db") != "db":
            raise ValueError(
                f"BigEarthNet S1 patches are stored in dB: sar_scale must be 'db', got {kwargs['sar_scale']!r}"
            )
        super().__init__(**kwargs)
        s1_root, s2_root = Path(s1_root), Path(s2_root)
        for folder in (s1_root, s2_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"BigEarthNet folder not found: {folder}")
        self.channels = {"optical": len(s2_bands), "sar": len(s1_bands)}
        for patch in sorted(p for p in s1_root.iterdir() if p.is_dir()):
            meta = patch / f"{patch.name}_labels_metadata.json"
            try:
                s2_name = json.loads(meta.read_text())["corresponding_s2_patch"]
            except (OSError, ValueError, KeyError) as err:
                self._problem(f"{meta}: cannot read the corresponding S2 patch ({err})")
                continue
            s2 = s2_root / s2_name
            if not s2.is_dir():
                self._problem(f"{patch}: its S2 partner {s2} is missing")
                continue
            self.records.append(
                {
                    "optical": [(s2 / f"{s2_name}_{b}.tif", None) for b in s2_bands],
                    "sar": [(patch / f"{patch.name}_{b}.tif", None) for b in s1_bands],
                }
            )
        self._finish(f"{s1_root} + {s2_root}")
