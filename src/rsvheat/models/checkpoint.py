"""Reading and writing RS-vHeat weights.

Accepted inputs (all read with ``weights_only=True``; nothing is downloaded here: the official vHeat weights by
name go through timm's download, see :mod:`rsvheat.models.weights`):

* our own format: a safetensors file written by :func:`save_weights` (architecture in its metadata);
* official vHeat checkpoints (``MzeroMiko/vHeat``: ``{"model": ...}`` with ``patch_embed``, ``layers``, ``freq_embed``);
* official RS-vHeat checkpoints (``patch_embed_opt`` / ``patch_embed_sar``, ``heat_capacity``), including
  pre-training checkpoints whose backbone is prefixed ``encoder.`` and carries a ``fuse_frequency`` module;
* the official detection / segmentation wrappers (``backbone.`` prefix, ``outnorm{i}``);
* Lightning / TorchGeo checkpoints (``state_dict`` with a ``model.`` / ``backbone.`` prefix).

Checkpoints made at another resolution load too: FVE and SCE are resized bilinearly (as RS-vHeat's own loader does).
Inference-folded official checkpoints (``op.k_exp`` instead of ``freq_embed``/``op.to_k``) load as a stored per-block
``k·t`` recovered from the filters (see :func:`kt_from_folded`), resized for other sizes. A vHeat checkpoint loads into
an RS-vHeat model: the RS-vHeat-only parts (SCE and its LayerNorm) keep the model's initialisation.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from timm.models import adapt_input_conv
from torch import nn

from rsvheat.arguments import first_line
from rsvheat.files import write_atomic, write_bytes_to
from rsvheat.operators.heat import frequency_sq, resize_embedding

if TYPE_CHECKING:  # for annotations only: the model's module imports this one
    from rsvheat.models.rsvheat import RSVHeat

_PREFIXES = ("module.", "encoder.", "backbone.", "model.", "_orig_mod.")

# official name (after prefix stripping) -> ours; applied in order, first match wins.
_OFFICIAL_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^patch_embed(?:_opt)?\.(conv[12])\.(weight|bias)$"), r"stems.optical.\1.\2"),
    (re.compile(r"^patch_embed(?:_opt)?\.(norm[12])\.1\.(weight|bias)$"), r"stems.optical.\1.\2"),
    (re.compile(r"^patch_embed_sar\.(conv[12])\.(weight|bias)$"), r"stems.sar.\1.\2"),
    (re.compile(r"^patch_embed_sar\.(norm[12])\.1\.(weight|bias)$"), r"stems.sar.\1.\2"),
    (re.compile(r"^freq_embed\.(\d+)$"), r"stages.\1.freq_embed"),
    (re.compile(r"^heat_capacity\.(\d+)$"), r"stages.\1.heat_capacity"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.(norm1|norm2|gamma1|gamma2)(\.weight|\.bias)?$"), r"stages.\1.blocks.\2.\3\4"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.op\.dwconv\.(weight|bias)$"), r"stages.\1.blocks.\2.hco.dwconv.\3"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.op\.linear\.(weight|bias)$"), r"stages.\1.blocks.\2.hco.in_proj.\3"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.op\.to_k\.0\.(weight|bias)$"), r"stages.\1.blocks.\2.hco.to_k.\3"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.op\.k_exp$"), "FOLDED_FILTER"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.op\.out_norm\.(weight|bias)$"), r"stages.\1.blocks.\2.hco.out_norm.\3"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.op\.out_linear\.(weight|bias)$"), r"stages.\1.blocks.\2.hco.out_proj.\3"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.op\.norm1\.(weight|bias)$"), r"stages.\1.blocks.\2.hco.sce_norm.\3"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"), r"stages.\1.blocks.\2.mlp.\3.\4"),
    # the downsample closes stage i in the official code and opens stage i+1 here
    (re.compile(r"^layers\.(\d+)\.(\d+)\.0\.weight$"), "DOWNSAMPLE_CONV"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.1\.(weight|bias)$"), "DOWNSAMPLE_NORM"),
    (re.compile(r"^classifier\.0\.(weight|bias)$"), r"head.norm.\1"),
    (re.compile(r"^classifier\.3\.(weight|bias)$"), r"head.fc.\1"),
    (re.compile(r"^outnorm(\d+)\.(weight|bias)$"), r"stages.\1.out_norm.\2"),
]
_SKIPPED = re.compile(r"(^fuse_frequency\.|^decode|^decoder\.|^head\.(?!norm|fc)|__)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def unwrap_checkpoint(obj: Mapping) -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint (``model``, ``state_dict``, ``model_ema``, or the dict itself)
    and strip wrapper prefixes (``module.``, ``encoder.``, ``backbone.``, ``model.``)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            "no tensors found in checkpoint (expected a state dict or a dict with 'model'/'state_dict')"
        )
    out: dict[str, torch.Tensor] = {}
    depth_of: dict[str, int] = {}
    for key, value in tensors.items():
        name, stripped = key, 0
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
            stripped += 1
        # A wrapper's own head beats the inner model's (RS-vHeat's classification wrapper has both).
        if name in out and depth_of[name] <= stripped:
            continue
        out[name], depth_of[name] = value, stripped
    return out


def is_official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("layers.", "patch_embed")) for k in state_dict)


def kt_from_folded(k_exp: torch.Tensor) -> torch.Tensor:
    """``k·t`` ``(h, w, C)`` of a folded official filter ``k_exp = exp(-(w_n^2 + w_m^2)) ** kt`` ``(h, w, C)``.

    ``kt = -log(k_exp) / (w_n^2 + w_m^2)`` wherever ``w != 0``, in float64. At DC every ``kt`` gives 1, so it takes the
    mean of its neighbours' values (``(0, 1)`` and ``(1, 0)``; 0 on a 1x1 map): any value reproduces the folded
    filter at its own size, and a neighbour's keeps the field smooth for resizing. A filter that underflowed to 0 gives
    the largest ``kt`` its dtype can express (the filter stays 0 to float precision); ``kt >= 0`` as ``ReLU`` made it.
    """
    if k_exp.ndim != 3:
        raise CheckpointError(f"a folded filter op.k_exp must be (h, w, C), got shape {tuple(k_exp.shape)}")
    h, w, _ = k_exp.shape
    tiny = torch.finfo(k_exp.dtype).tiny if k_exp.is_floating_point() else torch.finfo(torch.float32).tiny
    freq = frequency_sq(h, w, k_exp.device, torch.float64)[:, :, None]
    kt = -torch.log(k_exp.double().clamp(min=tiny, max=1.0)) / freq.clamp(min=torch.finfo(torch.float64).tiny)
    neighbours = [kt[i, j] for i, j in ((0, 1), (1, 0)) if i < h and j < w]
    kt[0, 0] = torch.stack(neighbours).mean(0) if neighbours else 0.0
    return kt.clamp(min=0).to(k_exp.dtype if k_exp.is_floating_point() else torch.float32)


def convert_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official vHeat / RS-vHeat state dict to rsvheat keys (1x1-conv MLP weights become Linear weights;
    folded ``op.k_exp`` filters become the blocks' stored ``hco.kt_override``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _SKIPPED.search(key):
            continue
        for pattern, target in _OFFICIAL_RULES:
            match = pattern.match(key)
            if not match:
                continue
            if target == "DOWNSAMPLE_CONV":
                new = f"stages.{int(match[1]) + 1}.downsample.conv.weight"
            elif target == "DOWNSAMPLE_NORM":
                new = f"stages.{int(match[1]) + 1}.downsample.norm.{match[3]}"
            elif target == "FOLDED_FILTER":
                new, value = f"stages.{match[1]}.blocks.{match[2]}.hco.kt_override", kt_from_folded(value)
            else:
                new = match.expand(target)
            if new.endswith(("mlp.fc1.weight", "mlp.fc2.weight")) and value.ndim == 4:
                value = value.flatten(1)
            out[new] = value
            break
        else:
            warnings.warn(f"ignoring unknown key in official checkpoint: {key}", stacklevel=2)
    return out


def _architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    depths: dict[int, int] = {}
    dims: dict[int, int] = {}
    for key, value in state_dict.items():
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight$", key)
        if m:
            i = int(m[1])
            depths[i] = max(depths.get(i, 0), int(m[2]) + 1)
            dims[i] = value.shape[0]
    n = max(depths) + 1 if depths else 0
    return tuple(depths.get(i, 0) for i in range(n)), tuple(dims.get(i, 0) for i in range(n))


def adapt_stem_weight(
    weight: torch.Tensor, in_chans: int, band_map: Sequence[int | None] | None = None
) -> torch.Tensor:
    """Adapt a pretrained first-conv weight ``(C_out, C_src, k, k)`` to ``in_chans`` input bands.

    Rule (documented in docs/checkpoints.md):
    * ``band_map`` given: band ``i`` takes source channel ``band_map[i]``; bands mapped to ``None`` start at zero, so
      the model initially responds exactly as the pretrained one does to the mapped bands;
    * ``in_chans == 1``: the sum over source channels (a grey image gives the same response as its RGB copy);
    * otherwise: channel ``i`` takes source channel ``i % C_src``, scaled by ``C_src / in_chans`` (when ``in_chans``
      is a multiple of ``C_src`` a constant image gives exactly the pretrained response).

    Without ``band_map`` the rule is timm's, and timm's ``adapt_input_conv`` computes it (in float32: float64
    weights are rounded first). ``band_map`` is ours: timm has no band mapping.
    """
    c_out, c_src, kh, kw = weight.shape
    if band_map is None:
        return adapt_input_conv(in_chans, weight, base_chans=c_src)
    if len(band_map) != in_chans:
        raise ValueError(f"band_map has {len(band_map)} entries, expected one per input band ({in_chans})")
    out = weight.new_zeros(c_out, in_chans, kh, kw)
    for i, src in enumerate(band_map):
        if src is not None:
            if not 0 <= src < c_src:
                raise ValueError(f"band_map[{i}] = {src} is not a channel of the {c_src}-channel source stem")
            out[:, i] = weight[:, src]
    return out


def adapt_to_model(
    state_dict: Mapping[str, torch.Tensor],
    model: RSVHeat,
    band_maps: Mapping[str, Sequence[int | None]] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit an rsvheat-keyed state dict to ``model``: check the architecture, resize FVE/SCE to the model's stored size,
    build stems the checkpoint lacks (from the SAR stem for 1-2 band inputs, else from the optical one), fill per-stage
    output norms the checkpoint lacks with identity, and drop a classifier of another size."""
    own = model.state_dict()
    sd = dict(state_dict)
    ckpt_arch = _architecture(sd)
    model_arch = (model.depths[: len(model.stages)], model.dims[: len(model.stages)])
    if ckpt_arch[0] and ckpt_arch != model_arch:
        raise CheckpointError(
            f"checkpoint is for depths {ckpt_arch[0]} / dims {ckpt_arch[1]}, "
            f"but the model has depths {model_arch[0]} / "
            f"dims {model_arch[1]}: pick the matching variant (vheat_/rsvheat_ tiny, small, base)"
        )
    has_sce = any(k.endswith("heat_capacity") for k in sd)
    has_heat = any(k.endswith(("freq_embed", "hco.kt_override")) for k in sd)
    if has_sce and not model.use_sce and has_heat:
        raise CheckpointError(
            "checkpoint is RS-vHeat (with SCE) but the model is vHeat (no SCE): use the matching variant"
        )
    if model.use_sce and not has_sce and has_heat:
        # vHeat weights into RS-vHeat (documented start from the ImageNet checkpoints): the SCE and its LayerNorm,
        # which vHeat lacks, keep the model's own initialisation.
        for key, value in own.items():
            if re.search(r"(\.heat_capacity|\.hco\.sce_norm\.(weight|bias))$", key):
                sd.setdefault(key, value)
    folded = {k.rsplit(".hco.", 1)[0] for k in sd if k.endswith(".hco.kt_override")}
    for block in folded:
        # a folded block computes no k·t from the FVE: to_k (absent from folded files) keeps the model's own values
        for key in (f"{block}.hco.to_k.weight", f"{block}.hco.to_k.bias"):
            if key in own:
                sd.setdefault(key, own[key])
    for key, value in own.items():
        # the official inference folding deletes the FVE too: a stage of folded blocks only needs its size
        stage = key[: -len("freq_embed")]
        if key.endswith(".freq_embed") and key not in sd and any(b.startswith(stage) for b in folded):
            sd[key] = value

    for key, value in list(sd.items()):
        if key.endswith(("freq_embed", "heat_capacity")) and key in own and value.shape != own[key].shape:
            if value.shape[-1] != own[key].shape[-1]:
                raise CheckpointError(f"{key}: checkpoint has {value.shape[-1]} channels, model {own[key].shape[-1]}")
            sd[key] = resize_embedding(value.float(), tuple(own[key].shape[:2])).to(value.dtype)

    stems = {k.split(".")[1] for k in sd if k.startswith("stems.")}
    band_maps = band_maps or {}
    for name, chans in model.modalities.items():
        if name in stems and sd[f"stems.{name}.conv1.weight"].shape[1] == chans and name not in band_maps:
            continue
        source = name if name in stems else ("sar" if chans <= 2 and "sar" in stems else None)
        source = source or ("optical" if "optical" in stems else next(iter(sorted(stems)), None))
        if source is None:
            continue  # no stem in the checkpoint at all: strict loading will report it
        for key in [k for k in sd if k.startswith(f"stems.{source}.")]:
            sd[f"stems.{name}." + key.split(".", 2)[2]] = sd[key]
        weight = sd[f"stems.{source}.conv1.weight"]
        sd[f"stems.{name}.conv1.weight"] = adapt_stem_weight(weight, chans, band_maps.get(name))
    for key in [k for k in sd if k.startswith("stems.") and k.split(".")[1] not in model.modalities]:
        del sd[key]

    for key, value in own.items():
        # Task-specific parts a backbone checkpoint does not carry keep the model's own initialisation: the dense
        # tasks' output norms and the classification head.
        if re.match(r"^(stages\.\d+\.out_norm|head)\.", key) and key not in sd:
            sd[key] = value
    head_keys = ("head.fc.weight", "head.fc.bias")
    if any(k in sd and (k not in own or sd[k].shape != own[k].shape) for k in head_keys):
        for k in head_keys:
            sd.pop(k, None)
            if k in own:
                sd[k] = own[k]  # keep the model's freshly initialised classifier
    # stages pruned away (features_only with fewer out_indices) are not an error
    n_stages = len(model.stages)
    return {k: v for k, v in sd.items() if not (k.startswith("stages.") and int(k.split(".")[1]) >= n_stages)}


