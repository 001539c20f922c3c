"""Frequency-domain hierarchical masking (RS-vHeat pre-training, paper section 3.2).

Each image is taken to the frequency domain with an orthonormal 2-D DCT-II, its coefficients are split by a region
around DC into a low-frequency part and a high-frequency ("masked") part, and both parts are taken back to pixels:

    I_low = IDCT(M * DCT(I)),   I_high = IDCT((1 - M) * DCT(I)),   I_low + I_high = I.

**The ratio, defined.** The paper says "masking ratio 20-30%" without saying of what; the official utility uses a
radius as a fraction of the padded diagonal. Here ``ratio`` is the **share of DCT coefficients in the high-frequency
part**: exactly ``round(ratio * H * W)`` coefficients, drawn per sample uniformly in ``ratio_range`` (default
0.2-0.3). The low region is a quarter disc around DC in normalised frequency, ``(n/H)^2 + (m/W)^2 < rho^2``, with
``rho`` set by the ratio (ties broken by coefficient index), so the region has the same shape for any ``H x W``.
``ratio_part="low"`` reads the ratio the other way (the share of coefficients kept in the low part; the digest's
reading (b), closer to the official utility's small low-pass disc). With ``sector_degrees`` the high part is
further restricted to a random angular sector of that width (measured from
the vertical-frequency axis), so the low region is the disc plus everything outside the sector.

Differences from the official ``masked_frequency.py`` (deliberate): no zero-padding to a power of two (the DCT works
for any size), an orthonormal DCT instead of an unnormalised one, and DC belongs to the low part only, so the two parts
add up to the image (officially DC is in both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsvheat.operators.dct import DctImpl, dct2d, idct2d


@dataclass
class FrequencySplit:
    """``low``, ``high``: ``(B, C, H, W)`` images; ``high_mask``: ``(B, H, W)`` bool, True for high-frequency
    coefficients; ``ratio``: ``(B,)`` share of coefficients in the high part."""

    low: torch.Tensor
    high: torch.Tensor
    high_mask: torch.Tensor
    ratio: torch.Tensor


def normalised_radius(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``sqrt((n/H)^2 + (m/W)^2)`` for every DCT coefficient ``(n, m)``: ``(H, W)``, 0 at DC."""
    n = torch.arange(h, device=device, dtype=torch.float64)[:, None] / h
    m = torch.arange(w, device=device, dtype=torch.float64)[None, :] / w
    return torch.sqrt(n**2 + m**2)


def smallest_sector_share(degrees: float) -> float:
    """Smallest share of the normalised spectrum ``[0, 1)^2`` that a sector of this width holds, over its start
    angles: the sector touching an axis (a triangle of area ``tan(w) / 2``, or the square less one for ``w > 45``)."""
    width = math.radians(degrees)
    return 0.5 * math.tan(width) if degrees <= 45 else 1.0 - 0.5 * math.tan(math.pi / 2 - width)


def smallest_sector_for(share: float) -> float:
    """The narrowest sector (degrees) whose :func:`smallest_sector_share` is ``share``."""
    return math.degrees(math.atan(2 * share) if share <= 0.5 else math.pi / 2 - math.atan(2 * (1 - share)))


