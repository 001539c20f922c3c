"""Sliding-window prediction of dense maps (segmentation logits, change logits) over images of any size.

Windows of ``tile`` pixels overlap by ``overlap`` pixels; each window's output is weighted by a separable ramp that
falls towards the window's edges (but not at the image border), so seams between windows blend instead of jumping.
The weights of all windows sum to the normaliser, so a model that returns its input reproduces the image exactly.

The window grid and the weights are shared by the trainers (validation on whole images, :func:`sliding_window`) and
by whole-scene inference (:mod:`rsvheat.inference.scene`, which blends the same windows strip by strip); it lives with
the models so that both import it from below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Image = torch.Tensor | Mapping[str, torch.Tensor]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts covering ``[0, length)`` with windows of ``tile`` and at least ``overlap`` shared pixels; the last
    window ends exactly at ``length`` (no padding)."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_weights(size: int, start: int, length: int, overlap: int, device=None) -> torch.Tensor:
    """1-D weights of a window ``[start, start + size)`` in an axis of ``length``: a linear ramp over ``overlap``
    pixels at edges shared with a neighbour, flat (1) elsewhere and at the image border."""
    w = torch.ones(size, device=device)
    ramp = min(overlap, size // 2)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, device=device, dtype=torch.float32) / (ramp + 1)
        if start > 0:
            w[:ramp] = up
        if start + size < length:
            w[-ramp:] = up.flip(0)
    return w


def window_grid(height: int, width: int, tile: int, overlap: int) -> tuple[int, int, int, list[int], list[int]]:
    """Windows over a ``height x width`` image: ``(th, tw, overlap, tops, lefts)``, windows of ``th x tw`` pixels
    (``tile``, or the image's side where it is smaller: one window along that axis) starting at ``tops`` x ``lefts``,
    with the overlap clamped to fit the window."""
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap ({overlap}) must be in [0, tile) with tile = {tile}")
    th, tw = min(tile, height), min(tile, width)
    overlap = min(overlap, th - 1, tw - 1)
    return th, tw, overlap, tile_starts(height, th, overlap), tile_starts(width, tw, overlap)


def _crop(x: Image, top: int, left: int, h: int, w: int) -> Image:
    if isinstance(x, Mapping):
        return {k: v[..., top : top + h, left : left + w] for k, v in x.items()}
    return x[..., top : top + h, left : left + w]


def _size(x: Image) -> tuple[int, int]:
    first = next(iter(x.values())) if isinstance(x, Mapping) else x
    height, width = first.shape[-2:]
    return height, width


@torch.no_grad()
def sliding_window(
    predict: Callable[..., torch.Tensor], *inputs: Image, tile: int = 512, overlap: int = 64
) -> torch.Tensor:
    """Apply ``predict(*windows) -> (B, K, h, w)`` over windows of ``inputs`` (co-registered ``(B, C, H, W)`` tensors or
    ``{modality: tensor}`` mappings) and blend: returns ``(B, K, H, W)`` float32. An image no larger than ``tile`` is
    predicted in one call."""
    height, width = _size(inputs[0])
    if any(_size(x) != (height, width) for x in inputs):
        raise ValueError(f"inputs must share their size, got {[_size(x) for x in inputs]}")
    th, tw, overlap, tops, lefts = window_grid(height, width, tile, overlap)
    out: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    for top in tops:
        wy = blend_weights(th, top, height, overlap)
        for left in lefts:
            pred = predict(*(_crop(x, top, left, th, tw) for x in inputs)).float()
            if out is None or norm is None:  # the first window: both are made together
                out = pred.new_zeros(pred.shape[0], pred.shape[1], height, width)
                norm = pred.new_zeros(height, width)
            weight = wy.to(pred.device)[:, None] * blend_weights(tw, left, width, overlap, pred.device)[None, :]
            out[..., top : top + th, left : left + tw] += pred * weight
            norm[top : top + th, left : left + tw] += weight
    if out is None or norm is None:
        raise ValueError(f"no window to predict in a {height} x {width} image")
    return out / norm
