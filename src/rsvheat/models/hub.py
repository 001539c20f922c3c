"""Sharing encoders the timm way: a folder with ``config.json`` and the weights, which timm itself rebuilds.

:func:`save_pretrained` writes the folder with timm's ``save_for_hf``; ``timm.create_model("local-dir:<folder>",
pretrained=True)`` rebuilds the model from it, and after ``timm.models.push_to_hf_hub`` (same writer, then an upload)
``timm.create_model("hf-hub:<user>/<repo>", pretrained=True)`` does the same from the Hugging Face Hub.

What timm alone would write is wrong for remote-sensing encoders: the ImageNet mean/std and 3 input channels whatever
the stems are. Here the model arguments in ``config.json`` rebuild the exact architecture (every stem, ``img_size``,
depths, dims), ``pretrained_cfg`` describes the default stem (input size, bands' mean/std: what
``timm.data.resolve_data_config`` reads), and ``model_args.modality_cfg`` describes every stem: its ``bands``,
``mean``/``std`` and ``img_size``. (Per-stem data sits in the model arguments because timm's ``PretrainedCfg`` accepts
no keys of its own; rsvheat's timm entry point keeps it on the model as ``model.modality_cfg``.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from timm.models import resolve_pretrained_cfg, save_for_hf
from timm.models._hub import generate_readme
from torch import nn

from rsvheat.files import write_atomic
from rsvheat.models.checkpoint import find_backbone
from rsvheat.models.rsvheat import VARIANTS, RSVHeat

__all__ = ["modality_config", "save_pretrained"]

_MODALITY_KEYS = ("bands", "mean", "std", "img_size")

#: How rsvheat's remote-sensing models are fed: whole tiles resized bilinearly, never centre-cropped. (timm's defaults,
#: kept for the official ImageNet vHeat weights, are a bicubic resize and a 0.875 centre crop.)
REMOTE_SENSING_DATA = {"crop_pct": 1.0, "interpolation": "bilinear"}

CITATIONS = (
    "@misc{hu2025rsvheat,\n  title={RS-vHeat: Heat Conduction Guided Efficient Remote Sensing Foundation Model},\n"
    "  author={Hu and others},\n  note={ICCV 2025},\n  eprint={2411.17984},\n  archivePrefix={arXiv}\n}",
    "@misc{wang2025vheat,\n  title={vHeat: Building Vision Models upon Heat Conduction},\n"
    "  author={Wang and others},\n  note={CVPR 2025},\n  eprint={2405.16555},\n  archivePrefix={arXiv}\n}",
)


def modality_config(
    model: nn.Module, modality_cfg: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Each stem's data description ``{name: {"bands", "mean", "std", "img_size"}}``, complete and checked.

    Sources, first wins: ``modality_cfg`` (per stem, any of the keys), what the model carries (``model.modality_cfg``,
    set when it was loaded from such a folder), then defaults: ``bands`` = band numbers 1..N, ``img_size`` = the
    model's, and mean/std from the model's ``pretrained_cfg`` only when it has one value per band of that stem (the
    ImageNet statistics of a 3-band optical stem). A stem left without statistics is an error: writing ImageNet's
    3-band mean/std for, say, a 4-band stem would mis-normalise every user's input.
    """
    backbone = find_backbone(model)
    given = dict(modality_cfg or {})
    unknown = sorted(set(given) - set(backbone.modalities))
    if unknown:
        raise ValueError(f"modality_cfg names stems the model lacks: {unknown}; its stems: {backbone.modalities}")
    carried = getattr(model, "modality_cfg", None) or getattr(backbone, "modality_cfg", None) or {}
    source = getattr(model, "pretrained_cfg", None) or getattr(backbone, "pretrained_cfg", None) or {}
    out: dict[str, dict[str, Any]] = {}
    for name, chans in backbone.modalities.items():
        cfg = {**carried.get(name, {}), **given.get(name, {})}
        extra = sorted(set(cfg) - set(_MODALITY_KEYS))
        if extra:
            raise ValueError(f"modality_cfg[{name!r}]: unknown keys {extra}; expected some of {list(_MODALITY_KEYS)}")
        cfg.setdefault("bands", list(range(1, chans + 1)))
        size = cfg.get("img_size", backbone.img_size)
        cfg["img_size"] = [size, size] if isinstance(size, int) else [int(s) for s in size]
        for key in ("mean", "std"):
            if cfg.get(key) is None and len(source.get(key) or ()) == chans:
                cfg[key] = source[key]
        missing = [key for key in ("mean", "std") if cfg.get(key) is None]
        if missing:
            raise ValueError(
                f"the {name!r} stem ({chans} bands) has no {' / '.join(missing)}: give them, e.g. "
                f"modality_cfg={{{name!r}: dict(mean=[...], std=[...])}} with {chans} values each "
                "(the statistics its inputs are normalised with)"
            )
        for key in ("bands", "mean", "std"):
            cfg[key] = [float(v) for v in cfg[key]] if key != "bands" else list(cfg[key])
            if len(cfg[key]) != chans:
                raise ValueError(f"modality_cfg[{name!r}][{key!r}] has {len(cfg[key])} values, the stem {chans} bands")
        if any(s <= 0 for s in cfg["std"]):
            raise ValueError(f"modality_cfg[{name!r}]['std'] must be positive, got {cfg['std']}")
        out[name] = {key: cfg[key] for key in _MODALITY_KEYS}
    return out


