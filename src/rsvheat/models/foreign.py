"""Task checkpoints of TorchGeo's Lightning tasks whose backbone is an RS-vHeat/vHeat model, served like rsvheat's own.

TorchGeo's ``ClassificationTask`` / ``MultiLabelClassificationTask`` (``model: rsvheat_tiny``, a timm model) and
``SemanticSegmentationTask`` (``model: upernet``, ``backbone: tu-rsvheat_tiny``, an SMP model) save their
constructor arguments and the network under ``model.``. From those the network is rebuilt here without TorchGeo or
Lightning and without importing anything the file names; the file is read as untrusted (tensors and plain data only).
TorchGeo keeps the input normalisation in its data modules, not in the checkpoint, so the statistics come from the
caller (``--mean``/``--std`` on the command line).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from torch import nn

from rsvheat.models.checkpoint import CheckpointError, find_backbone
from rsvheat.models.rsvheat import VARIANTS, RSVHeat

__all__ = ["SMP_ARCHITECTURES", "is_torchgeo_checkpoint", "torchgeo_network"]

#: TorchGeo's segmentation ``model`` names -> the SMP class it builds (those an RS-vHeat encoder supports)
SMP_ARCHITECTURES = {"unet": "Unet", "upernet": "UPerNet", "segformer": "Segformer", "dpt": "DPT"}


def is_torchgeo_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """A Lightning checkpoint of a TorchGeo task: hyper-parameters naming a ``model`` and ``in_channels``, no
    ``rsvheat`` entry."""
    h = checkpoint.get("hyper_parameters")
    return "rsvheat" not in checkpoint and isinstance(h, Mapping) and {"model", "in_channels"} <= set(h)


def _variant(name: object, path: Path, field: str) -> str:
    if not isinstance(name, str) or name.removeprefix("tu-") not in VARIANTS:
        raise CheckpointError(
            f"{path} is a TorchGeo checkpoint whose {field} is {name!r}, not an RS-vHeat/vHeat model "
            f"({', '.join(VARIANTS)}): rsvheat serves only its own backbones"
        )
    return name.removeprefix("tu-")


def torchgeo_network(checkpoint: Mapping[str, Any], path: Path) -> tuple[str, nn.Module, RSVHeat, dict[str, Any]]:
    """``(spec name, network, backbone, hyper-parameters)`` of a TorchGeo checkpoint, the network holding its weights.
    The hyper-parameters are rsvheat's (``modalities``, ``num_classes``, ``backbone``, ``img_size``), as the task
    contract reads them. Change detection and other tasks are refused with the reason."""
    h = dict(checkpoint["hyper_parameters"])
    in_channels = int(h["in_channels"])
    num_classes = int(h.get("num_classes") or h.get("num_labels") or 1)
    if "pos_weight" in h:
        raise CheckpointError(
            f"{path} is a TorchGeo change-detection checkpoint: rsvheat serves TorchGeo's "
            "classification and segmentation tasks (train change detection with `rsvheat fit`)"
        )
    if "backbone" in h:  # SemanticSegmentationTask: an SMP model on a tu- encoder
        variant = _variant(h["backbone"], path, "backbone")
        arch = SMP_ARCHITECTURES.get(str(h["model"]))
        if arch is None:
            raise CheckpointError(
                f"{path}: TorchGeo segmentation model {h['model']!r} on an RS-vHeat encoder is not supported "
                f"({', '.join(SMP_ARCHITECTURES)} are)"
            )
        import segmentation_models_pytorch as smp  # the train extra

        network: nn.Module = getattr(smp, arch)(
            encoder_name=f"tu-{variant}", encoder_weights=None, in_channels=in_channels, classes=num_classes
        )
        spec = "segmentation"
    else:  # ClassificationTask / MultiLabelClassificationTask: the timm model itself
        variant = _variant(h["model"], path, "model")
        network = timm.create_model(variant, num_classes=num_classes, in_chans=in_channels)
        spec = "multilabel" if h.get("task") == "multilabel" else "classification"
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: no state_dict in the checkpoint")
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        network.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not rebuild its TorchGeo {spec} network: {str(err).splitlines()[0]}"
        ) from err
    backbone = find_backbone(network)
    hparams = {
        "backbone": variant,
        "modalities": dict(backbone.modalities),
        "num_classes": num_classes,
        "img_size": backbone.img_size,
        "source": "torchgeo",
    }
    return spec, network, backbone, hparams