class FrequencyMasking(torch.nn.Module):
    """Split images into low- and high-frequency parts in the DCT domain (a transform usable on its own).

    Args:
        ratio_range: ``(min, max)`` share of coefficients in the high part, drawn uniformly per sample.
        sector_degrees: if given, the high part lies in a random angular sector of this width (0 < width <= 90).
        ratio_part: ``"high"`` (default): ``ratio`` is the high part's share of coefficients; ``"low"``: the low part's.
        impl: DCT implementation (``"auto"`` picks the FFT from 256 px on).
    """

    def __init__(
        self,
        ratio_range: tuple[float, float] = (0.2, 0.3),
        sector_degrees: float | None = None,
        ratio_part: str = "high",
        impl: DctImpl = "auto",
    ) -> None:
        super().__init__()
        lo, hi = ratio_range
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"ratio_range must satisfy 0 <= min <= max < 1, got {ratio_range}")
        if ratio_part not in ("high", "low"):
            raise ValueError(f"ratio_part must be 'high' or 'low', got {ratio_part!r}")
        self.ratio_part = ratio_part
        if sector_degrees is not None and not 0 < sector_degrees <= 90:
            raise ValueError(f"sector_degrees must be in (0, 90], got {sector_degrees}")
        most_high = hi if ratio_part == "high" else 1.0 - lo  # the largest share the high part may have to hold
        least = smallest_sector_share(sector_degrees) if sector_degrees is not None else 1.0
        if least < most_high:
            # Refused here, not at some random step of a long run when a narrow draw cannot hold the ratio.
            raise ValueError(
                f"a {sector_degrees} degree sector can hold as little as {least:.3f} of "
                f"the coefficients (when it touches an axis), less than the high part's largest share {most_high:.3f}: "
                f"use sector_degrees >= {smallest_sector_for(most_high):.1f} or change ratio_range"
            )
        self.ratio_range = (float(lo), float(hi))
        self.sector_degrees = sector_degrees
        self.impl = impl

    def draw(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random ``ratio`` ``(B,)`` and sector start angle ``(B,)`` in radians (None without sectors)."""
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
        if self.sector_degrees is None:
            return ratio, None
        span = math.radians(90 - self.sector_degrees)
        return ratio, span * torch.rand(batch, generator=generator, dtype=torch.float64)

    def high_mask(
        self,
        size: tuple[int, int],
        ratio: torch.Tensor,
        start: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``(B, H, W)`` bool mask of the high-frequency part for given ratios (and sector start angles)."""
        h, w = size
        total = h * w
        radius = normalised_radius(h, w, device).flatten()
        counts = torch.round(ratio.to(torch.float64) * total).long().to(radius.device)
        if self.ratio_part == "low":
            counts = total - counts
        # Rank by radius, ties by index: the k largest radii form the high part, exactly k coefficients.
        order = torch.argsort(radius, stable=True)
        if start is None:
            rank = torch.empty_like(order)
            rank[order] = torch.arange(total, device=order.device)
            return (rank[None] >= total - counts[:, None]).view(-1, h, w)
        masks = torch.zeros(len(counts), total, dtype=torch.bool, device=radius.device)
        n = torch.arange(h, device=radius.device, dtype=torch.float64)[:, None] / h
        m = torch.arange(w, device=radius.device, dtype=torch.float64)[None, :] / w
        angle = torch.atan2(m, n).expand(h, w).flatten()
        assert self.sector_degrees is not None  # a start angle is drawn only for a sector
        width = math.radians(self.sector_degrees)
        for b, (k, theta) in enumerate(zip(counts.tolist(), start.tolist(), strict=True)):
            inside = order[((angle[order] >= theta) & (angle[order] <= theta + width))]
            if k > inside.numel():
                raise ValueError(
                    f"a {self.sector_degrees} degree sector holds {inside.numel()} of {total} coefficients, "
                    f"fewer than the {k} the ratio {ratio[b]:.3f} asks for: widen the sector or lower the ratio"
                )
            if k:
                masks[b, inside[inside.numel() - k :]] = True
        return masks.view(-1, h, w)

    def forward(
        self,
        images: torch.Tensor,
        ratio: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> FrequencySplit:
        """images: ``(B, C, H, W)`` or ``(C, H, W)`` (any band count and size). ``ratio``/``start`` override the
        random draw (e.g. to reproduce a split)."""
        squeeze = images.ndim == 3
        if squeeze:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) or (C, H, W) images, got shape {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values: fill or drop them before frequency masking")
        b, _, h, w = images.shape
        if ratio is None:
            ratio, drawn_start = self.draw(b, generator)
            start = drawn_start if start is None else start
        elif self.sector_degrees is not None and start is None:
            raise ValueError("with sectors, pass `start` together with `ratio`")
        mask = self.high_mask((h, w), ratio, start, images.device)
        spectrum = dct2d(images, self.impl)
        high_part = mask[:, None].to(spectrum.dtype)
        both = idct2d(torch.stack([spectrum * (1 - high_part), spectrum * high_part]), self.impl)
        low, high = both[0], both[1]
        if squeeze:
            low, high, mask = low[0], high[0], mask[0]
        return FrequencySplit(low=low, high=high, high_mask=mask, ratio=ratio.to(images.dtype))
