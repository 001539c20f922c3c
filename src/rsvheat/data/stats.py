"""Per-band normalisation statistics: given by the user, or computed from a sample of the data and cached as JSON
under ``$RSVHEAT_CACHE/stats`` (default ``~/.cache/rsvheat``), keyed by the files sampled and the reading options."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from rsvheat.data.io import ImageReadError
from rsvheat.files import write_atomic
from rsvheat.progress import bar

Stats = dict[str, dict[str, list[float]]]


def cache_dir() -> Path:
    return Path(os.environ.get("RSVHEAT_CACHE", Path.home() / ".cache" / "rsvheat"))


def check_stats(given: Mapping[str, Mapping[str, Sequence[float]]], channels: Mapping[str, int]) -> Stats:
    """``{modality: {"mean": [...], "std": [...]}}`` with one value per band of every modality, as floats."""
    stats = {m: {"mean": list(map(float, s["mean"])), "std": list(map(float, s["std"]))} for m, s in given.items()}
    for m, c in channels.items():
        if m not in stats or len(stats[m]["mean"]) != c or len(stats[m]["std"]) != c:
            raise ValueError(f"stats for {m!r} must give {c} mean and std values, got {given.get(m)}")
        if min(stats[m]["std"]) <= 0:
            raise ValueError(f"stats for {m!r}: std must be positive, got {stats[m]['std']}")
    return stats


def _with_file_signatures(identity: object) -> object:
    if isinstance(identity, str | os.PathLike) and os.path.isfile(identity):
        info = os.stat(identity)
        return [str(identity), info.st_size, info.st_mtime_ns]
    if isinstance(identity, Mapping):
        return {str(k): _with_file_signatures(v) for k, v in identity.items()}
    if isinstance(identity, list | tuple):
        return [_with_file_signatures(v) for v in identity]
    return identity


def band_stats(
    read: Callable[[int], Mapping[str, np.ndarray]],
    count: int,
    channels: Mapping[str, int],
    identity: object,
    samples: int = 256,
    skip_bad: bool = False,
    progress: bool = True,
) -> Stats:
    """Mean and std per band of every modality over up to ``samples`` items ``read(i) -> {modality: (C, H, W)}``
    spread evenly over ``range(count)``. ``identity`` (JSON-able: file names, options) keys the cache; the files it
    names are keyed with their size and modification time too, so replacing a file recomputes the statistics.
    ``progress``: a bar over the items read (a first run over large rasters takes minutes), on stderr when it is a
    terminal."""
    picks = sorted(set(np.linspace(0, count - 1, min(samples, count)).round().astype(int).tolist()))
    signed = json.dumps([_with_file_signatures(identity), picks], default=str)
    key = hashlib.sha1(signed.encode()).hexdigest()[:16]
    path = cache_dir() / "stats" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    total: dict[str, np.ndarray] = {}
    total_sq: dict[str, np.ndarray] = {}
    pixels: dict[str, int] = {}
    for i in bar(picks, desc="normalisation statistics", unit="image", progress=progress):
        try:
            raw = read(i)
        except ImageReadError as err:
            if not skip_bad:
                raise
            warnings.warn(f"normalisation statistics: skipping {err}", stacklevel=2)
            continue
        for m, data in raw.items():
            flat = data.reshape(data.shape[0], -1).astype(np.float64)
            total[m] = total.get(m, 0) + flat.sum(1)
            total_sq[m] = total_sq.get(m, 0) + (flat**2).sum(1)
            pixels[m] = pixels.get(m, 0) + flat.shape[1]
    stats = {}
    for m in channels:
        if m not in pixels:
            raise ImageReadError(f"no readable {m!r} image to compute normalisation statistics from")
        mean = total[m] / pixels[m]
        std = np.sqrt(np.maximum(total_sq[m] / pixels[m] - mean**2, 0.0))
        stats[m] = {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist()}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(stats)))  # a concurrent run never reads half a file
    return stats
