"""The Heat Conduction Operator (HCO) of vHeat / RS-vHeat.

Solving the 2-D heat equation ``du/dt = k (d2u/dx2 + d2u/dy2)`` with adiabatic (Neumann) borders on an ``H x W`` grid
gives, for every channel,

    U_t = IDCT2D( DCT2D(U_0) * exp(-k t (w_n^2 + w_m^2)) ),   w_n = n pi / H,  w_m = m pi / W,

with orthonormal DCT-II bases. ``k t`` is one tensor ``(H, W, C)`` predicted from the frequency value embedding (FVE):
``kt = ReLU(Linear(FVE))``. Because ``kt >= 0`` the filter is a low-pass that never attenuates DC, and ``kt = 0`` is the
identity.

Layout: everything here is channels-last ``(B, H, W, C)``, so the per-channel filter is a broadcast multiply and the
projections around it are plain GEMMs over ``B*H*W`` rows.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rsvheat.operators.dct import DctImpl, _fft_dct_last, autocast_off, dct2d, dct_basis
from rsvheat.operators.recompute import corrected_depthwise_conv, gated_projection

SpectralPrecision = Literal["auto", "float32", "bfloat16"]
SPECTRAL_PRECISIONS: tuple[SpectralPrecision, ...] = ("auto", "float32", "bfloat16")


def check_spectral_precision(precision: str) -> SpectralPrecision:
    """``precision`` if it is one of :data:`SPECTRAL_PRECISIONS`, else a ValueError naming it."""
    if precision not in SPECTRAL_PRECISIONS:
        raise ValueError(f"unknown spectral precision {precision!r}; expected one of {SPECTRAL_PRECISIONS}")
    return precision


def spectral_dtype(
    dtype: torch.dtype, device_type: str, precision: SpectralPrecision = "auto", impl: DctImpl = "matmul"
) -> torch.dtype:
    """The dtype in which the spectral transforms of a field of ``dtype`` on ``device_type`` run.

    float32/float64 fields: their own. Half-precision fields: float32, except a bfloat16 field with ``precision``
    ``"bfloat16"``, or ``"auto"`` on CUDA, through the GEMM DCT: then bf16 GEMMs, which accumulate in float32 (each
    GEMM's output rounded to bf16 adds an error of the order of every other bf16 layer's, ``tests/test_heat.py``) on
    GPUs' bf16 tensor cores (their speed there is not measured yet); on CPUs without bf16 instructions they are slower
    than float32 (``benchmarks/results/spectral_precision.md``), hence float32 there. float16 always goes to
    float32: its 5-bit exponent overflows on the DC sums of large maps.
    """
    check_spectral_precision(precision)
    if dtype in (torch.float32, torch.float64):
        return dtype
    wants_bf16 = precision == "bfloat16" or (precision == "auto" and device_type == "cuda")
    return torch.bfloat16 if dtype == torch.bfloat16 and wants_bf16 and impl in ("matmul", "auto") else torch.float32


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached for later autograd use: never an inference tensor
def _frequency_sq_cached(h: int, w: int, device: torch.device, dtype: torch.dtype, negated: bool) -> torch.Tensor:
    wn = torch.arange(h, dtype=torch.float64) * (math.pi / h)
    wm = torch.arange(w, dtype=torch.float64) * (math.pi / w)
    grid = wn[:, None] ** 2 + wm[None, :] ** 2
    return (-grid if negated else grid).to(device=device, dtype=dtype)


def frequency_sq(
    h: int,
    w: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    negated: bool = False,
) -> torch.Tensor:
    """``w_n^2 + w_m^2`` on the ``(h, w)`` DCT grid, ``w_n = n pi / h`` (the official discretisation): ``(h, w)``;
    with ``negated``, ``-(w_n^2 + w_m^2)`` (the heat filter's factor, cached as well)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():  # a constant of the graph: built once per compiled size, not cached here
        return _frequency_sq_cached.__wrapped__(h, w, device, dtype, negated)
    return _frequency_sq_cached(h, w, device, dtype, negated)


def heat_filter(kt: torch.Tensor) -> torch.Tensor:
    """Frequency response ``exp(-kt (w_n^2 + w_m^2))`` for ``kt`` of shape ``(H, W, C)``; returns ``(H, W, C)``."""
    h, w, _ = kt.shape
    # The grid negated, not kt (one (H, W, C) pass fewer, forward and backward, the same bits), and exp in place: the
    # product's backward needs only the grid.
    return (kt * frequency_sq(h, w, kt.device, kt.dtype, negated=True)[:, :, None]).exp_()


def _fft_axis(x: torch.Tensor, dim: int, inverse: bool) -> torch.Tensor:
    return _fft_dct_last(x.movedim(dim, -1), inverse).movedim(-1, dim)


def heat_conduct(
    x: torch.Tensor,
    filt: torch.Tensor,
    impl: DctImpl = "auto",
    overwrite: bool = False,
    precision: SpectralPrecision = "auto",
) -> torch.Tensor:
    """Apply the HCO spectral filter: ``IDCT2D(DCT2D(x) * filt)``.

    Args:
        x: ``(B, H, W, C)`` field (channels-last).
        filt: ``(H, W, C)`` frequency response, e.g. from :func:`heat_filter`.
        impl: ``"matmul"`` (4 batched GEMMs), ``"fft"``, or ``"auto"`` = matmul: on channels-last fields the GEMMs beat
            the FFT at every map size a backbone sees (2.2-4.8x at N = 32-512, ``benchmarks/results/dct.md``).
        overwrite: ``x`` may be used as scratch space (inference: saves two large allocations). Ignored under autograd.
        precision: ``"auto"``, ``"float32"`` or ``"bfloat16"``: how a half-precision ``x`` is transformed (see
            :func:`spectral_dtype`).
    Returns:
        ``(B, H, W, C)`` in ``x``'s dtype.
    """
    b, h, w, c = x.shape
    if filt.shape != (h, w, c):
        raise ValueError(f"heat filter has shape {tuple(filt.shape)}, expected {(h, w, c)} for input {tuple(x.shape)}")
    if impl == "auto":
        impl = "matmul"
    out_dtype = x.dtype
    x = x.to(spectral_dtype(x.dtype, x.device.type, precision, impl))
    # (1, H, W, C): at batch 1 the filter's gradient is then the product itself, not a sum over the batch (a copy)
    filt = filt.to(x.dtype)[None]
    with autocast_off(x):
        if impl == "fft":
            y = _fft_axis(_fft_axis(x, 1, False), 2, False) * filt
            y = _fft_axis(_fft_axis(y, 2, True), 1, True)
        elif impl == "matmul":
            dh = dct_basis(h, x.device, x.dtype)
            dw = dct_basis(w, x.device, x.dtype)
            # H axis: one (H x H) @ (H x W*C) GEMM per sample; W axis: (W x W) @ (W x C) per row.
            if overwrite and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad):
                # Ping-pong between x and one buffer: fresh large buffers cost page faults on CPU.
                buf = torch.matmul(dh, x.view(b, h, w * c))
                torch.matmul(dw, buf.view(b * h, w, c), out=x.view(b * h, w, c))
                x.mul_(filt)
                torch.matmul(dw.T, x.view(b * h, w, c), out=buf.view(b * h, w, c))
                y = torch.matmul(dh.T, buf.view(b, h, w * c), out=x.view(b, h, w * c)).view(b, h, w, c)
            else:
                y = torch.matmul(dh, x.reshape(b, h, w * c)).view(b * h, w, c)
                y = torch.matmul(dw, y).view(b, h, w, c) * filt
                y = torch.matmul(dw.T, y.view(b * h, w, c)).view(b, h, w * c)
                y = torch.matmul(dh.T, y).view(b, h, w, c)
        else:
            raise ValueError(f"unknown DCT implementation {impl!r}; expected 'auto', 'matmul' or 'fft'")
    return y.to(out_dtype)


