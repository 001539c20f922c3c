"""RS-vHeat self-supervised pre-training: frequency-domain hierarchical masking + multi-domain reconstruction.

One step, for a batch of images ``x`` of one modality (optical or SAR), or a co-registered optical+SAR pair:

1. split ``x`` in the DCT domain into ``I_low`` and ``I_high`` (:class:`FrequencyMasking`, ``I_low + I_high = x``);
2. run the shared encoder (its stem for that modality) on both, as one batch of ``2B``;
3. fuse the two streams per stage (``concat -> 1x1 conv``; the official checkpoints' ``fuse_frequency``);
4. decode: stages 3 and 4 (stride 16 and 32) are projected, stage 4 upsampled and added, refined by a 3x3 conv, and a
   per-modality 1x1 conv predicts the ``16 x 16`` pixels of each stride-16 cell (pixel shuffle) = the reconstruction;
5. losses: ``L_spa = |x_hat - x|_1``, ``L_fre = |DCT(x_hat) - DCT(x)|_1`` (orthonormal DCT, so both are in the same
   units), ``L_con`` = contrastive consistency in the shared heat space between the pooled stage-4 features of
   ``I_low`` and ``I_high`` of the same image and, for pairs, between the fused optical and SAR features.
   ``L = w_spa L_spa + w_fre L_fre + w_con L_con`` (default 1:1:1; a weight of 0 switches the term off).

``L_con`` is a symmetric InfoNCE over the batch (positives: the two views of the same image/scene; negatives: the
other images), which cannot collapse to a constant embedding; with a batch of one there are no negatives and it falls
back to ``1 - cos``. The paper names "cosine similarity"; its decoder widths are not published (paper-digest 2.3), so
the decoder here is deliberately light (it is thrown away after pre-training).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rsvheat.models.rsvheat import VARIANTS, RSVHeat
from rsvheat.operators.dct import dct2d
from rsvheat.pretraining.masking import FrequencyMasking, FrequencySplit

DECODER_STRIDE = 16  # the decoder works on stage 3's grid


@dataclass
class PretrainOutput:
    """``loss``: weighted total; ``terms``: each loss term (unweighted, detached for logging when not used);
    ``parts``: the two halves of ``L_con``, detached, for logging: ``con_freq`` (low vs high views, mean over
    modalities) and, for pairs, ``con_modal`` (optical vs SAR); ``previews``: per modality ``(x, I_low, I_high,
    reconstruction)``, each ``(B, C, H, W)``, detached."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    previews: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between rows of ``a`` and ``b`` ``(B, D)`` (row i of each is a positive pair);
    ``1 - cos`` when ``B == 1``."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if a.shape[0] == 1:
        return 1 - (a * b).sum(-1).mean()
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def spatial_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_spa``: mean absolute error in pixel space."""
    return F.l1_loss(recon, target)


def frequency_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_fre``: mean absolute error between orthonormal 2-D DCT-II spectra."""
    return F.l1_loss(dct2d(recon.float()), dct2d(target.float()))


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class ReconstructionDecoder(nn.Module):
    """Stage-3 and stage-4 features -> image. ``(B, C3, H/16, W/16), (B, C4, H/32, W/32) -> (B, C_m, H, W)``."""

    def __init__(self, dims: tuple[int, int], width: int, out_channels: Mapping[str, int]) -> None:
        super().__init__()
        self.lateral3 = ConvNormAct(dims[0], width)
        self.lateral4 = ConvNormAct(dims[1], width)
        self.refine = ConvNormAct(width, width, kernel=3)
        # One pixel head per modality (band counts differ); each predicts the 16x16 pixels of a stride-16 cell.
        self.pixels = nn.ModuleDict({m: nn.Conv2d(width, c * DECODER_STRIDE**2, 1) for m, c in out_channels.items()})

    def forward(self, f3: torch.Tensor, f4: torch.Tensor, modality: str, size: tuple[int, int]) -> torch.Tensor:
        x = self.lateral3(f3) + F.interpolate(self.lateral4(f4), size=f3.shape[-2:], mode="bilinear")
        x = F.pixel_shuffle(self.pixels[modality](self.refine(x)), DECODER_STRIDE)
        return x[..., : size[0], : size[1]]


