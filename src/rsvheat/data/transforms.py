"""The sample layout and tensor transforms shared by the task datasets: TorchGeo's key names, normalisation, joint
random crops and flips of co-registered images and label maps (the same window and flip for every array of a sample).

Samples are dicts with TorchGeo 0.8's keys: ``image`` ``(C, H, W)`` (a change pair: ``(2, C, H, W)``, the two dates
stacked), ``mask`` ``(H, W)`` int64 for segmentation and change, ``label`` (a class index; for detection ``(N,)``
labels beside ``bbox_xyxy`` ``(N, 4)``). A model fusing several stems finds the optical (or only) stem's bands in
``image`` and every other stem's under its own name, e.g. ``sar`` (see :func:`sample_keys`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

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


#: What a data module's ``aug`` is called with and returns: a training batch, ``{key: (B, ...) tensor}``.
BatchAugmentation = Callable[[dict], dict]


def batch_augmentation(aug: object) -> BatchAugmentation:
    """A data module's ``aug`` as a function of a training batch, one geometry for every image and mask of a sample.

    ``aug`` is a kornia ``AugmentationSequential`` (TorchGeo's way: run on the batch, on its device), an
    albumentations ``Compose`` (TerraTorch's way: run per sample on the CPU, numpy ``(H, W, C)``), or any callable
    that takes and returns the batch dict. Images are every floating ``(B, C, H, W)`` entry (a change pair's
    ``(B, 2, C, H, W)`` counts as two images), the label map is ``mask`` ``(B, H, W)``; other entries pass through.
    The images are already normalised (zero mean, unit std per band): geometric and noise transforms apply as they
    are, colour transforms that assume ``[0, 1]`` do not."""
    module = type(aug).__module__.split(".")[0]
    if module == "kornia":
        return _KorniaBatch(aug)
    if module == "albumentations":
        return _AlbumentationsBatch(aug)
    if callable(aug):
        return aug
    raise TypeError(f"aug must be a kornia or albumentations pipeline or a callable on the batch, got {type(aug)}")


def _image_keys(batch: Mapping[str, object]) -> list[str]:
    return [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim in (4, 5)]


def _split(batch: Mapping[str, torch.Tensor], keys: list[str]) -> list[torch.Tensor]:
    """Every image of the batch as ``(B, C, H, W)``: a ``(B, T, C, H, W)`` entry gives ``T`` of them."""
    return [x for k in keys for x in (batch[k].unbind(1) if batch[k].ndim == 5 else [batch[k]])]


def _join(batch: dict, keys: list[str], images: Iterable[torch.Tensor]) -> None:
    it = iter(images)
    for k in keys:
        batch[k] = torch.stack([next(it) for _ in range(batch[k].shape[1])], 1) if batch[k].ndim == 5 else next(it)


class _KorniaBatch:
    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        keys = _image_keys(batch)
        inputs = _split(batch, keys)
        data_keys = ["input"] * len(inputs)
        mask = batch.get("mask")
        if mask is not None:
            inputs.append(mask[:, None].float())
            data_keys.append("mask")
        out = self.pipeline(*inputs, data_keys=data_keys)
        out = list(out) if isinstance(out, list | tuple) else [out]
        if mask is not None:
            batch["mask"] = out.pop().squeeze(1).round().to(mask.dtype)
        _join(batch, keys, out)
        return batch


class _AlbumentationsBatch:
    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.targets: set[str] = set()

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        keys = _image_keys(batch)
        device = batch[keys[0]].device
        per_image = [x.permute(0, 2, 3, 1).cpu().numpy() for x in _split(batch, keys)]  # each (B, H, W, C)
        names = ["image"] + [f"image{i}" for i in range(1, len(per_image))]
        extra = {n: "image" for n in names[1:] if n not in self.targets}
        if extra:  # the further images of a sample get the first one's geometry
            self.pipeline.add_targets(extra)
            self.targets.update(extra)
        mask = batch.get("mask")
        results: list[list[np.ndarray]] = [[] for _ in names]
        masks = []
        for i in range(len(per_image[0])):
            sample = {n: np.ascontiguousarray(images[i]) for n, images in zip(names, per_image, strict=True)}
            if mask is not None:
                sample["mask"] = mask[i].cpu().numpy()
            out = self.pipeline(**sample)
            for j, n in enumerate(names):
                results[j].append(out[n])
            if mask is not None:
                masks.append(out["mask"])
        if mask is not None:
            batch["mask"] = torch.from_numpy(np.stack(masks)).to(device=device, dtype=mask.dtype)
        images = (torch.from_numpy(np.stack(r)).permute(0, 3, 1, 2).contiguous().to(device) for r in results)
        _join(batch, keys, images)
        return batch