def heat_conduct_reference(x: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
    """Plain float64 path written straight from the equation, for tests: ``(B, H, W, C)`` in and out."""
    b, h, w, c = x.shape
    x64, kt64 = x.double(), kt.double()
    dh, dw = dct_basis(h, x.device, torch.float64), dct_basis(w, x.device, torch.float64)
    spectrum = torch.einsum("nh,mw,bhwc->bnmc", dh, dw, x64)
    spectrum = spectrum * torch.exp(-kt64 * frequency_sq(h, w, x.device, torch.float64)[:, :, None])
    return torch.einsum("nh,mw,bnmc->bhwc", dh, dw, spectrum)


def resize_embedding(embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a per-stage ``(H, W, C)`` embedding (FVE or SCE) to ``size``, as RS-vHeat's loader does:
    ``(H', W', C)``; the tensor itself when it already has that size."""
    if tuple(embed.shape[:2]) == tuple(size):
        return embed
    resized = F.interpolate(embed.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).contiguous()


class HeatConduction(nn.Module):
    """The HCO token mixer of one block, channels-last ``(B, H, W, C) -> (B, H, W, C)``.

    ``[SCE correction] -> depthwise 3x3 -> Linear C->2C split into (u, z) -> heat filter on u -> LN(u) * SiLU(z)
    -> Linear``.

    The spatial correction embedding (SCE, RS-vHeat; called ``heat_capacity`` in the official code) enters as
    ``LN(ReLU(x + SCE))`` before the depthwise conv. ``to_k`` maps the stage's FVE to ``kt``.
    """

    def __init__(self, dim: int, use_sce: bool = False, dct_impl: DctImpl = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.dct_impl = dct_impl
        #: how half-precision fields are transformed (see :func:`spectral_dtype`); a runtime switch, not a weight
        self.spectral_precision: SpectralPrecision = "auto"
        self.sce_norm = nn.LayerNorm(dim) if use_sce else None
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.to_k = nn.Linear(dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, dim)
        # The folded decay filter (see `fold`): a buffer, so that exporters store it as a constant; not persistent,
        # since it is derived from the weights.
        self.folded_filter: torch.Tensor | None
        self.register_buffer("folded_filter", None, persistent=False)

    def kt(self, freq_embed: torch.Tensor) -> torch.Tensor:
        """Diffusivity times time, ``ReLU(to_k(FVE))``: ``(H, W, C)``."""
        return F.relu(self.to_k(freq_embed))

    @torch.inference_mode(False)  # a normal tensor even when folded under inference_mode: exporters can trace it
    @torch.no_grad()
    def fold(self, freq_embed: torch.Tensor) -> torch.Tensor:
        """Compute the decay filter for ``freq_embed`` (``(H, W, C)``, resized to the feature map) and keep it as the
        buffer ``folded_filter``, which :meth:`decay_filter` then returns at that size until :meth:`unfold` (or
        ``train()``): the official ``k_exp``, for any size. A fold is a promise that the weights stay as they are."""
        self.folded_filter = heat_filter(self.kt(freq_embed))
        return self.folded_filter

    def unfold(self) -> None:
        """Drop the folded filter: the filter is computed from the weights again."""
        self.folded_filter = None

    def decay_filter(self, freq_embed: torch.Tensor) -> torch.Tensor:
        """``exp(-kt (w_n^2 + w_m^2))`` for an FVE already resized to the feature map: ``(H, W, C)``. The folded filter
        (:meth:`fold`) when there is one of this size, else computed from the weights: the same path in training,
        evaluation, under ``torch.compile`` and while exporting."""
        folded = self.folded_filter
        if folded is not None and folded.shape == freq_embed.shape:
            return folded
        return heat_filter(self.kt(freq_embed))

    def forward(
        self, x: torch.Tensor, freq_embed: torch.Tensor, sce: torch.Tensor | None = None, return_states: bool = False
    ):
        """x: ``(B, H, W, C)``; freq_embed, sce: ``(H, W, C)``. With ``return_states`` also a dict of the fields
        (for heat maps): ``corrected`` (after SCE), ``source`` (HCO input u), ``spectrum`` (its DCT), ``conducted``
        (after the IDCT), ``filter``."""
        if self.sce_norm is not None and sce is None:
            raise ValueError("this HCO was built with a spatial correction embedding (SCE) but none was given")
        corrected = None
        if sce is not None and self.sce_norm is not None and torch.is_grad_enabled() and not return_states:
            # x + SCE, ReLU and LN recomputed in the backward: autograd keeps x only, not the ReLU and LN outputs.
            x = corrected_depthwise_conv(x, sce, self.sce_norm, self.dwconv)
        else:
            if sce is not None and self.sce_norm is not None:
                x = self.sce_norm(F.relu(x + sce))
            corrected = x
            x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # Two half-size GEMMs instead of one + chunk: both halves come out contiguous for the DCT. split, not two
        # slices: its backward is one concatenation, where each slice's zero-fills a full-size gradient.
        weight_u, weight_z = self.in_proj.weight.split(self.dim)
        bias_u, bias_z = self.in_proj.bias.split(self.dim)
        u = F.linear(x, weight_u, bias_u)
        z = F.linear(x, weight_z, bias_z)
        filt = self.decay_filter(freq_embed)
        conducted = heat_conduct(u, filt, self.dct_impl, not return_states, self.spectral_precision)
        if torch.is_grad_enabled():
            # LN, SiLU and their product recomputed in the backward: autograd keeps conducted and z only.
            out = gated_projection(conducted, z, self.out_norm, self.out_proj)
        else:
            out = self.out_proj(self.out_norm(conducted).mul_(F.silu(z, inplace=True)))
        if not return_states:
            return out
        states = dict(
            corrected=corrected,
            source=u,
            spectrum=dct2d(u.permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
            conducted=conducted,
            filter=filt,
        )
        return out, states

    def train(self, mode: bool = True):
        if mode:
            self.unfold()  # a fold is made for one set of weights; training is about to change them
        return super().train(mode)