class FrequencyPretrainer(nn.Module):
    """The pre-training model: encoder + frequency fusion + reconstruction decoder + contrastive projection.

    Args:
        variant: encoder architecture (a key of :data:`rsvheat.models.VARIANTS`, e.g. ``"rsvheat_base"``).
        modalities: stems by name and band count; ``"optical"`` and ``"sar"`` pair up for the cross-modal term.
        img_size: pre-training resolution (FVE/SCE are stored at it).
        ratio_range, sector_degrees, ratio_part: frequency masking (see :class:`FrequencyMasking`).
        loss_weights: ``{"spa": 1, "fre": 1, "con": 1}``; 0 switches a term off.
        reconstruct_from: ``"both"`` (the paper's reading: the fused ``I_low`` and ``I_high`` streams are decoded, so
            no information is hidden from the decoder) or ``"low"``: the decoder sees the ``I_low`` stream alone and
            must predict the hidden high frequencies (masked frequency modelling); ``I_high`` still feeds ``L_con``.
        decoder_width, proj_dim, temperature: decoder and contrastive head sizes.
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
        reconstruct_from: str = "both",
        decoder_width: int = 256,
        proj_dim: int = 128,
        temperature: float = 0.1,
        encoder_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown encoder variant {variant!r}; available: {sorted(VARIANTS)}")
        modalities = dict(modalities or {"optical": 3, "sar": 1})
        weights = {"spa": 1.0, "fre": 1.0, "con": 1.0, **(loss_weights or {})}
        if set(weights) != {"spa", "fre", "con"} or any(w < 0 for w in weights.values()):
            raise ValueError(f"loss_weights takes non-negative 'spa', 'fre', 'con', got {dict(loss_weights or {})}")
        if reconstruct_from not in ("both", "low"):
            raise ValueError(f"reconstruct_from must be 'both' or 'low', got {reconstruct_from!r}")
        self.loss_weights = weights
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
        # With reconstruct_from="low" nothing is fused: a module outside the loss would leave DDP unused parameters.
        self.fuse_frequency = (
            nn.ModuleList(nn.Conv2d(2 * d, d, 1) for d in dims[-2:]) if reconstruct_from == "both" else None
        )
        self.decoder = ReconstructionDecoder((dims[-2], dims[-1]), decoder_width, modalities)
        self.projector = (
            nn.Sequential(nn.Linear(dims[-1], dims[-1]), nn.GELU(), nn.Linear(dims[-1], proj_dim))
            if weights["con"]
            else None
        )
        self.temperature = temperature

    def encode(self, low: torch.Tensor, high: torch.Tensor, modality: str):
        """Both streams through the shared encoder in one pass; returns the stage-3/4 maps the decoder reads (fused,
        or the ``I_low`` stream's with ``reconstruct_from="low"``) and the pooled stage-4 features of each stream
        ``(B, C4)``."""
        feats = self.encoder.forward_intermediates(
            torch.cat([low, high]), indices=(2, 3), intermediates_only=True, modality=modality
        )
        if self.fuse_frequency is None:
            fused = [f.chunk(2)[0] for f in feats]
        else:
            fused = [fuse(torch.cat(f.chunk(2), dim=1)) for fuse, f in zip(self.fuse_frequency, feats, strict=True)]
        pooled_low, pooled_high = feats[-1].mean((2, 3)).chunk(2)
        return fused, pooled_low, pooled_high

    def forward(self, batch: Mapping[str, torch.Tensor], split: Mapping[str, FrequencySplit] | None = None):
        """``batch``: ``{modality: (B, C_m, H, W)}``, one modality or a co-registered optical+SAR pair (same B).
        ``split`` (optional) gives the frequency splits instead of drawing them (for tests and previews)."""
        if not batch:
            raise ValueError("empty batch")
        w = self.loss_weights
        spa, fre, con, fused_pool, previews = [], [], [], {}, {}
        for modality, x in batch.items():
            if modality not in self.encoder.modalities:
                raise ValueError(f"unknown modality {modality!r}; the encoder has {sorted(self.encoder.modalities)}")
            parts = split[modality] if split is not None else self.masking(x)
            (f3, f4), pooled_low, pooled_high = self.encode(parts.low, parts.high, modality)
            recon = self.decoder(f3, f4, modality, x.shape[-2:])
            spa.append(spatial_loss(recon, x))
            if w["fre"]:
                fre.append(frequency_loss(recon, x))
            if w["con"]:
                con.append(info_nce(self.projector(pooled_low), self.projector(pooled_high), self.temperature))
                fused_pool[modality] = f4.mean((2, 3))
            previews[modality] = tuple(t.detach() for t in (x, parts.low, parts.high, recon))
        if w["con"] and "optical" in fused_pool and "sar" in fused_pool:
            z_opt, z_sar = self.projector(fused_pool["optical"]), self.projector(fused_pool["sar"])
            con.append(info_nce(z_opt, z_sar, self.temperature))
        terms = {"spa": torch.stack(spa).mean()}
        if fre:
            terms["fre"] = torch.stack(fre).mean()
        parts = {}
        if con:
            terms["con"] = torch.stack(con).mean()
            views = len(batch)  # one low/high term per modality, then the cross-modal one if any
            parts["con_freq"] = torch.stack(con[:views]).mean().detach()
            if len(con) > views:
                parts["con_modal"] = con[views].detach()
        loss = sum(w[name] * value for name, value in terms.items())
        return PretrainOutput(loss=loss, terms=terms, previews=previews, parts=parts)