def _architecture(backbone: RSVHeat) -> str:
    """The registered variant the model is an instance of (its model arguments set every detail anyway)."""
    for name, cfg in VARIANTS.items():
        if (tuple(cfg["depths"]), tuple(cfg["dims"]), cfg["use_sce"]) == (
            backbone.depths,
            backbone.dims,
            backbone.use_sce,
        ):
            return name
    return "rsvheat_base" if backbone.use_sce else "vheat_base"


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    modality_cfg: Mapping[str, Mapping[str, Any]] | None = None,
    safe_serialization: bool | Literal["both"] = True,
    model_card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` into ``folder`` with timm's ``save_for_hf``: ``config.json`` plus ``model.safetensors``
    (``safe_serialization="both"`` adds ``pytorch_model.bin``), so that ``timm.create_model("local-dir:<folder>",
    pretrained=True)`` rebuilds the same model with the same outputs.

    ``modality_cfg``: per stem, any of ``bands`` (names, e.g. ``["B2", "B3", "B4", "B8"]``; default 1..N), ``mean``,
    ``std`` (one value per band, in the units the model is fed) and ``img_size`` (default: the model's); see
    :func:`modality_config` for the defaults and what is refused.

    ``README.md`` is the model card (Hugging Face's format, written by timm's ``generate_readme``): the architecture,
    size, every stem's bands and statistics, usage and the papers. ``model_card`` adds to it or replaces its entries
    (timm's keys: ``description``, ``details``, ``license``, ``tags``, ``citation``, ...); give ``license`` for weights
    you publish (the card says ``other`` until you do). RS-vHeat variants are written with remote-sensing data
    defaults (:data:`REMOTE_SENSING_DATA`: bilinear, no centre crop); vHeat variants keep their ImageNet ones.
    Returns the folder.
    """
    backbone = find_backbone(model)
    modalities = modality_config(model, modality_cfg)
    default = modalities[backbone.default_modality]
    base: dict[str, Any] = getattr(backbone, "pretrained_cfg", None) or {}
    # the variant it was created as (timm), else the one it is an instance of (built outside timm)
    created_as = base.get("architecture")
    architecture: str = created_as if created_as in VARIANTS else _architecture(backbone)
    base = base or resolve_pretrained_cfg(architecture).to_dict()
    # pretrained_cfg describes the weights being written: the default stem's input and statistics, our classifier
    pretrained_cfg = dict(
        base,
        architecture=architecture,
        input_size=(len(default["bands"]), *default["img_size"]),
        mean=tuple(default["mean"]),
        std=tuple(default["std"]),
        num_classes=backbone.num_classes,
        pool_size=None,
        first_conv=None,
    )
    if backbone.use_sce:  # an RS-vHeat model: remote-sensing tiles, not ImageNet photographs
        pretrained_cfg.update(REMOTE_SENSING_DATA)
    model_args = {k: v for k, v in backbone.arch_config.items() if k not in ("drop_rate", "drop_path_rate")}
    model_args["modality_cfg"] = modalities
    had_cfg = hasattr(backbone, "pretrained_cfg")
    previous: Any = getattr(backbone, "pretrained_cfg", None)  # whatever timm (or a caller) put there
    backbone.pretrained_cfg = pretrained_cfg  # what timm's writer reads; put back below
    try:
        save_for_hf(backbone, str(folder), model_args=model_args, safe_serialization=safe_serialization)
    finally:
        if not had_cfg:
            del backbone.pretrained_cfg
        else:
            backbone.pretrained_cfg = previous
    card = _model_card(backbone, architecture, modalities, model_card)
    write_atomic(Path(folder) / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    return Path(folder)


def _model_card(
    backbone: RSVHeat, architecture: str, modalities: dict[str, dict[str, Any]], given: Mapping[str, Any] | None
) -> str:
    """The README of a saved folder: what :func:`save_pretrained` knows of the model, then ``given`` on top."""
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    stems = {
        name: f"{len(cfg['bands'])} bands {cfg['bands']}, mean {cfg['mean']}, std {cfg['std']}, {cfg['img_size']} px"
        for name, cfg in modalities.items()
    }
    card: dict[str, Any] = {
        "tags": ["image-feature-extraction", "timm", "rsvheat", "remote-sensing"],
        "library_name": "timm",
        "license": "other",
        "description": f"{architecture}: an RS-vHeat/vHeat heat-conduction backbone written by rsvheat.",
        "details": {
            "Model Type": "Image feature backbone (remote sensing)",
            "Architecture": f"{architecture}, depths {list(backbone.depths)}, dims {list(backbone.dims)}",
            "Params (M)": f"{params:.2f}",
            "Stems": stems,
            "Papers": [
                "RS-vHeat, Hu et al., ICCV 2025: https://arxiv.org/abs/2411.17984",
                "vHeat, Wang et al., CVPR 2025: https://arxiv.org/abs/2405.16555",
            ],
        },
        "usage": (
            "```python\nimport rsvheat, timm\n\n"
            'model = timm.create_model("local-dir:<this folder>", pretrained=True)  # or "hf-hub:<user>/<repo>"\n'
            "```\nNormalise each stem's input with its mean/std above; `model.modality_cfg` carries them.\n"
        ),
        "citation": list(CITATIONS),
    }
    for key, value in (given or {}).items():
        card[key] = {**card["details"], **value} if key == "details" and isinstance(value, Mapping) else value
    return generate_readme(card, architecture, task_name="image-feature-extraction")
