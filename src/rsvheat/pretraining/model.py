"""RS-vHeat self-supervised pre-training: frequency-domain masking + multi-domain reconstruction + contrast.

Two readings of the method share this file; ``views`` picks one.

``views="crops"`` (the default): **two augmented views, each split in frequency**. For a batch ``x`` of one
modality (or a co-registered optical+SAR pair, cropped alike):

1. draw two views of each image (:class:`ViewAugment`: random resized crop, flips, 90 degree turns);
2. split each view in the DCT domain (:class:`FrequencyMasking`) and give the encoder its ``I_low`` alone: the
   ``I_high`` band is hidden, a target, never an input;
3. (with the reconstruction terms on; off by default, see below) decode each view's stage-3/4 features into the
   whole view: ``L_spa = |x_hat - x|_1`` over pixels and
   ``L_fre = |DCT(x_hat) - DCT(x)|_1`` over the **hidden** coefficients only (Xie et al., "Masked Frequency Modeling
   for Self-Supervised Visual Pre-Training", ICLR 2023), so the loss cannot be lowered by copying what was seen;
4. ``L_con``: symmetric InfoNCE between the pooled, projected stage-4 features of the two views of an image (SimCLR,
   Chen et al. 2020, with the frequency split as one of the augmentations) and, for pairs, between the optical and
   SAR features of the same view. With ``negatives=K`` (MoCo, He et al. 2020) each view's query is matched to the
   other view's key from a momentum copy of encoder and projector, against a queue of the ``K`` latest keys: a
   batch of 12 on a CPU offers 22 negatives, which the views tell apart within a few hundred steps (the InfoNCE
   falls to a few % of ``ln B`` and stops teaching); thousands of queued keys keep the task hard. With
   ``local_crops=N`` (multi-crop, Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
   Assignments", NeurIPS 2020) each image also gives N small views at half the side, each matched to both full-size
   views: more positive pairs per step for a fraction of a view's cost, and parts matched to the whole scene.

``views="low_high"`` (the paper's reading, kept for comparison): the encoder sees ``I_low`` and ``I_high`` of the
image itself, the two streams are fused per stage (``concat -> 1x1 conv``, the official ``fuse_frequency``) and decoded
(``reconstruct_from="both"``, so nothing is hidden from the decoder; ``"low"`` decodes the ``I_low`` stream alone),
and ``L_con`` pairs the pooled ``I_low`` and ``I_high`` features of one image.

Why the default differs: the ``I_high`` band (20-30 % of the coefficients, under 1 % of an image's energy) carries too
little of the scene for its embedding to be matched to its ``I_low`` partner; at initialisation the positives are
*less* alike than the negatives (the InfoNCE starts above ``ln B``), the quickest descent maps every image to one
direction, and there the InfoNCE sits at ``ln B`` with a vanishing gradient (reproduced in
``tests/test_pretrain_model.py``). Two views that both carry the scene learn at once.

``L = w_spa L_spa + w_fre L_fre + w_con L_con``; a weight of 0 switches a term off (and its modules are not built).
The default is the contrast alone (0:0:1): measured on AID (``docs/transfer.md``), the reconstruction terms make the
frozen features worse at every budget tried, even with the band they ask for hidden; ``{"spa": 1, "fre": 1, "con":
1}`` is RS-vHeat's full objective. The decoder is deliberately light (its widths are not published, paper-digest 2.3;
it is thrown away after pre-training).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from rsvheat.models.rsvheat import VARIANTS, RSVHeat
from rsvheat.operators.dct import dct2d
from rsvheat.pretraining.masking import FrequencyMasking, FrequencySplit

DECODER_STRIDE = 16  # the decoder works on stage 3's grid
#: The terms' default weights: the view contrast alone (see the module docstring for why).
DEFAULT_LOSS_WEIGHTS = {"spa": 0.0, "fre": 0.0, "con": 1.0}
VIEWS = ("crops", "low_high")


@dataclass
class PretrainOutput:
    """``loss``: weighted total; ``terms``: each loss term (unweighted, detached for logging when not used);
    ``parts``: the two halves of ``L_con``, detached, for logging: ``con_freq`` (the view pair, mean over
    modalities) and, for pairs, ``con_modal`` (optical vs SAR); ``previews``: per modality ``(x, I_low, I_high,
    reconstruction)`` of the first view, each ``(B, C, H, W)``, detached; ``embeddings``: per modality the projected
    embeddings of the two views ``((B, D), (B, D))``, detached, for :func:`embedding_health`."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    previews: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE between rows of ``a`` and ``b`` ``(B, D)`` (row i of each is a positive pair);
    ``1 - cos`` when ``B == 1``. Chance level is ``ln B``."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if a.shape[0] == 1:
        return 1 - (a * b).sum(-1).mean()
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def queue_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE of ``query`` ``(B, D)`` against its ``key`` ``(B, D)`` (row i of each is a positive pair, the key
    without gradient) with the L2-normalised rows of ``queue`` ``(K, D)`` as negatives. Chance level is
    ``ln(K + 1)``."""
    query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    logits = torch.cat([(query * key).sum(-1, keepdim=True), query @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


def _gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every process, concatenated along dim 0 (``x`` itself outside ``torch.distributed``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    out = x.new_empty((torch.distributed.get_world_size() * x.shape[0], *x.shape[1:]))
    torch.distributed.all_gather_into_tensor(out, x.contiguous())
    return out


#: below this, :func:`embedding_health`'s ``std`` reads as a collapsed embedding (1 = spread over the sphere)
COLLAPSE_STD = 0.1


@torch.no_grad()
def embedding_health(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> dict[str, float]:
    """Collapse monitors of two views' embeddings ``(B, D)`` (row i of each from the same image), cheap enough for
    every step:

    - ``std``: mean per-dimension std of the L2-normalised embeddings times ``sqrt(D)`` (SimSiam's monitor, scaled so
      that embeddings spread over the sphere give ~1 and a collapse to one direction gives 0);
    - ``rank``: effective rank (RankMe, Garrido et al. 2023: ``exp`` of the entropy of the normalised singular
      values) of both views' normalised embeddings, between 1 (collapsed) and ``min(2B, D)``;
    - ``alignment`` (mean squared distance of positives, lower is better) and ``uniformity`` (``log`` mean
      ``exp(-2 d^2)`` over all pairs, lower is more uniform), Wang & Isola 2020;
    - ``nce_ratio``: the InfoNCE over ``ln B`` (1 = chance: nothing tells the positives apart).
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    both = torch.cat([a, b])
    sv = torch.linalg.svdvals(both)
    p = sv / sv.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    n = a.shape[0]
    return {
        "std": (both.std(0).mean() * math.sqrt(both.shape[1])).item(),
        "rank": rank.item(),
        "alignment": (a - b).pow(2).sum(-1).mean().item(),
        "uniformity": torch.pdist(both).pow(2).mul(-2).exp().mean().log().item(),
        "nce_ratio": info_nce(a, b, temperature).item() / math.log(n) if n > 1 else float("nan"),
    }


