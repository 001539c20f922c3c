"""Autograd functions that keep fewer activations for the backward pass: the GEMMs' inputs are saved, the cheap
element-wise parts between them are recomputed in the backward.

Plain autograd keeps, per token, every element-wise op's input and output that a later op needs: for the MLP
``fc2(GELU(h))`` both ``h`` and ``GELU(h)`` (4C each). :func:`gelu_linear` saves only ``h``; no GEMM is run twice. Its
gradients equal autograd's (same ATen backward kernels; tested in float64). (The heat operator itself needs no such
function: its DCT bases need no gradient, so autograd already keeps only the spectrum that the filter multiplies.)

It is meant for training (autograd recording); the models call it only then, and keep their in-place inference paths
otherwise. Under autocast the forward's GEMM runs in autocast's dtype as a plain ``F.linear`` would, and the backward
runs its GEMMs in the dtype of the incoming gradient (the forward GEMM's output dtype) with autocast off, as autograd's
own linear backward does, so the result is the same on CPU and CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsvheat.operators.dct import autocast_off

__all__ = ["gelu_linear"]


def _linear_backward(
    grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``F.linear(inp, weight, bias)`` w.r.t. input, weight, bias: ``grad (..., N)``, ``inp (..., K)``,
    ``weight (N, K)``; GEMMs in ``grad``'s dtype, parameter gradients returned in ``weight``'s dtype."""
    rows = grad.reshape(-1, grad.shape[-1])
    grad_in = grad @ weight.to(grad.dtype) if needs[0] else None
    grad_w = (rows.T @ inp.reshape(-1, inp.shape[-1]).to(grad.dtype)).to(weight.dtype) if needs[1] else None
    grad_b = rows.sum(0).to(weight.dtype) if needs[2] else None
    return grad_in, grad_w, grad_b


class _GeluLinear(torch.autograd.Function):
    """``F.linear(GELU(h), weight, bias)`` keeping ``h`` only (``GELU(h)`` is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with autocast_off(grad):
            act = F.gelu(h)
            grad_act, grad_w, grad_b = _linear_backward(
                grad, act, weight, (needs[0], needs[1], needs[2] and ctx.has_bias)
            )
            grad_h = torch.ops.aten.gelu_backward(grad_act.to(h.dtype), h) if needs[0] else None
        return grad_h, grad_w, grad_b


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)``: ``h (..., K)``, ``weight (N, K)``, ``bias (N,)`` -> ``(..., N)``.

    Under autograd only ``h`` is kept for the backward (the MLP's hidden activation is saved once, not twice)."""
    return _GeluLinear.apply(h, weight, bias)
