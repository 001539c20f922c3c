"""The sample layout and tensor transforms shared by the task datasets: TorchGeo's key names, normalisation, joint
random crops and flips of co-registered images and label maps (the same window and flip for every array of a sample).

Samples are dicts with TorchGeo 0.8's keys: ``image`` ``(C, H, W)`` (a change pair: ``(2, C, H, W)``, the two dates
stacked), ``mask`` ``(H, W)`` int64 for segmentation and change, ``label`` (a class index; for detection ``(N,)``
labels beside ``bbox_xyxy`` ``(N, 4)``). A model fusing several stems finds the optical (or only) stem's bands in
``image`` and every other stem's under its own name, e.g. ``sar`` (see :func:`sample_keys`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch


def sample_keys(modalities: Iterable[str]) -> dict[str, str]:
    """``{modality: sample key}``: the optical stem (or the only one, e.g. SAR-only) reads ``image``, as in TorchGeo's
    datasets; further stems read their own name (``{"optical": "image", "sar": "sar"}``)."""
    names = list(modalities)
    main = "optical" if "optical" in names else names[0]
    return {m: "image" if m == main else m for m in names}


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(C, H, W)`` array -> float32 tensor with per-band ``(x - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def random_window(height: int, width: int, size: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Top-left corner of a random ``size × size`` window inside ``height × width`` (0 on a side that is smaller)."""
    top = int(torch.randint(0, max(height - size, 0) + 1, (), generator=generator))
    left = int(torch.randint(0, max(width - size, 0) + 1, (), generator=generator))
    return top, left


def crop_and_flip(arrays: Mapping[str, torch.Tensor], size: int | None, flip: bool) -> dict[str, torch.Tensor]:
    """The same random crop (if ``size``) and random horizontal/vertical flips and 90° rotation (if ``flip``) of every
    ``(..., H, W)`` tensor in ``arrays``. Images smaller than ``size`` are kept whole (the collate pads nothing, so
    crop sizes should not exceed the smallest image)."""
    first = next(iter(arrays.values()))
    height, width = first.shape[-2:]
    out = dict(arrays)
    if size is not None:
        top, left = random_window(height, width, size)
        out = {k: v[..., top : top + size, left : left + size] for k, v in out.items()}
    if flip:
        if torch.rand(()) < 0.5:
            out = {k: v.flip(-1) for k, v in out.items()}
        if torch.rand(()) < 0.5:
            out = {k: v.flip(-2) for k, v in out.items()}
        if out[next(iter(out))].shape[-1] == out[next(iter(out))].shape[-2] and torch.rand(()) < 0.5:
            out = {k: v.transpose(-1, -2) for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}
