"""Starting weights given as a name or a file, as the command lines take them (``--model.weights``, ``--weights``).

A name is one of :data:`NAMED_WEIGHTS`, the official vHeat ImageNet-1k checkpoints. They load through timm's own
pretrained machinery with the ``<name>.in1k`` pretrained_cfg registered by :mod:`rsvheat.models.rsvheat`: timm downloads
the release file once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``) and hands it to our converter
(:func:`~rsvheat.models.checkpoint.checkpoint_filter_fn`), so an RS-vHeat model starts from them as documented: SCE and
its LayerNorm at their initialisation, other stems (SAR, multispectral) adapted from the optical one. Anything else is
a path, loaded by :func:`~rsvheat.models.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path

from timm.models import get_pretrained_cfg, load_pretrained
from torch import nn

from rsvheat.models.checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint
from rsvheat.models.rsvheat import VARIANTS, RSVHeat

__all__ = ["NAMED_WEIGHTS", "load_weights", "resolve_weights", "weights_label"]

#: Weight names the command lines accept besides a path: the official vHeat ImageNet-1k release files.
NAMED_WEIGHTS = ("vheat_tiny", "vheat_small", "vheat_base")


def resolve_weights(weights: str | os.PathLike) -> str | Path:
    """``weights`` as a known name (returned as the name) or an existing file (returned as a ``Path``).

    A file of that name wins over a known name; anything else is a ``FileNotFoundError`` that lists the names."""
    path = Path(weights)
    if path.is_file():
        return path
    if str(weights) in NAMED_WEIGHTS:
        return str(weights)
    raise FileNotFoundError(
        f"weights {str(weights)!r}: no such file, and not a known name. Give a path (rsvheat .safetensors, official "
        f"vHeat/RS-vHeat .pth, Lightning .ckpt) or one of {', '.join(NAMED_WEIGHTS)} (the official vHeat ImageNet-1k "
        "weights, downloaded once into torch's hub cache)"
    )


def weights_label(weights: str | os.PathLike) -> str:
    """How outputs name the weights: the name, or the file's name."""
    resolved = resolve_weights(weights)
    return resolved if isinstance(resolved, str) else resolved.name


def load_weights(model: RSVHeat, weights: str | os.PathLike) -> nn.modules.module._IncompatibleKeys:
    """Load ``weights`` (a :data:`NAMED_WEIGHTS` name or a path, see :func:`resolve_weights`) into ``model``;
    returns the missing/unexpected keys (none for a name: the parts vHeat lacks keep their initialisation)."""
    resolved = resolve_weights(weights)
    if isinstance(resolved, Path):
        return load_checkpoint(model, resolved)
    size = VARIANTS[resolved]
    model_arch = (tuple(model.depths[: len(model.stages)]), tuple(model.dims[: len(model.stages)]))
    if model_arch != (tuple(size["depths"]), tuple(size["dims"])):
        # before the download (up to 400 MB), not after it
        raise CheckpointError(
            f"weights {resolved} are for depths {tuple(size['depths'])} / dims {tuple(size['dims'])}, but the model "
            f"has depths {model_arch[0]} / dims {model_arch[1]}: use them with {resolved} or rs{resolved}"
        )
    cfg = get_pretrained_cfg(f"{resolved}.in1k")
    if cfg is None or not cfg.has_weights:
        raise CheckpointError(f"timm has no pretrained_cfg {resolved}.in1k (rsvheat's models are not registered)")
    load_pretrained(
        model,
        pretrained_cfg=cfg.to_dict(),
        num_classes=model.num_classes,
        in_chans=next(iter(model.modalities.values())),
        filter_fn=checkpoint_filter_fn,
        strict=True,
    )
    return nn.modules.module._IncompatibleKeys([], [])