def _embed(encoder: RSVHeat, projector: nn.Module, x: torch.Tensor, modality: str) -> torch.Tensor:
    """The projected, pooled stage-4 features ``(B, D)`` of images ``(B, C, H, W)``."""
    (stage4,) = encoder.forward_intermediates(x, indices=(3,), intermediates_only=True, modality=modality)
    return projector(stage4.mean((2, 3)))


class ViewAugment(nn.Module):
    """Random views of images: a random resized crop (area share in ``scale``, aspect ratio in ``ratio``), horizontal
    and vertical flips and a random multiple of 90 degrees (remote-sensing scenes have no upright), resampled
    bilinearly to the input size in one ``grid_sample``; with ``jitter`` > 0 also a radiometric jitter for any band
    count (SimCLR's colour distortion, generalised): per band a gain in ``1 ± jitter`` about the image's band mean and
    a shift of ``± jitter`` band std, and with probability ``jitter / 2`` every band replaced by the band mean.

    ``forward({modality: (B, C_m, H, W)}, size)`` draws one geometry per image and applies it to every modality, so a
    co-registered optical+SAR pair stays co-registered (the jitter is drawn per modality); returns the same dict of
    views of ``size`` ``(H, W)`` (default: the input's size).
    """

    def __init__(
        self, scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.0
    ) -> None:
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.scale, self.ratio, self.jitter = scale, ratio, jitter

    def radiometric(self, x: torch.Tensor) -> torch.Tensor:
        """The jitter of ``(B, C, H, W)`` images (identity when ``jitter`` is 0)."""
        if not self.jitter:
            return x
        b, c = x.shape[:2]
        mean = x.mean((2, 3), keepdim=True)
        std = x.std((2, 3), keepdim=True)
        gain = 1 + self.jitter * (2 * torch.rand(b, c, 1, 1, device=x.device, dtype=x.dtype) - 1)
        shift = self.jitter * (2 * torch.rand(b, c, 1, 1, device=x.device, dtype=x.dtype) - 1) * std
        x = (x - mean) * gain + mean + shift
        grey = torch.rand(b, 1, 1, 1, device=x.device) < self.jitter / 2
        return torch.where(grey, x.mean(1, keepdim=True).expand_as(x), x)

    def geometry(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(B, 2, 3)`` affine matrices in ``affine_grid``'s normalised coordinates."""
        area = torch.empty(batch, device=device).uniform_(*self.scale)
        log_ratio = torch.empty(batch, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        half_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # half-extents in [-1, 1] coordinates
        half_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        centre = (torch.rand(batch, 2, device=device) * 2 - 1) * torch.stack([1 - half_w, 1 - half_h], 1)
        flip = torch.randint(0, 2, (batch, 2), device=device) * 2 - 1
        turn = torch.randint(0, 4, (batch,), device=device) * (math.pi / 2)
        cos, sin = turn.cos().round(), turn.sin().round()
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (B, 2, 2)
        scale = torch.diag_embed(torch.stack([half_w, half_h], 1) * flip)
        return torch.cat([scale @ rotation, centre[..., None]], dim=2)

    def forward(
        self, images: Mapping[str, torch.Tensor], size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        first = next(iter(images.values()))
        theta = self.geometry(first.shape[0], first.device)
        views = {}
        for modality, x in images.items():
            shape = [*x.shape[:2], *size] if size else list(x.shape)
            grid = F.affine_grid(theta.to(x.dtype), shape, align_corners=False)
            view = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            views[modality] = self.radiometric(view)
        return views


def spatial_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_spa``: mean absolute error in pixel space."""
    return F.l1_loss(recon, target)


def frequency_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L_fre``: mean absolute error between orthonormal 2-D DCT-II spectra ``(B, C, H, W)``; with ``mask``
    ``(B, H, W)`` (True where a coefficient counts, e.g. the hidden band), the mean over those coefficients only."""
    error = (dct2d(recon.float()) - dct2d(target.float())).abs()
    if mask is None:
        return error.mean()
    weight = mask[:, None].to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class ReconstructionDecoder(nn.Module):
    """Stage-3 and stage-4 features -> image. ``(B, C3, H/16, W/16), (B, C4, H/32, W/32) -> (B, C_m, H, W)``."""

    def __init__(self, dims: tuple[int, int], width: int, out_channels: Mapping[str, int], depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"decoder_depth must be at least 1, got {depth}")
        self.lateral3 = ConvNormAct(dims[0], width)
        self.lateral4 = ConvNormAct(dims[1], width)
        self.refine = ConvNormAct(width, width, kernel=3)
        # MAE (He et al., CVPR 2022, Table 1a): a deeper decoder takes the pixel-level work off the encoder's last
        # stages, which then keep more of what a linear probe reads
        self.deeper = nn.Sequential(*(ConvNormAct(width, width, kernel=3) for _ in range(depth - 1)))
        # One pixel head per modality (band counts differ); each predicts the 16x16 pixels of a stride-16 cell.
        self.pixels = nn.ModuleDict({m: nn.Conv2d(width, c * DECODER_STRIDE**2, 1) for m, c in out_channels.items()})

    def forward(self, f3: torch.Tensor, f4: torch.Tensor, modality: str, size: tuple[int, int]) -> torch.Tensor:
        x = self.lateral3(f3) + F.interpolate(self.lateral4(f4), size=f3.shape[-2:], mode="bilinear")
        x = F.pixel_shuffle(self.pixels[modality](self.deeper(self.refine(x))), DECODER_STRIDE)
        return x[..., : size[0], : size[1]]


class FrequencyPretrainer(nn.Module):
    """The pre-training model: encoder + reconstruction decoder + contrastive projection (+ the paper reading's
    frequency fusion).

    Args:
        variant: encoder architecture (a key of :data:`rsvheat.models.VARIANTS`, e.g. ``"rsvheat_base"``).
        modalities: stems by name and band count; ``"optical"`` and ``"sar"`` pair up for the cross-modal term.
        img_size: pre-training resolution (FVE/SCE are stored at it).
        ratio_range, sector_degrees, ratio_part: frequency masking (see :class:`FrequencyMasking`).
        loss_weights: ``{"spa": 0, "fre": 0, "con": 1}`` by default (the contrast alone); ``{"spa": 1, "fre": 1,
            "con": 1}`` is the paper's objective; 0 switches a term off.
        views: ``"crops"`` (default: two augmented views, each seen through its ``I_low``; see the module docstring) or
            ``"low_high"`` (the paper's reading: ``I_low`` and ``I_high`` of one image are the two streams).
        reconstruct_from: with ``views="low_high"`` only: ``"both"`` (the paper's reading: the fused ``I_low`` and
            ``I_high`` streams are decoded, so nothing is hidden from the decoder) or ``"low"`` (the ``I_low`` stream
            alone). ``views="crops"`` always decodes from ``I_low``.
        crop_scale: area share range of :class:`ViewAugment`'s crops (``views="crops"``).
        local_crops: number of extra small views per image (multi-crop; ``views="crops"`` and the contrast only), each
            ``local_scale`` of the input's area resampled to half its side, seen through ``I_low`` when both full
            views are (``masked_views=2``), and matched to both full views; 0 (default): none.
        jitter: strength of :class:`ViewAugment`'s radiometric jitter (``views="crops"``; 0: none).
        masked_views: how many of the two crop views the encoder sees through their ``I_low`` (``views="crops"``):
            2 (default) both, 1 the first (the second is seen whole, as downstream images are), 0 neither (plain
            SimCLR views; for comparison). The reconstruction terms need both views masked.
        decoder_width, decoder_depth, proj_dim, temperature: decoder width and number of 3x3 blocks, contrastive
            head size, InfoNCE temperature.
        negatives: length of the queue of keys the view contrast draws its negatives from (MoCo); 0: the other
            images of the batch (SimCLR). The queue is shared by all processes under DDP (keys are gathered).
        momentum: the key encoder follows the encoder as ``key = m * key + (1 - m) * online`` every training step.
        encoder_kwargs: more :class:`RSVHeat` arguments (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        variant: str = "rsvheat_base",
        modalities: Mapping[str, int] | None = None,
        img_size: int = 224,
        ratio_range: tuple[float, float] = (0.2, 0.3),
        sector_degrees: float | None = None,
        ratio_part: str = "high",
        loss_weights: Mapping[str, float] | None = None,
        views: str = "crops",
        reconstruct_from: str = "low",
        crop_scale: tuple[float, float] = (0.25, 1.0),
        local_crops: int = 0,
        local_scale: tuple[float, float] = (0.05, 0.25),
        jitter: float = 0.0,
        masked_views: int = 2,
        decoder_width: int = 256,
        decoder_depth: int = 1,
        proj_dim: int = 128,
        temperature: float = 0.2,
        negatives: int = 0,
        momentum: float = 0.99,
        encoder_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__()
        if negatives < 0 or not 0 <= momentum < 1:
            raise ValueError(f"negatives must be >= 0 and momentum in [0, 1), got {negatives} and {momentum}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown encoder variant {variant!r}; available: {sorted(VARIANTS)}")
        modalities = dict(modalities or {"optical": 3, "sar": 1})
        weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        if set(weights) != {"spa", "fre", "con"} or any(w < 0 for w in weights.values()):
            raise ValueError(f"loss_weights takes non-negative 'spa', 'fre', 'con', got {dict(loss_weights or {})}")
        if not any(weights.values()):
            raise ValueError("loss_weights: at least one of 'spa', 'fre', 'con' must be positive")
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        if reconstruct_from not in ("both", "low"):
            raise ValueError(f"reconstruct_from must be 'both' or 'low', got {reconstruct_from!r}")
        if views == "crops" and reconstruct_from != "low":
            raise ValueError("views='crops' hides I_high from the encoder: reconstruct_from must be 'low'")
        if masked_views not in (0, 1, 2):
            raise ValueError(f"masked_views must be 0, 1 or 2, got {masked_views!r}")
        if masked_views < 2 and (weights["spa"] or weights["fre"]):
            raise ValueError("the reconstruction terms need masked_views=2: a view seen whole can be copied")
        if local_crops < 0 or (local_crops and (views != "crops" or not weights["con"])):
            raise ValueError(f"local_crops needs views='crops' and the contrastive term, got {local_crops}")
        self.masked_views = masked_views
        self.local_crops = local_crops
        self.loss_weights = weights
        self.views = views
        self.reconstruct_from = reconstruct_from
        self.variant = variant
        self.encoder = RSVHeat(
            **{**VARIANTS[variant], **dict(encoder_kwargs or {})},
            modalities=modalities,
            img_size=img_size,
            num_classes=0,
        )
        # The classifier head's norm is not on the pre-training path; frozen so that DDP sees no unused parameters.
        self.encoder.head.requires_grad_(False)
        dims = self.encoder.dims
        self.masking = FrequencyMasking(ratio_range, sector_degrees, ratio_part)
        self.augment = ViewAugment(crop_scale, jitter=jitter) if views == "crops" else None
        self.local_augment = ViewAugment(local_scale, jitter=jitter) if local_crops else None
        # Only the paper reading with both streams decoded fuses: a module outside the loss would leave DDP unused
        # parameters.
        self.fuse_frequency = (
            nn.ModuleList(nn.Conv2d(2 * d, d, 1) for d in dims[-2:]) if reconstruct_from == "both" else None
        )
        reconstructs = weights["spa"] > 0 or weights["fre"] > 0
        self.decoder = (
            ReconstructionDecoder((dims[-2], dims[-1]), decoder_width, modalities, decoder_depth)
            if reconstructs
            else None
        )
        self.projector = (
            nn.Sequential(nn.Linear(dims[-1], dims[-1]), nn.GELU(), nn.Linear(dims[-1], proj_dim))
            if weights["con"]
            else None
        )
        self.temperature = temperature
        self.momentum = momentum
        self.key_encoder: RSVHeat | None = None
        self.key_projector: nn.Module | None = None
        if negatives and self.projector is not None and views == "crops":
            self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
            for modality in modalities:  # random unit keys until the first K real ones have arrived
                self.register_buffer(f"queue_{modality}", F.normalize(torch.randn(negatives, proj_dim), dim=1))
            self.register_buffer("queue_next", torch.zeros(len(modalities), dtype=torch.long))
        elif negatives:
            raise ValueError("negatives (a queue of keys) needs views='crops' and a contrastive term")

    @torch.no_grad()
    def _momentum_update(self) -> None:
        assert self.key_encoder is not None and self.key_projector is not None and self.projector is not None
        pairs = [*zip(self.encoder.parameters(), self.key_encoder.parameters(), strict=True)]
        pairs += zip(self.projector.parameters(), self.key_projector.parameters(), strict=True)
        for online, key in pairs:
            key.lerp_(online.detach(), 1 - self.momentum)

    @torch.no_grad()
    def _keys(self, first: torch.Tensor, second: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The momentum encoder's normalised embeddings of both views ``(B, D)`` each."""
        assert self.key_encoder is not None and self.key_projector is not None
        keys = _embed(self.key_encoder, self.key_projector, torch.cat([first, second]), modality)
        k_first, k_second = F.normalize(keys, dim=-1).chunk(2)
        return k_first, k_second

    @torch.no_grad()
    def _enqueue(self, modality: str, keys: torch.Tensor) -> None:
        queue: torch.Tensor = getattr(self, f"queue_{modality}")
        keys = _gather(keys)[-queue.shape[0] :]
        slot = list(self.encoder.modalities).index(modality)
        next_row = cast(torch.Tensor, self.queue_next)
        rows = (next_row[slot] + torch.arange(keys.shape[0], device=keys.device)) % queue.shape[0]
        queue[rows] = keys.to(queue.dtype)
        next_row[slot] = (next_row[slot] + keys.shape[0]) % queue.shape[0]

    def view_contrast(
        self,
        z_first: torch.Tensor,
        z_second: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        modality: str,
        z_local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``L_con`` of the two views' projected embeddings ``(B, D)``: in-batch InfoNCE, or with a queue the MoCo
        loss of each view's query against the other view's key (``first``/``second``: the encoder's inputs). The
        small views' embeddings ``z_local`` ``(N * B, D)`` (multi-crop) are each matched to both full views; the
        loss is the mean over all pairs."""
        locals_ = [] if z_local is None else list(z_local.chunk(self.local_crops))
        if self.key_encoder is None:
            pairs = [(z_first, z_second), *((z, g) for z in locals_ for g in (z_first, z_second))]
            return torch.stack([info_nce(a, b, self.temperature) for a, b in pairs]).mean()
        step = self.training and torch.is_grad_enabled()  # a training step moves the key encoder and the queue
        if step:
            self._momentum_update()
        k_first, k_second = self._keys(first, second, modality)
        queue = getattr(self, f"queue_{modality}").clone()  # the loss reads the queue as it was before this batch
        pairs = [(z_first, k_second), (z_second, k_first), *((z, k) for z in locals_ for k in (k_first, k_second))]
        loss = torch.stack([queue_nce(q, k, queue, self.temperature) for q, k in pairs]).mean()
        if step:
            self._enqueue(modality, torch.cat([k_first, k_second]))
        return loss

    def local_views(self, images: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``local_crops`` small views of each image ``{modality: (N * B, C_m, H / 2, W / 2)}`` (view-major), seen
        through their ``I_low`` when every full view is."""
        assert self.local_augment is not None
        height, width = next(iter(images.values())).shape[-2:]
        size = (height // 2, width // 2)
        views = [self.local_augment(images, size) for _ in range(self.local_crops)]
        out = {m: torch.cat([v[m] for v in views]) for m in images}
        if self.masked_views == 2:
            out = {m: self.masking(x).low for m, x in out.items()}
        return out

    def encode(self, first: torch.Tensor, second: torch.Tensor, modality: str):
        """Both streams ``(B, C, H, W)`` through the shared encoder in one pass. Returns the stage-3/4 maps of each
        stream ``[(2B, C3, ...), (2B, C4, ...)]`` and the pooled stage-4 features of each ``(B, C4)``."""
        feats = self.encoder.forward_intermediates(
            torch.cat([first, second]), indices=(2, 3), intermediates_only=True, modality=modality
        )
        pooled_first, pooled_second = feats[-1].mean((2, 3)).chunk(2)
        return feats, pooled_first, pooled_second

    def _decoder_input(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the decoder reads: both views (crops), the fused streams (``both``) or the ``I_low`` stream."""
        if self.views == "crops":
            return feats
        if self.fuse_frequency is None:
            return [f.chunk(2)[0] for f in feats]
        return [fuse(torch.cat(f.chunk(2), dim=1)) for fuse, f in zip(self.fuse_frequency, feats, strict=True)]

    def forward(self, batch: Mapping[str, torch.Tensor], split: Mapping[str, FrequencySplit] | None = None):
        """``batch``: ``{modality: (B, C_m, H, W)}``, one modality or a co-registered optical+SAR pair (same B).
        ``split`` (optional, ``views="low_high"`` only) gives the frequency splits instead of drawing them (for
        tests)."""
        if not batch:
            raise ValueError("empty batch")
        for modality in batch:
            if modality not in self.encoder.modalities:
                raise ValueError(f"unknown modality {modality!r}; the encoder has {sorted(self.encoder.modalities)}")
        if split is not None and self.views != "low_high":
            raise ValueError("a given split needs views='low_high' (the crop views draw their own)")
        w = self.loss_weights
        if self.augment is not None:
            pairs = [self.augment(batch), self.augment(batch)]
            targets = {m: torch.cat([pairs[0][m], pairs[1][m]]) for m in batch}
        else:
            targets = dict(batch)
        small = self.local_views(batch) if self.local_augment is not None else {}
        spa, fre, con, cross, previews, embeddings = [], [], [], {}, {}, {}
        for modality, x in targets.items():
            parts = split[modality] if split is not None else self.masking(x)
            if self.views == "crops":  # the I_low of each masked view; I_high stays hidden
                first, second = (
                    low if i < self.masked_views else whole
                    for i, (low, whole) in enumerate(zip(parts.low.chunk(2), x.chunk(2), strict=True))
                )
            else:
                first, second = parts.low, parts.high
            feats, pooled_first, pooled_second = self.encode(first, second, modality)
            recon = None
            decoded = self._decoder_input(feats)
            if self.decoder is not None:
                f3, f4 = decoded
                recon = self.decoder(f3, f4, modality, x.shape[-2:])
                spa.append(spatial_loss(recon, x))
                if w["fre"]:
                    hidden = parts.high_mask if self.views == "crops" else None
                    fre.append(frequency_loss(recon, x, hidden))
            if self.projector is not None:
                z_first, z_second = self.projector(pooled_first), self.projector(pooled_second)
                z_local = _embed(self.encoder, self.projector, small[modality], modality) if small else None
                con.append(self.view_contrast(z_first, z_second, first, second, modality, z_local))
                embeddings[modality] = (z_first.detach(), z_second.detach())
                # the cross-modal term: the same view (crops) or the fused streams (low_high) of each modality
                cross[modality] = z_first if self.views == "crops" else self.projector(decoded[-1].mean((2, 3)))
            b = batch[modality].shape[0]
            shown = [t[:b].detach() for t in (x, parts.low, parts.high)]
            previews[modality] = (*shown, recon[:b].detach() if recon is not None else torch.zeros_like(shown[0]))
        if "optical" in cross and "sar" in cross:
            con.append(info_nce(cross["optical"], cross["sar"], self.temperature))
        terms, parts_log = {}, {}
        if spa:
            terms["spa"] = torch.stack(spa).mean()
        if fre:
            terms["fre"] = torch.stack(fre).mean()
        if con:
            terms["con"] = torch.stack(con).mean()
            views = len(batch)  # one view-pair term per modality, then the cross-modal one if any
            parts_log["con_freq"] = torch.stack(con[:views]).mean().detach()
            if len(con) > views:
                parts_log["con_modal"] = con[views].detach()
        loss = torch.stack([w[name] * value for name, value in terms.items()]).sum()
        return PretrainOutput(loss=loss, terms=terms, previews=previews, parts=parts_log, embeddings=embeddings)
