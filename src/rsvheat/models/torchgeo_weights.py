"""rsvheat and official vHeat weights through TorchGeo's ``weights=`` argument.

TorchGeo's tasks built on a timm model (``ClassificationTask``, ``MultiLabelClassificationTask``, ``RegressionTask``)
take a torchvision ``WeightsEnum`` member as ``weights=`` and load its ``get_state_dict()`` into the model with
``strict=False``. :class:`RSVHeatWeights` holds the official vHeat ImageNet-1k releases (downloaded once into torch's
hub cache, as timm's ``pretrained=True`` does); :func:`torchgeo_weights` makes a member for a file of your own (an
rsvheat ``.safetensors``, an official ``.pth``, a Lightning ``.ckpt``), read without unpickling code::

    from rsvheat.models.torchgeo_weights import RSVHeatWeights, torchgeo_weights
    ClassificationTask(model="vheat_tiny", weights=RSVHeatWeights.VHEAT_TINY_IN1K, num_classes=10)
    ClassificationTask(model="rsvheat_tiny", weights=torchgeo_weights("enc.safetensors", "rsvheat_tiny", in_chans=13),
                       in_channels=13, num_classes=10)

A state dict does not know the model it goes into, so each member names its target in ``meta`` (timm model name,
bands, stored size) and is converted for it with rsvheat's own rules: official key names converted, FVE/SCE resized to
the target's stored size, stems for other band counts adapted from the RGB one (:func:`~rsvheat.adapt_stem_weight`),
the checkpoint's classifier dropped; what the file lacks (a new classifier, RS-vHeat's SCE when starting from vHeat)
keeps the task's initialisation. Importing this module also lists :class:`RSVHeatWeights` under rsvheat's model names
in TorchGeo's weight registry, so a config may name a member as a string (``weights: RSVHeatWeights.VHEAT_TINY_IN1K``,
with ``rsvheat torchgeo fit``, which imports it).

TorchGeo's segmentation and change-detection tasks load an enum's state dict *strictly* into SMP's ``tu-`` encoder,
whose keys are the wrapper's (``model.model.stems...``) and include per-stage output norms no backbone file has: one
member cannot fit both that and a timm model. There, build the task with ``weights=None`` and load the file into it
with :func:`rsvheat.load_checkpoint` (it finds the backbone inside the task).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torchvision.models._api import Weights, WeightsEnum  # where TorchGeo's own weights come from

from rsvheat.models.checkpoint import checkpoint_filter_fn, find_backbone, read_weights_file
from rsvheat.models.rsvheat import VARIANTS, VHEAT_RELEASE_URLS

__all__ = ["RSVHeatWeights", "torchgeo_weights"]

_REPO = "https://github.com/MzeroMiko/vHeat"
_RGB = ("red", "green", "blue")


def backbone_state_dict(path: str | os.PathLike, model: str, in_chans: int, img_size: int) -> dict[str, torch.Tensor]:
    """The backbone tensors of a weights file, in the keys and shapes of ``timm.create_model(model,
    in_chans=in_chans, img_size=img_size)``: converted, resized and adapted, without a classifier; parts the file
    lacks are left out (the model keeps its initialisation)."""
    with torch.device("meta"):  # the target's key names and shapes only
        target = find_backbone(timm.create_model(model, num_classes=0, in_chans=in_chans, img_size=img_size))
    adapted = checkpoint_filter_fn(read_weights_file(path), target)  # the rules load_checkpoint applies
    return {key: value for key, value in adapted.items() if not value.is_meta}


def _hub_file(url: str, progress: bool) -> Path:
    """The file at ``url`` in torch's hub cache (the same place timm's ``pretrained=True`` puts it), downloaded once
    (torch writes a temporary file and renames it)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=progress)
    return path


class _RSVHeatWeightsEnum(WeightsEnum):
    """A ``WeightsEnum`` whose state dict is converted for the target its ``meta`` names."""

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``(progress=True)`` as TorchGeo calls it: the backbone state dict for ``meta["model"]``."""
        meta = self.meta
        path = meta.get("file") or _hub_file(self.url, bool(kwargs.get("progress", True)))
        return backbone_state_dict(path, meta["model"], meta["in_chans"], meta["img_size"])


def _official(size: str) -> Weights:
    name = f"vheat_{size}"
    return Weights(
        url=VHEAT_RELEASE_URLS[name],  # the release file timm's pretrained=True fetches
        transforms=None,  # TorchGeo's data modules normalise; the statistics are in meta
        meta={
            "model": name,
            "dataset": "ImageNet-1k",
            "in_chans": 3,
            "img_size": 224,
            "bands": _RGB,
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "depths": tuple(VARIANTS[name]["depths"]),
            "dims": tuple(VARIANTS[name]["dims"]),
            "publication": "https://arxiv.org/abs/2405.16555",
            "repo": _REPO,
            "license": None,  # the official repository states none
        },
    )


class RSVHeatWeights(_RSVHeatWeightsEnum):
    """The official vHeat ImageNet-1k weights for TorchGeo's ``weights=``: for ``model="vheat_<size>"``, RGB input at
    224 px. :func:`torchgeo_weights` re-targets them (an ``rsvheat_<size>`` model, other bands, another size)."""

    VHEAT_TINY_IN1K = _official("tiny")
    VHEAT_SMALL_IN1K = _official("small")
    VHEAT_BASE_IN1K = _official("base")


def torchgeo_weights(
    source: str | os.PathLike | RSVHeatWeights, model: str, in_chans: int = 3, img_size: int = 224
) -> WeightsEnum:
    """A ``WeightsEnum`` member for TorchGeo's ``weights=`` that loads ``source`` into ``model`` (a timm name:
    ``rsvheat_tiny``, ``vheat_base``, ...) with ``in_chans`` bands, stored at ``img_size`` (the task's
    ``in_channels``; timm's default size is 224).

    ``source``: a weights file (rsvheat ``.safetensors``, official vHeat/RS-vHeat ``.pth``, Lightning ``.ckpt``; checked
    now, read when TorchGeo asks) or an :class:`RSVHeatWeights` member (downloaded when TorchGeo asks)."""
    if model not in VARIANTS:
        raise ValueError(f"unknown model {model!r}: one of {', '.join(VARIANTS)}")
    meta = {"model": model, "in_chans": in_chans, "img_size": img_size}
    if isinstance(source, RSVHeatWeights):
        url, meta = source.url, {**source.meta, **meta}
        name = source.name
    else:
        path = Path(source).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {source}")
        url, meta = path.as_uri(), {**meta, "file": str(path)}
        name = "FILE"
    members = {name: Weights(url=url, transforms=None, meta=meta)}
    enum = _RSVHeatWeightsEnum("RSVHeatTargetWeights", members, module=__name__)
    return enum[name]


def _register_with_torchgeo() -> None:
    """List :class:`RSVHeatWeights` under rsvheat's model names in TorchGeo's registry, so that
    ``torchgeo.models.get_model_weights("vheat_tiny")`` and a config's string ``RSVHeatWeights.VHEAT_TINY_IN1K``
    find them. TorchGeo has no public registration function: its module-level table is the one place it looks."""
    try:
        from torchgeo.models import api
    except ImportError:  # TorchGeo not installed: nothing to register with
        return
    registry = getattr(api, "_model_weights", None)
    if isinstance(registry, dict):
        for name in VARIANTS:
            registry.setdefault(name, RSVHeatWeights)


_register_with_torchgeo()
