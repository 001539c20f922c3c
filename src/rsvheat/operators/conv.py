"""The stem's and the downsamplings' 3×3 stride-2 convolution on channels-last fields, with a GEMM backward on CPUs.

oneDNN runs these convolutions' forward near the GEMM rate on CPUs, but their backward at a third to two thirds of it
(on AVX2, for the shapes of RS-vHeat-B at 512²). Written as an im2col GEMM, the same backward is two GEMMs over the
``(B·H'·W', 9·C)`` patch matrix, rebuilt from the saved input in chunks of output rows, and its adjoint: about a third
less time per convolution. GPUs, autocast and inference keep the library convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["StridedConv3x3"]


#: The backward builds the patch matrix in chunks of output rows holding at most this many elements (8 MB in float32):
#: the whole matrix would be 9× the input, allocated and freed at the end of every backward pass.
_CHUNK_ELEMENTS = 1 << 21


def _patches(padded: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """``(B, 2·H' + 1, W + 2, C) -> (B, H', W', 9·C)``: each output's 3×3 patch of the zero-padded input, ``(kh, kw,
    C)`` order."""
    taps = [padded[:, dy : dy + 2 * out_h - 1 : 2, dx : dx + 2 * out_w - 1 : 2] for dy in range(3) for dx in range(3)]
    return torch.cat(taps, -1)


def _add_patches_adjoint(padded: torch.Tensor, grad: torch.Tensor) -> None:
    """The adjoint of :func:`_patches`, added into ``padded``: ``grad`` ``(B, H', W', 9, C)``, each tap added back
    where it was read."""
    out_h, out_w = grad.shape[1:3]
    for tap in range(9):
        dy, dx = divmod(tap, 3)
        padded[:, dy : dy + 2 * out_h - 1 : 2, dx : dx + 2 * out_w - 1 : 2] += grad[:, :, :, tap]


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
    @once_differentiable  # in-place accumulation: no graph of the backward itself
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        batch, height, width, channels = x.shape
        out_h, out_w, out_c = grad.shape[1:]
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_b = grad.sum((0, 1, 2)) if ctx.has_bias and need_b else None
        grad_w = weight.new_zeros(out_c, 9 * channels) if need_w else None  # (kh, kw, C) order
        padded_x = F.pad(x, (0, 0, 1, 1, 1, 1)) if need_w else None
        padded_grad_x = x.new_zeros(batch, height + 2, width + 2, channels) if need_x else None
        matrix = weight.permute(0, 2, 3, 1).reshape(out_c, 9 * channels) if need_x else None
        step = max(1, _CHUNK_ELEMENTS // (batch * out_w * 9 * channels))
        for first in range(0, out_h, step):
            end = min(out_h, first + step)
            rows = grad[:, first:end].reshape(-1, out_c)
            window = slice(2 * first, 2 * end + 1)  # the padded input rows these outputs read
            if grad_w is not None and padded_x is not None:
                patches = _patches(padded_x[:, window], end - first, out_w)
                grad_w.addmm_(rows.T, patches.view(-1, 9 * channels))
            if padded_grad_x is not None and matrix is not None:
                patches_grad = (rows @ matrix).view(batch, end - first, out_w, 9, channels)
                _add_patches_adjoint(padded_grad_x[:, window], patches_grad)
        grad_x = padded_grad_x[:, 1:-1, 1:-1].contiguous() if padded_grad_x is not None else None
        if grad_w is not None:
            grad_w = grad_w.view(out_c, 3, 3, channels).permute(0, 3, 1, 2).contiguous()
        return grad_x, grad_w, grad_b


class StridedConv3x3(nn.Conv2d):
    """A 3×3, stride-2, padding-1 convolution on channels-last fields: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2),
    C')``; the weights and their keys are those of the ``nn.Conv2d`` it is. Training in float32/float64 on a CPU takes
    the GEMM backward, everything else the library convolution: the same values and gradients either way (tested in
    float64). The GEMM backward has no double backward (gradient penalties, meta-learning): set
    ``gemm_backward_on_cpu = False`` for those."""

    #: ``False``: the library convolution's backward on CPUs too (set on the class or on one module).
    gemm_backward_on_cpu: bool = True

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gemm_backward = (
            self.gemm_backward_on_cpu
            and self.training
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
        )
        if gemm_backward:
            return _StridedConvGemmBackward.apply(x, self.weight, self.bias)
        return _conv(x, self.weight, self.bias)
