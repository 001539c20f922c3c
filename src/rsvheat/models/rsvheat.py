"""RS-vHeat and vHeat backbones: heat-conduction vision models for remote sensing.

Papers: vHeat (Wang et al., CVPR 2025, arXiv 2405.16555); RS-vHeat (Hu et al., ICCV 2025, arXiv 2411.17984).

The layout follows the official code (InternImage stem, 4 stages at strides 4/8/16/32, 3x3/s2 conv downsampling, one
frequency value embedding (FVE) per stage shared by its blocks, and for RS-vHeat one spatial correction embedding (SCE)
per stage), with these differences in how it is computed, none in what:

* activations are channels-last ``(B, H, W, C)`` inside the stages; the DCT is 4 batched GEMMs, the MLP plain Linear;
* FVE and SCE are stored at their pre-training resolution and resized (bilinear) to whatever size comes in, so any
  ``H x W`` works; ``fold()`` keeps the resized embeddings and the decay filters once per input size (inference
  folding), and the SCE is kept there (the official RS-vHeat inference mode deletes it and crashes);
* several input stems (optical, SAR, multispectral, ...) can live in one model and are chosen with ``modality=``.

Public outputs (``forward_features``, ``forward_intermediates``) are NCHW.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from rsvheat import STRIDE
from rsvheat.models.checkpoint import checkpoint_filter_fn, load_checkpoint, weights_config
from rsvheat.operators.conv import StridedConv3x3
from rsvheat.operators.dct import DctImpl
from rsvheat.operators.heat import HeatConduction, SpectralPrecision, check_spectral_precision, resize_embedding
from rsvheat.operators.recompute import gelu_linear, layer_norm_linear

__all__ = ["RSVHeat", "VARIANTS", "create_model", "create_model_from_weights"]

#: Input-stem name used when a model has a single 3-band stem and no modality is given.
DEFAULT_MODALITY = "optical"


class Stem(nn.Module):
    """InternImage-style stem, stride 4: ``conv3x3/s2 -> LN -> GELU -> conv3x3/s2 -> LN``.

    ``(B, in_chans, H, W) -> (B, ceil(H/4), ceil(W/4), dim)``.
    """

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = StridedConv3x3(in_chans, dim // 2)
        self.norm1 = nn.LayerNorm(dim // 2, eps=1e-6)
        self.act = nn.GELU()
        self.conv2 = StridedConv3x3(dim // 2, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last input makes conv1 emit channels-last, so the LayerNorm reads it without a transpose copy.
        x = self.conv1(x.permute(0, 2, 3, 1).contiguous())
        return self.norm2(self.conv2(self.act(self.norm1(x))))


class Downsample(nn.Module):
    """``conv3x3/s2 (no bias) -> LN``: ``(B, H, W, C_in) -> (B, ceil(H/2), ceil(W/2), C_out)``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = StridedConv3x3(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Mlp(nn.Module):
    """``[LN ->] Linear -> GELU -> Linear`` on channels-last rows, ``(..., C) -> (..., C)``; under autograd the LN and
    the GELU are recomputed in the backward (:mod:`rsvheat.operators.recompute`)."""

    #: Inference on CPUs processes rows in chunks whose hidden activations stay below this many elements: the buffer
    #: is then recycled by the allocator instead of page-faulted in afresh, and stays warm in cache for the second
    #: GEMM. Other devices run whole: their caching allocators recycle any buffer, and each chunk costs launches.
    chunk_elements = 1 << 21

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``(..., C) -> (..., C)``; ``norm`` (a pre-norm block's LN) is applied to ``x`` first."""
        if torch.is_grad_enabled():
            # LN and GELU recomputed in the backward: autograd keeps x and the 4C hidden field (fc1's output) only.
            h = self.fc1(x) if norm is None else layer_norm_linear(x, norm, self.fc1)
            return gelu_linear(h, self.fc2.weight, self.fc2.bias)
        if norm is not None:
            x = norm(x)
        if not x.is_contiguous() or x.device.type != "cpu":
            return self.fc2(self.act(self.fc1(x)))
        rows = x.view(-1, x.shape[-1])
        # `out=` kernels bypass autocast (it casts only in the dispatcher's functional ops): under autocast the second
        # GEMM is called plainly and its output, in autocast's dtype, copied into the chunk.
        autocast = torch.is_autocast_enabled("cpu")
        out = torch.empty_like(rows, dtype=torch.get_autocast_dtype("cpu") if autocast else None)
        step = max(1, self.chunk_elements // self.fc1.out_features)
        for start in range(0, rows.shape[0], step):
            hidden = F.gelu(self.fc1(rows[start : start + step]))
            if autocast:
                out[start : start + step] = self.fc2(hidden)
            else:
                torch.addmm(self.fc2.bias, hidden, self.fc2.weight.T, out=out[start : start + step])
        return out.view(x.shape)


class HeatConductionKt(HeatConduction):
    """The HCO, whose ``k·t`` can also be a stored tensor instead of ``ReLU(to_k(FVE))``.

    An inference-folded official checkpoint (``op.k_exp``) holds each block's filter for one size only;
    :func:`~rsvheat.models.checkpoint.convert_official` recovers ``k·t`` from it and it is kept in the buffer
    ``kt_override`` ``(h, w, C)``, resized bilinearly to every feature map as the FVE is (so other sizes work). ``None``
    (the default, and then absent from the state dict) is the normal path, unchanged. A state dict that carries
    ``kt_override`` sets it on load; one without it clears it.
    """

    kt_override: torch.Tensor | None

    def __init__(self, dim: int, use_sce: bool = False, dct_impl: DctImpl = "auto") -> None:
        super().__init__(dim, use_sce=use_sce, dct_impl=dct_impl)
        self.register_buffer("kt_override", None)

    def kt(self, freq_embed: torch.Tensor) -> torch.Tensor:
        if self.kt_override is None:
            return super().kt(freq_embed)
        # bilinear interpolation of a non-negative field stays non-negative: still a low-pass filter
        size = (freq_embed.shape[0], freq_embed.shape[1])
        return resize_embedding(self.kt_override, size).to(freq_embed.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The buffer exists only when a checkpoint brings one: allocate it (or drop it) before the copy.
        key = prefix + "kt_override"
        if key in state_dict:
            like = self.to_k.weight
            self.kt_override = torch.empty(state_dict[key].shape, dtype=like.dtype, device=like.device)
        elif any(k.startswith(prefix) for k in state_dict):
            # this block's weights without a stored k·t: the normal path (a partial load of other modules keeps it)
            self.kt_override = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


class HeatBlock(nn.Module):
    """One vHeat block on ``(B, H, W, C)``.

    Pre-norm (vHeat-T): ``x + DropPath(HCO(LN(x)))``, ``x + DropPath(MLP(LN(x)))``.
    Post-norm (S/B, RS-vHeat): ``x + DropPath(g1 * LN(HCO(x)))``, ``x + DropPath(g2 * LN(MLP(x)))``, layer-scale ``g``.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        post_norm: bool = False,
        layer_scale: float | None = None,
        use_sce: bool = False,
        dct_impl: DctImpl = "auto",
    ) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.hco = HeatConductionKt(dim, use_sce=use_sce, dct_impl=dct_impl)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma1: nn.Parameter | None
        self.gamma2: nn.Parameter | None
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None
        # Post-norm LN affines with the layer scale multiplied in, kept while folded (see `fold`); not persistent.
        self.folded_affine: torch.Tensor | None
        self.register_buffer("folded_affine", None, persistent=False)

    def _scaled_affine(self) -> torch.Tensor:
        """The post-norm LN affines with the layer scale multiplied in, one pass over the activations instead of two:
        ``(4, C)`` rows ``norm1.weight * g1, norm1.bias * g1, norm2.weight * g2, norm2.bias * g2`` (one product of
        stacked tensors: fewer kernels, forward and backward, than four)."""
        if self.folded_affine is not None:
            return self.folded_affine
        g1, g2 = cast(torch.Tensor, self.gamma1), cast(torch.Tensor, self.gamma2)
        affine = torch.stack([self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias])
        return affine * torch.stack([g1, g1, g2, g2])

    @torch.inference_mode(False)  # a normal tensor even when folded under inference_mode: exporters can trace it
    @torch.no_grad()
    def fold(self, freq_embed: torch.Tensor) -> None:
        """Fold the heat operator's decay filter for ``freq_embed`` (:meth:`HeatConduction.fold`) and the layer scale
        into the post-norm LN affines (no layer-scale kernels left in the forward). A fold is a promise that the
        weights stay as they are."""
        self.hco.fold(freq_embed)
        self.folded_affine = None
        if self.post_norm and self.gamma1 is not None:
            self.folded_affine = self._scaled_affine()

    def unfold(self) -> None:
        """Drop the folded tensors: they are computed from the weights again."""
        self.hco.unfold()
        self.folded_affine = None

    def forward(self, x: torch.Tensor, freq_embed: torch.Tensor, sce: torch.Tensor | None = None) -> torch.Tensor:
        # The first residual add allocates (the caller's x is never written); without autograd the second one
        # accumulates in place into that fresh tensor.
        inplace = not torch.is_grad_enabled()
        if self.post_norm:
            affine: Sequence[torch.Tensor] = (
                (self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias)
                if self.gamma1 is None
                else self._scaled_affine().unbind()
            )
            w1, b1, w2, b2 = affine
            shape = self.norm1.normalized_shape
            x = x + self.drop_path(F.layer_norm(self.hco(x, freq_embed, sce), shape, w1, b1, self.norm1.eps))
            ffn = self.drop_path(F.layer_norm(self.mlp(x), shape, w2, b2, self.norm2.eps))
            return x.add_(ffn) if inplace else x + ffn
        mixed = self.hco(self.norm1(x), freq_embed, sce)
        x = x + self.drop_path(mixed if self.gamma1 is None else mixed * self.gamma1)
        ffn = self.mlp(x, self.norm2)  # the MLP applies norm2 (recomputed in the backward under autograd)
        ffn = self.drop_path(ffn if self.gamma2 is None else ffn * self.gamma2)
        return x.add_(ffn) if inplace else x + ffn


class HeatStage(nn.Module):
    """[downsample] + ``depth`` blocks sharing one FVE (and SCE) of native size ``res``; ``(B, H, W, C)`` in and out."""

    folded_fve: torch.Tensor | None
    folded_sce: torch.Tensor | None

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        res: tuple[int, int],
        downsample: bool,
        drop_path: Sequence[float],
        use_sce: bool,
        feature_norm: bool,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.freq_embed = nn.Parameter(torch.zeros(*res, dim))
        self.heat_capacity = nn.Parameter(torch.zeros(*res, dim)) if use_sce else None
        self.blocks = nn.ModuleList(
            HeatBlock(dim, drop_path=drop_path[i], use_sce=use_sce, **block_kwargs) for i in range(depth)
        )
        # Output norm for dense tasks (the official detection/segmentation wrappers' `outnorm{i}`).
        self.out_norm = nn.LayerNorm(dim) if feature_norm else None
        self.recomputed_blocks = 0  # leading blocks recomputed in the backward pass (set_grad_checkpointing)
        # The folded FVE/SCE (see `fold`): buffers, so that exporters store them as constants; not persistent, since
        # they are derived from the weights.
        self.register_buffer("folded_fve", None, persistent=False)
        self.register_buffer("folded_sce", None, persistent=False)
        self.folding = False  # folded mode: set by fold(), ended by unfold() and train()
        self.register_load_state_dict_post_hook(_drop_folds_after_load)

    @property
    def heat_blocks(self) -> Sequence[HeatBlock]:
        """``blocks`` as the type checker should see them (an ``nn.ModuleList`` types its items as ``Module``)."""
        return cast("Sequence[HeatBlock]", self.blocks)

    def _resized(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        sce = resize_embedding(self.heat_capacity, size) if self.heat_capacity is not None else None
        return resize_embedding(self.freq_embed, size), sce

    @torch.inference_mode(False)  # normal tensors even when folded under inference_mode: exporters can trace them
    @torch.no_grad()
    def fold(self, size: tuple[int, int]) -> None:
        """Enter folded mode and fold for the feature-map ``size``: FVE and SCE resized and kept as the buffers
        ``folded_fve`` and ``folded_sce``, every block's decay filter folded for that FVE
        (:meth:`HeatConduction.fold`)."""
        fve, sce = self._resized(size)
        # at the stored size resize_embedding returns the parameter itself: a buffer must not alias it
        fve = fve.clone() if fve is self.freq_embed else fve
        sce = sce.clone() if sce is self.heat_capacity and sce is not None else sce
        self.folded_fve, self.folded_sce = fve, sce
        self.folding = True
        for block in self.heat_blocks:
            block.fold(fve)

    def drop_folds(self) -> None:
        """Drop the folded tensors, staying in folded mode (the next forward folds again, from the current
        weights)."""
        self.folded_fve, self.folded_sce = None, None
        for block in self.heat_blocks:
            block.unfold()

    def unfold(self) -> None:
        """Leave folded mode: FVE, SCE and filters are computed from the weights at every forward."""
        self.drop_folds()
        self.folding = False

    def embeddings(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FVE and SCE resized to the feature-map ``size``: ``(h, w, C)`` each (SCE ``None`` without one). In folded
        mode the folded ones (folding first at a size not folded yet); otherwise computed from the weights, the same
        path in training, evaluation, under ``torch.compile`` and while exporting."""
        if not self.folding:
            return self._resized(size)
        if self.folded_fve is None or tuple(self.folded_fve.shape[:2]) != tuple(size):
            self.fold(size)
        return cast(torch.Tensor, self.folded_fve), self.folded_sce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        fve, sce = self.embeddings((x.shape[1], x.shape[2]))
        recomputed = self.recomputed_blocks if torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, fve, sce, use_reentrant=False) if i < recomputed else block(x, fve, sce)
        return x

    def train(self, mode: bool = True):
        if mode:
            self.unfold()  # a fold is made for one set of weights; training is about to change them
        return super().train(mode)


def _drop_folds_after_load(stage: HeatStage, incompatible_keys) -> None:
    stage.drop_folds()  # folds of the weights that were replaced


class ClassifierHead(nn.Module):
    """``LN -> global average pool -> Linear`` on ``(B, H, W, C)``; without pooling (``global_pool=""``) the
    per-position outputs come back NCHW, ``(B, num_classes or C, H, W)``, like ``forward_features`` and timm's
    convolutional models."""

    def __init__(self, dim: int, num_classes: int, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.global_pool = global_pool
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def out_features(self) -> int:
        """Outputs per image (classes, or channels without a classifier): TorchGeo's weight loader reads it from a
        model's last module."""
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else self.norm.normalized_shape[0]

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x)
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        x = x if pre_logits else self.fc(x)
        return x if self.global_pool == "avg" else x.permute(0, 3, 1, 2)


class RSVHeat(nn.Module):
    """Heat-conduction backbone with one or more input stems.

    Args:
        modalities: input stems by name and band count, e.g. ``{"optical": 3, "sar": 1}``. Default: one stem built
            from ``in_chans`` (named ``"sar"`` when ``in_chans == 1``, else ``"optical"``).
        in_chans: bands of the single stem when ``modalities`` is not given.
        num_classes: classifier outputs; 0 for a backbone without classifier.
        depths, dims: blocks and channels per stage.
        img_size: size at which FVE/SCE are stored (the pre-training size); inputs of any size are accepted.
        use_sce: RS-vHeat's spatial correction embedding (False gives vHeat).
        post_norm, layer_scale: block type (see :class:`HeatBlock`).
        feature_norms: add the per-stage output LayerNorms used for dense tasks.
        check_inputs: raise on NaN/Inf input (one extra pass over the input).
        dct_impl: ``"auto"``, ``"matmul"`` or ``"fft"`` DCT inside the HCO.
        spectral_precision: ``"auto"`` (under bf16 autocast: bf16 spectral GEMMs on CUDA, float32 on CPUs),
            ``"float32"`` (the exact path) or ``"bfloat16"``; see :func:`~rsvheat.operators.heat.spectral_dtype`.
    """

    #: timm's description of the weights: set when timm builds the model, absent on a model built directly.
    pretrained_cfg: dict[str, Any]

    def __init__(
        self,
        modalities: Mapping[str, int] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: Sequence[int] = (96, 192, 384, 768),
        img_size: int | Sequence[int] = 224,
        use_sce: bool = True,
        post_norm: bool = True,
        layer_scale: float | None = None,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        global_pool: str = "avg",
        feature_norms: bool = False,
        check_inputs: bool = False,
        dct_impl: DctImpl = "auto",
        spectral_precision: SpectralPrecision = "auto",
        output_stride: int = STRIDE,
    ) -> None:
        super().__init__()
        if output_stride != STRIDE:
            # SMP's DeepLab asks for dilation; silently ignoring it gives wrong output sizes.
            raise ValueError(f"RS-vHeat has a fixed output stride of {STRIDE}, got output_stride={output_stride}")
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must have the same length")
        if modalities is None:
            modalities = {("sar" if in_chans == 1 else DEFAULT_MODALITY): in_chans}
        if not modalities:
            raise ValueError("at least one input modality (stem) is required")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.modalities = dict(modalities)
        # The arguments that rebuild this module (JSON-able): save_weights stores them, create_model_from_weights
        # builds RSVHeat(**arch_config) from them. Runtime switches (check_inputs, dct_impl,
        # spectral_precision) are not part of it.
        self.arch_config = dict(
            modalities=self.modalities,
            depths=list(depths),
            dims=list(dims),
            img_size=list(img_size),
            use_sce=use_sce,
            post_norm=post_norm,
            layer_scale=layer_scale,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            feature_norms=feature_norms,
        )
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.img_size = img_size
        self.use_sce = use_sce
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.check_inputs = check_inputs
        self.output_fmt = "NCHW"

        self.stems = nn.ModuleDict({name: Stem(chans, dims[0]) for name, chans in self.modalities.items()})
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under a meta device
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            res = (img_size[0] // 4 // 2**i, img_size[1] // 4 // 2**i)
            self.stages.append(
                HeatStage(
                    in_dim=dims[max(i - 1, 0)],
                    dim=dim,
                    depth=depth,
                    res=res,
                    downsample=i > 0,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    use_sce=use_sce,
                    feature_norm=feature_norms,
                    mlp_ratio=mlp_ratio,
                    post_norm=post_norm,
                    layer_scale=layer_scale,
                    dct_impl=dct_impl,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.head = ClassifierHead(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self._init_weights)
        for stage in self.stages:
            trunc_normal_(stage.freq_embed, std=0.02)
            if stage.heat_capacity is not None:
                trunc_normal_(stage.heat_capacity, std=0.02)
        self.set_spectral_precision(spectral_precision)

    def set_spectral_precision(self, precision: SpectralPrecision) -> RSVHeat:
        """How every HCO transforms half-precision fields (see :func:`~rsvheat.operators.heat.spectral_dtype`):
        ``"auto"``, ``"float32"`` (the exact path) or ``"bfloat16"``. Returns the model."""
        check_spectral_precision(precision)
        for module in self.modules():
            if isinstance(module, HeatConduction):
                module.spectral_precision = precision
        return self

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------------------------
    # inputs

    @property
    def default_modality(self) -> str:
        return next(iter(self.modalities))

    def _resolve_modality(self, x: torch.Tensor, modality: str | None) -> str:
        if modality is None:
            matching = [name for name, chans in self.modalities.items() if chans == x.shape[1]]
            if len(matching) == 1:
                return matching[0]
            modality = self.default_modality
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; this model has stems for {sorted(self.modalities)}")
        return modality

    def _check_input(self, x: torch.Tensor, modality: str) -> None:
        expected = self.modalities[modality]
        if x.shape[1] != expected:
            raise ValueError(
                f"the {modality!r} stem expects {expected} input channels, got {x.shape[1]} (input shape "
                f"{tuple(x.shape)}); stems: {self.modalities}"
            )
        if min(x.shape[-2:]) < STRIDE:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than the model's stride {STRIDE} on one side")
        if self.check_inputs and not torch.isfinite(x).all():
            raise ValueError("input contains NaN or Inf values")

    def stem(self, x: torch.Tensor | Mapping[str, torch.Tensor], modality: str | None = None) -> torch.Tensor:
        """``(B, C_in, H, W)`` image -> ``(B, H/4, W/4, dims[0])`` channels-last tokens in the shared heat space.

        ``x`` may also be a mapping ``{modality: (B, C_m, H, W)}`` of co-registered images (e.g. optical + SAR of one
        scene): each goes through its own stem and the tokens are summed, a fusion in the shared heat space.
        """
        if isinstance(x, Mapping):
            if not x or modality is not None:
                raise ValueError("a fused input is a non-empty {modality: image} mapping, without modality=")
            sizes = {name: tuple(image.shape[-2:]) for name, image in x.items()}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"fused inputs must be co-registered (same H, W), got {sizes}")
            return cast(torch.Tensor, sum(self.stem(image, name) for name, image in x.items()))
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D (B, C, H, W) tensor, got {x.ndim}-D with shape {tuple(x.shape)}")
        modality = self._resolve_modality(x, modality)
        self._check_input(x, modality)
        return self.stems[modality](x)

    # ----------------------------------------------------------------------------------------------------------------
    # forward paths

    def forward_features(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, dims[-1], ceil(H/32), ceil(W/32))``, before the head norm."""
        x = self.stem(x, modality)
        for stage in self.stages:
            x = stage(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, C, h, w)`` features -> ``(B, num_classes)`` logits (or ``(B, C)`` with ``pre_logits``)."""
        return self.head(x.permute(0, 2, 3, 1), pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, modality))

    @property
    def heat_stages(self) -> Sequence[HeatStage]:
        """``stages`` as the type checker should see them (an ``nn.ModuleList`` types its items as ``Module``)."""
        return cast("Sequence[HeatStage]", self.stages)

    def forward_intermediates(
        self,
        x: torch.Tensor | Mapping[str, torch.Tensor],
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        modality: str | None = None,
    ):
        """Per-stage features (pre-downsample, i.e. each stage's own output), NCHW ``(B, dims[i], H/2^(i+2), ...)``.

        ``norm=True`` applies the per-stage output norms (built with ``feature_norms=True``), as dense heads expect.
        Returns the list, or ``(final_features, list)`` unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if norm and any(stage.out_norm is None for stage in self.heat_stages):
            raise ValueError("norm=True needs per-stage output norms: build the model with feature_norms=True")
        take, max_index = feature_take_indices(len(self.stages), _index_list(indices))
        h = self.stem(x, modality)
        stages = self.heat_stages if not (stop_early or intermediates_only) else self.heat_stages[: max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            h = stage(h)
            if i in take:
                feat = stage.out_norm(h) if norm and stage.out_norm is not None else h
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return h.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages after the last requested one (and the head); returns the absolute indices kept."""
        take, max_index = feature_take_indices(len(self.stages), _index_list(indices))
        self.stages = self.stages[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_head:
            self.reset_classifier(0)
        return take

    # ----------------------------------------------------------------------------------------------------------------
    # timm conveniences

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        pool = self.head.global_pool if global_pool is None else global_pool
        self.arch_config.update(num_classes=num_classes, global_pool=pool)  # what a rebuild must give the head
        device = self.head.norm.weight.device
        self.head = ClassifierHead(self.num_features, num_classes, pool, self.head.drop.p).to(device)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"stages.{i}.freq_embed" for i in range(len(self.stages))}
        if self.use_sce:
            names |= {f"stages.{i}.heat_capacity" for i in range(len(self.stages))}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stems",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.(?:freq_embed|heat_capacity|out_norm)", (0,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, blocks: int | None = None) -> None:
        """Recompute blocks in the backward pass instead of keeping their activations.

        ``blocks``: how many blocks to recompute, counted from the input (``None``: all of them). The first blocks
        run at the highest resolution, where a block keeps the most activation memory for the least compute, so a
        partial setting saves most of the memory for little time: on RS-vHeat-B at 512² the first 8 of 24 blocks
        hold about 40 % of the activations (see docs/efficiency.md for the measured trade-off).

        (Selective activation checkpointing inside a block, keeping GEMM/convolution outputs and recomputing the
        element-wise operators, was measured and removed: on rsvheat_tiny at 512², batch 2, it saved 15 % of the
        training memory for 16 % more CPU time per step; :mod:`rsvheat.operators.recompute` does that part now
        without recomputing any GEMM.)"""
        stages = self.heat_stages
        remaining = (sum(len(stage.blocks) for stage in stages) if blocks is None else blocks) if enable else 0
        if remaining < 0:
            raise ValueError(f"blocks must be >= 0 or None, got {blocks}")
        for stage in stages:
            stage.recomputed_blocks = min(remaining, len(stage.blocks))
            remaining -= stage.recomputed_blocks

    # ----------------------------------------------------------------------------------------------------------------
    # inference folding

    def fold(self, img_size: int | Sequence[int] | None = None) -> RSVHeat:
        """Eval mode and folded mode (timm's ``reparameterize()``, the official ``infer_init``, for any size, SCE
        kept): every stage keeps its FVE/SCE resized to the feature map and every block its decay filter
        ``exp(-kt (w_n^2 + w_m^2))`` as buffers, computed once per input size instead of at every forward, and
        stored as constants by ``torch.export``. With ``img_size`` they are folded now for that size; without, at the
        first forward of each size. Outputs are identical to the unfolded model.

        A fold is a promise that the weights stay as they are: ``train()`` and :meth:`unfold` end it, a
        ``load_state_dict`` folds again from the new weights; after editing weights in place, call :meth:`fold`
        again. Returns the model."""
        self.eval()
        if img_size is None:
            for stage in self.heat_stages:
                stage.folding = True
            return self
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        h, w = -(-size[0] // 4), -(-size[1] // 4)
        for i, stage in enumerate(self.heat_stages):
            if i > 0:
                h, w = -(-h // 2), -(-w // 2)
            stage.fold((h, w))
        return self

    def unfold(self) -> RSVHeat:
        """Leave folded mode and drop every folded tensor: FVE, SCE and filters are computed from the weights at
        every forward again (as in training). Returns the model."""
        for stage in self.heat_stages:
            stage.unfold()
        return self


def _index_list(indices: int | Sequence[int] | None) -> int | list[int] | None:
    """timm's ``feature_take_indices`` takes a count or a list."""
    return indices if indices is None or isinstance(indices, int) else list(indices)


def fold_backbones(module: nn.Module) -> nn.Module:
    """Every :class:`RSVHeat` inside ``module`` (a task model, a wrapper) in folded mode (:meth:`RSVHeat.fold`),
    ``module`` in eval mode: for serving. Returns ``module``."""
    module.eval()
    for backbone in module.modules():
        if isinstance(backbone, RSVHeat):
            backbone.fold()
    return module


# --------------------------------------------------------------------------------------------------------------------
# variants and timm registration

#: name -> architecture. vHeat: no SCE (the CVPR model). RS-vHeat: with SCE; rsvheat_base is the paper's model.
VARIANTS: dict[str, dict] = {
    "vheat_tiny": dict(
        depths=(2, 2, 6, 2),
        dims=(96, 192, 384, 768),
        post_norm=False,
        layer_scale=None,
        drop_path_rate=0.1,
        use_sce=False,
    ),
    "vheat_small": dict(
        depths=(2, 2, 18, 2),
        dims=(96, 192, 384, 768),
        post_norm=True,
        layer_scale=1e-5,
        drop_path_rate=0.3,
        use_sce=False,
    ),
    "vheat_base": dict(
        depths=(2, 2, 18, 2),
        dims=(128, 256, 512, 1024),
        post_norm=True,
        layer_scale=1e-5,
        drop_path_rate=0.5,
        use_sce=False,
    ),
}
VARIANTS.update({"rs" + name: dict(cfg, use_sce=True) for name, cfg in VARIANTS.items()})


def _cfg(**kwargs) -> dict:
    cfg = dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        first_conv=None,  # stems are adapted by our filter fn (documented rule), not by timm
        classifier="head.fc",
        license="apache-2.0",
    )
    cfg.update(kwargs)
    return cfg


# The official vHeat ImageNet-1k checkpoints: release files vHeat_{tiny,small,base}.pth of MzeroMiko/vHeat (release tag
# "vheatcls"), {"model": state dict} with the official key names, which `checkpoint_filter_fn` converts. Their data
# config is the official one: 224 px, ImageNet mean/std, bicubic resize to 256 then a centre crop of 224 (0.875). The
# repository states no licence, so none is claimed here.
_VHEAT_IN1K = dict(
    num_classes=1000,
    license=None,
    paper_ids="arXiv:2405.16555",
    notes=("Official vHeat ImageNet-1k weights (MzeroMiko/vHeat release files), converted on load.",),
)
VHEAT_RELEASE_URLS = {
    "vheat_tiny": "https://github.com/MzeroMiko/vHeat/releases/download/vheatcls/vHeat_tiny.pth",
    "vheat_small": "https://github.com/MzeroMiko/vHeat/releases/download/vheatcls/vHeat_small.pth",
    "vheat_base": "https://github.com/MzeroMiko/vHeat/releases/download/vheatcls/vHeat_base.pth",
}
_RS_NOTE = (
    "RS-vHeat started from the official vHeat ImageNet-1k weights: the SCE at its initialisation, stems other than "
    "the optical one adapted from it (rsvheat.adapt_stem_weight)."
)
default_cfgs = generate_default_cfgs(
    {
        **{f"{name}.in1k": _cfg(url=url, **_VHEAT_IN1K) for name, url in VHEAT_RELEASE_URLS.items()},
        # No RS-vHeat weights are published: the default tag has no source (pretrained=True explains, see _create);
        # `.vheat_in1k` starts an RS-vHeat model from the vHeat weights of its size.
        **{f"rs{name}.untrained": _cfg() for name in VHEAT_RELEASE_URLS},
        **{
            f"rs{name}.vheat_in1k": _cfg(url=url, **dict(_VHEAT_IN1K, notes=(_RS_NOTE,)))
            for name, url in VHEAT_RELEASE_URLS.items()
        },
    }
)
for _name in VHEAT_RELEASE_URLS:
    # timm makes the first tag with weights the default even after an explicit one: put "untrained" first again, so
    # that pretrained=True without a tag explains instead of downloading vHeat weights into an RS-vHeat model
    _tags = default_cfgs[f"rs{_name}"].tags
    _tags.remove("untrained")
    _tags.appendleft("untrained")


def _no_weights_message(variant: str) -> str:
    size = variant.split("_", 1)[1]
    return (
        f"no pretrained weights are published for {variant}: the RS-vHeat authors have not released RS-vHeat weights. "
        f"Load a file you have: timm.create_model({variant!r}, pretrained=True, "
        "pretrained_cfg_overlay=dict(file='weights.pth')) or rsvheat.load_checkpoint(model, 'weights.pth') "
        "(rsvheat .safetensors, official RS-vHeat or vHeat .pth, Lightning .ckpt); "
        f"or start from the official vHeat ImageNet-1k weights with timm.create_model('{variant}.vheat_in1k', "
        f"pretrained=True) (downloads vHeat_{size}.pth; SCE at its initialisation, other stems adapted from the "
        "optical one)"
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    if pretrained:
        # timm's own message ("No pretrained weights exist ... use pretrained=False") says neither what exists nor
        # how to load a file: check the source first. RuntimeError, the type timm raises, for callers that catch it.
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.has_weights or cfg.state_dict is not None):
            raise RuntimeError(_no_weights_message(variant))
    if kwargs.get("features_only"):
        kwargs.setdefault("feature_norms", True)  # dense heads get per-stage normalised features
    # Per-modality data description (bands, mean/std, img_size) written by rsvheat.save_pretrained into the model
    # arguments of a timm config.json: not an RSVHeat argument, kept on the model for the next save.
    modality_cfg = kwargs.pop("modality_cfg", None)
    model: Any = build_model_with_cfg(
        RSVHeat,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter", norm=kwargs.get("feature_norms", False)),
        **dict(VARIANTS[variant], **kwargs),
    )
    if modality_cfg is not None:
        model.modality_cfg = {name: dict(cfg) for name, cfg in modality_cfg.items()}
    return model


def _register(name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name}: {VARIANTS[name]}"
    return register_model(entrypoint)


for _name in VARIANTS:
    globals()[_name] = _register(_name)


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` restricted to our variants: an :class:`RSVHeat`, or with ``features_only=True`` timm's
    feature wrapper around one.

    Example: ``create_model("rsvheat_base", modalities={"optical": 3, "sar": 1})``.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(VARIANTS)}")
    return timm.create_model(name, **kwargs)


def create_model_from_weights(path: str | os.PathLike, **overrides) -> RSVHeat:
    """The model a weights file of :func:`~rsvheat.models.checkpoint.save_weights` describes, with its weights:
    ``RSVHeat(**stored arguments, **overrides)``, then :func:`~rsvheat.models.checkpoint.load_checkpoint`.

    ``overrides`` are ``RSVHeat`` arguments and are adapted as on any load: e.g. ``num_classes=0`` drops the
    classifier, more ``modalities`` get stems built from the stored ones, another ``img_size`` resizes FVE/SCE, and
    runtime switches (``check_inputs``, ``dct_impl``) apply. Other files (official ``.pth``, Lightning ``.ckpt``) do
    not say what to build: they raise :class:`~rsvheat.models.checkpoint.CheckpointError`.
    """
    model = RSVHeat(**{**weights_config(path), **overrides})
    load_checkpoint(model, path)
    return model