def checkpoint_filter_fn(state_dict: Mapping, model: RSVHeat) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: any supported checkpoint -> ``model``'s state dict keys."""
    sd = unwrap_checkpoint(state_dict)
    if is_official(sd):
        sd = convert_official(sd)
    return adapt_to_model(sd, model)


def read_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """The content of a torch file (``.pth``/``.pt``/``.ckpt``/``.bin``) read with ``weights_only=True``: tensors and
    plain Python data only, so a file that would run code when unpickled is refused, never executed. Every failure
    is a :class:`CheckpointError` (``FileNotFoundError`` for a missing file) that names the file and the reason.
    ``mmap``: map the tensors instead of reading them (cheap checks of large checkpoints; zip-format files only, others
    are read whole)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise unreadable_checkpoint(path, err) from err


def unreadable_checkpoint(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """The error for a torch file that ``torch.load(weights_only=True)`` could not read, naming the file."""
    if isinstance(err, pickle.UnpicklingError):
        # torch's own text advises loading the file unsafely; name only the object it refused
        found = re.search(r"GLOBAL (\S+)", str(err))
        return CheckpointError(
            f"cannot read checkpoint {path}: it holds Python objects other than tensors and plain data, which rsvheat "
            "does not load (a file from an untrusted source can run code when unpickled)"
            + (f"; it refers to {found.group(1)}" if found else "")
        )
    # truncated, corrupt, or not a torch file at all (a truncated zip is an OSError without the file's name)
    first = _first_line(err).split(". ")[0].rstrip(".")  # torch's advice after the first sentence does not apply
    return CheckpointError(f"cannot read checkpoint {path}: truncated, corrupt or not a torch file ({first})")


def _first_line(err: BaseException) -> str:
    return first_line(err, f"{type(err).__name__} (truncated or not a checkpoint?)")


def read_weights_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read the tensors of a ``.safetensors`` or torch (``.pth``/``.pt``/``.ckpt``/``.bin``) file, safely (a torch
    file's dict as stored: a training checkpoint holds the state dict among other entries)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        content = read_torch_file(path)
        if not isinstance(content, Mapping):
            raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(content).__name__}, not a dict")
        return content
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as err:  # corrupt or truncated
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from err


def find_backbone(model: nn.Module) -> RSVHeat:
    """``model`` itself when it is an RS-vHeat/vHeat backbone, else the one backbone it holds; none or several is a
    :class:`CheckpointError` naming ``model``'s type."""

    def is_backbone(m: nn.Module) -> bool:  # duck-typed: this module sits below the model's (no import circle)
        return all(hasattr(m, a) for a in ("arch_config", "depths", "stages", "modalities"))

    # RSVHeat is the one module type with all these attributes (arch_config is its own)
    if is_backbone(model):
        return cast("RSVHeat", model)
    found = [m for m in model.modules() if is_backbone(m)]
    if len(found) != 1:
        what = "no RS-vHeat/vHeat backbone" if not found else f"{len(found)} RS-vHeat/vHeat backbones"
        raise CheckpointError(f"{type(model).__name__} holds {what}: pass the backbone to load into")
    return cast("RSVHeat", found[0])


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    band_maps: Mapping[str, Sequence[int | None]] | None = None,
) -> nn.modules.module._IncompatibleKeys:
    """Load any supported checkpoint (see module docstring) into ``model``; returns the missing/unexpected keys.

    ``model`` is an RS-vHeat/vHeat backbone or any module holding exactly one: timm's ``features_only`` wrapper, an
    SMP model on a ``tu-`` encoder, a TorchGeo or TerraTorch task (the backbone is found and loaded)."""
    model = find_backbone(model)
    sd = unwrap_checkpoint(read_weights_file(path))
    if is_official(sd):
        sd = convert_official(sd)
    sd = adapt_to_model(sd, model, band_maps)
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"shape mismatch loading {path}:\n  " + "\n  ".join(mismatched))
    try:
        return model.load_state_dict(sd, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {err}") from err


def weights_config(path: str | os.PathLike) -> dict:
    """The architecture stored in a weights file written by :func:`save_weights` (``RSVHeat``'s arguments, from the
    safetensors metadata). Any other file raises :class:`CheckpointError`: it does not say what to build."""
    from safetensors import safe_open

    path = Path(path)
    other = (
        "build the model with rsvheat.create_model(<variant>, ...) and load the file with "
        "rsvheat.load_checkpoint(model, path)"
    )
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} holds weights without their architecture (not an rsvheat .safetensors): {other}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
    except Exception as err:  # corrupt or truncated
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from err
    try:
        config = json.loads(metadata["config"]) if metadata.get("format") == "rsvheat" else None
    except (KeyError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no rsvheat architecture metadata (not written by save_weights): {other}")
    # files written before feature_norms was stored: the per-stage output norms are among the tensors
    config.setdefault("feature_norms", any(".out_norm." in key for key in keys))
    return config


def save_weights(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s weights as safetensors, atomically (temp file + rename), with its architecture
    (``model.arch_config``) as metadata: :func:`rsvheat.create_model_from_weights` rebuilds the model from the file."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "rsvheat", "config": json.dumps(model.arch_config), **(extra or {})}
    # serialised in memory, written by Python: a full disk is an OSError naming the file, not a SafetensorError
    write_atomic(path, lambda tmp: write_bytes_to(tmp, save(tensors, metadata=metadata)))
    return path
