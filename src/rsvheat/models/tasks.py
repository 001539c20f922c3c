"""Downstream models on the RS-vHeat backbone: segmentation (UPerNet), change detection (siamese UPerNet on feature
differences) and object detection (torchvision Faster R-CNN with an FPN on the four stages).

Every model takes the backbone's input: a ``(B, C, H, W)`` tensor of one modality, or a ``{modality: tensor}`` mapping
of co-registered images fused in the stem (optical + SAR, WHU-OPT-SAR style).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rsvheat.models.rsvheat import RSVHeat

Image = torch.Tensor | Mapping[str, torch.Tensor]


def _spatial_size(x: Image) -> tuple[int, int]:
    first = next(iter(x.values())) if isinstance(x, Mapping) else x
    height, width = first.shape[-2:]
    return height, width


class UPerNet(nn.Module):
    """UPerNet (PSP on stage 4 + FPN over stages 1-4, SMP's decoder) and a 1×1 classifier, logits upsampled
    bilinearly to the input size: ``(B, C, H, W) -> (B, num_classes, H, W)``."""

    def __init__(self, channels: Sequence[int], num_classes: int, width: int = 256, norm: str = "batchnorm") -> None:
        super().__init__()
        # SMP's decoder expects [1, 1/2, 1/4, ..., 1/32] features and drops the first two.
        self.decoder = UPerNetDecoder([0, 0, *channels], encoder_depth=5, decoder_channels=width, use_norm=norm)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.decoder([None, None, *features]))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """RS-vHeat backbone + UPerNet."""

    def __init__(self, backbone: RSVHeat, num_classes: int, decoder_width: int = 256, decoder_norm: str = "batchnorm"):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = UPerNet(backbone.dims, num_classes, decoder_width, decoder_norm)

    def forward(self, x: Image) -> torch.Tensor:
        features = self.backbone.forward_intermediates(x, intermediates_only=True)
        return self.head(features, _spatial_size(x))


class ChangeDetectionModel(nn.Module):
    """Siamese (weight-shared) RS-vHeat on the two dates; per stage ``|f_A - f_B|`` (order-invariant, so A/B swaps give
    the same map) concatenated with ``f_A + f_B`` projected back to the stage width, then UPerNet to one change logit
    per pixel: ``(B, C, H, W) × 2 -> (B, 1, H, W)``."""

    def __init__(self, backbone: RSVHeat, decoder_width: int = 128, decoder_norm: str = "batchnorm") -> None:
        super().__init__()
        self.backbone = backbone
        self.merge = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in backbone.dims)
        self.head = UPerNet(backbone.dims, 1, decoder_width, decoder_norm)

    def forward(self, before: Image, after: Image) -> torch.Tensor:
        if _spatial_size(before) != _spatial_size(after):
            raise ValueError(f"the two dates differ in size: {_spatial_size(before)} vs {_spatial_size(after)}")
        both: Image
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            both = {k: torch.cat([before[k], after[k]]) for k in before}
        elif isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
            both = torch.cat([before, after])
        else:
            raise TypeError("the two dates must both be tensors or both {modality: tensor} mappings")
        features = self.backbone.forward_intermediates(both, intermediates_only=True)
        merged = []
        for merge, f in zip(self.merge, features, strict=True):
            a, b = f.chunk(2)
            merged.append(merge(torch.cat([(a - b).abs(), a + b], dim=1)))
        return self.head(merged, _spatial_size(before))


class BackboneWithFPN(nn.Module):
    """torchvision detection backbone: the four stages through an FPN (+ max-pooled level), ``OrderedDict`` of
    ``(B, out_channels, H/4·2^i, ...)`` keyed ``"0".."3", "pool"`` as Faster R-CNN's defaults expect."""

    def __init__(self, backbone: RSVHeat, out_channels: int = 256) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(list(backbone.dims), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body.forward_intermediates(x, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def faster_rcnn(
    backbone: RSVHeat,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    **detector_kwargs,
) -> FasterRCNN:
    """torchvision Faster R-CNN (horizontal boxes) on RS-vHeat + FPN. ``num_classes`` excludes the background.

    Inputs are lists of ``(C, H, W)`` images of any size, already normalised by the data pipeline (so the detector's
    own normalisation is the identity); it resizes them to ``min_size``/``max_size``, and pads to a multiple of 32.
    ``detector_kwargs`` go to torchvision's ``FasterRCNN`` (anchor sampling, proposal counts, NMS thresholds, ...).
    """
    channels = next(iter(backbone.modalities.values()))
    return FasterRCNN(
        BackboneWithFPN(backbone),
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        image_mean=[0.0] * channels,
        image_std=[1.0] * channels,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
        **detector_kwargs,
    )
