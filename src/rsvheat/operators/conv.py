"""The stem's and the downsamplings' 3×3 stride-2 convolution on channels-last fields, with a GEMM backward on CPUs.

oneDNN runs these convolutions' forward near the GEMM rate on CPUs, but their backward at a third to two thirds of it
(on AVX2, for the shapes of RS-vHeat-B at 512²). Written as an im2col GEMM, the same backward is two GEMMs over the
``(B·H'·W', 9·C)`` patch matrix, rebuilt from the saved input, and the patch matrix's adjoint: about a quarter less
time per convolution. GPUs, autocast and inference keep the library convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["strided_conv3x3"]


def _tap_ranges(size: int, out: int) -> list[tuple[int, int, int]]:
    """For each kernel offset ``d`` of a 3-tap, stride-2, padding-1 axis of ``size`` inputs and ``out`` outputs: the
    outputs that read a real input (not padding), ``[first, end)``, and the input index the first one reads."""
    ranges = []
    for d in range(3):
        first = 1 if d == 0 else 0
        end = min(out, (size - d) // 2 + 1)
        ranges.append((first, end, 2 * first + d - 1))
    return ranges


def _patches(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """``(B, H, W, C) -> (B, H', W', 9·C)``: each output's 3×3 input patch, ``(kh, kw, C)`` order, zero padded."""
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    taps = [padded[:, dy : dy + 2 * out_h - 1 : 2, dx : dx + 2 * out_w - 1 : 2] for dy in range(3) for dx in range(3)]
    return torch.cat(taps, -1)


def _patches_adjoint(grad: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The adjoint of :func:`_patches`: ``(B, H', W', 9, C) -> (B, H, W, C)``, each tap added back where it was read."""
    out = grad.new_zeros(grad.shape[0], height, width, grad.shape[-1])
    rows, cols = _tap_ranges(height, grad.shape[1]), _tap_ranges(width, grad.shape[2])
    for dy, (i0, i1, r0) in enumerate(rows):
        for dx, (j0, j1, c0) in enumerate(cols):
            out[:, r0 : r0 + 2 * (i1 - i0) - 1 : 2, c0 : c0 + 2 * (j1 - j0) - 1 : 2] += grad[
                :, i0:i1, j0:j1, 3 * dy + dx
            ]
    return out


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # the permuted view is an NCHW tensor in channels_last memory format, which the convolution keeps: no copies
    return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=2, padding=1).permute(0, 2, 3, 1)


class _StridedConvGemmBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        batch, height, width, channels = x.shape
        out_h, out_w, out_c = grad.shape[1:]
        rows = grad.reshape(-1, out_c)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            patches = _patches(x, out_h, out_w).view(-1, 9 * channels)
            grad_w = (rows.T @ patches).view(out_c, 3, 3, channels).permute(0, 3, 1, 2).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        if ctx.needs_input_grad[0]:
            matrix = weight.permute(0, 2, 3, 1).reshape(out_c, 9 * channels)
            grad_x = _patches_adjoint((rows @ matrix).view(batch, out_h, out_w, 9, channels), height, width)
        return grad_x, grad_w, grad_b


def strided_conv3x3(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``conv`` (3×3, stride 2, padding 1) on a channels-last field: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2),
    C')``. Training in float32/float64 on a CPU takes the GEMM backward; everything else the library convolution.
    Same values and gradients either way (tested in float64)."""
    shape = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    if shape != ((3, 3), (2, 2), (1, 1), (1, 1), 1):
        raise ValueError(f"expected a 3x3, stride-2, padding-1, ungrouped convolution, got {conv}")
    gemm_backward = (
        conv.training
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )
    if gemm_backward:
        return _StridedConvGemmBackward.apply(x, conv.weight, conv.bias)
    return _conv(x, conv.weight, conv.bias)
