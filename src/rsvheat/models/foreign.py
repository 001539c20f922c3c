"""Task checkpoints of TorchGeo's and TerraTorch's Lightning tasks whose backbone is an RS-vHeat/vHeat model, served
like rsvheat's own.

TorchGeo's ``ClassificationTask`` / ``MultiLabelClassificationTask`` (``model: rsvheat_tiny``, a timm model) and
``SemanticSegmentationTask`` (``model: upernet``, ``backbone: tu-rsvheat_tiny``, an SMP model) save their
constructor arguments and the network under ``model.``. From those the network is rebuilt here without TorchGeo or
Lightning and without importing anything the file names. TerraTorch's ``SemanticSegmentationTask`` and
``ClassificationTask`` built by its ``EncoderDecoderFactory`` on ``timm_rsvheat_*`` are rebuilt by that factory
(TerraTorch's decoders are its own: it must be installed) from the stored plain ``model_args``. The file is read as
untrusted (tensors and plain data only). Neither tool keeps the input normalisation in the checkpoint (it lives in
their data modules), so the statistics come from the caller (``--mean``/``--std`` on the command line).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from rsvheat.models.checkpoint import CheckpointError, find_backbone
from rsvheat.models.rsvheat import VARIANTS, RSVHeat

__all__ = ["SMP_ARCHITECTURES", "foreign_network"]

#: TorchGeo's segmentation ``model`` names -> the SMP class it builds (those an RS-vHeat encoder supports)
SMP_ARCHITECTURES = {"unet": "Unet", "upernet": "UPerNet", "segformer": "Segformer", "dpt": "DPT"}
#: TerraTorch's ``task`` hyper-parameters served, each by rsvheat's task spec of the same name
_TERRATORCH_TASKS = ("segmentation", "classification")


def foreign_network(checkpoint: Mapping[str, Any], path: Path) -> tuple[str, nn.Module, RSVHeat, dict[str, Any]] | None:
    """``(spec name, network, backbone, hyper-parameters)`` of a TorchGeo or TerraTorch task checkpoint (None for any
    other file), the network holding the checkpoint's weights and returning the task's logits. The hyper-parameters
    are rsvheat's (``modalities``, ``num_classes``, ``backbone``, ``img_size``, ``source``: the tool), as the task
    contract reads them. Other tasks and backbones are refused with the reason."""
    h = checkpoint.get("hyper_parameters")
    if "rsvheat" in checkpoint or not isinstance(h, Mapping):
        return None
    if {"model_factory", "model_args", "task"} <= set(h):
        return _terratorch_network(checkpoint, dict(h), path)
    if {"model", "in_channels"} <= set(h):
        return _torchgeo_network(checkpoint, dict(h), path)
    return None


def _variant(name: object, path: Path, tool: str, field: str, prefix: str) -> str:
    if not isinstance(name, str) or name.removeprefix(prefix) not in VARIANTS:
        raise CheckpointError(
            f"{path} is a {tool} checkpoint whose {field} is {name!r}, not an RS-vHeat/vHeat model "
            f"({', '.join(prefix + v for v in VARIANTS)}): rsvheat serves only its own backbones"
        )
    return name.removeprefix(prefix)


def _with_weights(
    network: nn.Module, checkpoint: Mapping[str, Any], path: Path, spec: str, tool: str, variant: str, classes: int
) -> tuple[str, nn.Module, RSVHeat, dict[str, Any]]:
    """``network`` with the checkpoint's ``model.*`` weights, and rsvheat's hyper-parameters for it."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: no state_dict in the checkpoint")
    # TerraTorch's auxiliary heads serve its training loss only
    weights = {
        k.removeprefix("model."): v
        for k, v in state.items()
        if k.startswith("model.") and not k.startswith("model.aux_heads.")
    }
    try:
        network.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not rebuild its {tool} {spec} network: {str(err).splitlines()[0]}") from err
    backbone = find_backbone(network)
    hparams = {
        "backbone": variant,
        "modalities": dict(backbone.modalities),
        "num_classes": classes,
        "img_size": backbone.img_size,
        "source": tool.lower(),
    }
    return spec, network.eval(), backbone, hparams


def _torchgeo_network(checkpoint: Mapping[str, Any], h: dict[str, Any], path: Path):
    in_channels = int(h["in_channels"])
    num_classes = int(h.get("num_classes") or h.get("num_labels") or 1)
    if "pos_weight" in h:
        raise CheckpointError(
            f"{path} is a TorchGeo change-detection checkpoint: rsvheat serves TorchGeo's "
            "classification and segmentation tasks (train change detection with `rsvheat fit`)"
        )
    if "backbone" in h:  # SemanticSegmentationTask: an SMP model on a tu- encoder
        variant = _variant(h["backbone"], path, "TorchGeo", "backbone", "tu-")
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
        variant = _variant(h["model"], path, "TorchGeo", "model", "")
        network = timm.create_model(variant, num_classes=num_classes, in_chans=in_channels)
        spec = "multilabel" if h.get("task") == "multilabel" else "classification"
    return _with_weights(network, checkpoint, path, spec, "TorchGeo", variant, num_classes)


class _TerraTorchLogits(nn.Module):
    """A TerraTorch model returning its output tensor (TerraTorch returns a ``ModelOutput``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).output


def _terratorch_network(checkpoint: Mapping[str, Any], h: dict[str, Any], path: Path):
    spec = str(h["task"])
    if spec not in _TERRATORCH_TASKS:
        raise CheckpointError(
            f"{path} is a TerraTorch {h['task']!r} checkpoint: rsvheat serves TerraTorch's "
            f"{' and '.join(_TERRATORCH_TASKS)} tasks"
        )
    args = h["model_args"]
    if h["model_factory"] != "EncoderDecoderFactory" or not isinstance(args, Mapping):
        raise CheckpointError(
            f"{path}: TerraTorch model factory {h['model_factory']!r} is not supported (EncoderDecoderFactory is)"
        )
    variant = _variant(args.get("backbone"), path, "TerraTorch", "backbone", "timm_")
    precision = torch.get_float32_matmul_precision()
    try:
        from terratorch.models import EncoderDecoderFactory
    except ImportError:
        raise CheckpointError(
            f"{path} is a TerraTorch checkpoint: its decoders are TerraTorch's, install it (pip install terratorch)"
        ) from None
    finally:
        torch.set_float32_matmul_precision(precision)  # TerraTorch's import lowers it for the whole process
    # the weights are the checkpoint's: nothing is downloaded
    args = {**args, "backbone_pretrained": False}
    try:
        network = EncoderDecoderFactory().build_model(spec, **args)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: TerraTorch cannot rebuild its model from model_args: {err}") from err
    spec, network, backbone, hparams = _with_weights(
        network, checkpoint, path, spec, "TerraTorch", variant, int(args.get("num_classes") or 1)
    )
    return spec, _TerraTorchLogits(network), backbone, hparams
