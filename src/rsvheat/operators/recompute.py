"""Autograd functions that keep fewer activations for the backward pass: the GEMMs' and convolutions' inputs are
saved, the cheap element-wise parts between them (GELU, SiLU, ReLU, LayerNorm, the gate product) are recomputed in the
backward.

Plain autograd keeps, per token, every element-wise op's input and output that a later op needs: for the MLP
``fc2(GELU(h))`` both ``h`` and ``GELU(h)`` (4C each); for the HCO gate ``out_proj(LN(c) * SiLU(z))`` the fields
``c``, ``LN(c)``, ``z``, ``SiLU(z)`` and the product; for RS-vHeat's correction ``dwconv(LN(ReLU(x + SCE)))`` the ReLU's
and the LN's outputs; for a pre-norm block's ``fc1(LN(x))`` both ``x`` and ``LN(x)``. The functions here save only
``h``; ``c`` and ``z``; ``x``; ``x``. No GEMM or convolution is run twice.
Their gradients equal autograd's (same ATen backward kernels; tested in float64). (The heat operator itself needs no
such function: its DCT bases need no gradient, so autograd already keeps only the spectrum that the filter multiplies.)

They are meant for training (autograd recording); the models call them only then, and keep their in-place inference
paths otherwise. Under autocast the forward's GEMM runs in autocast's dtype as a plain ``F.linear`` would, and the
backward runs its GEMMs in the dtype of the incoming gradient (the forward GEMM's output dtype) with autocast off, as
autograd's own linear backward does, so the result is the same on CPU and CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsvheat.operators.dct import autocast_off

__all__ = ["corrected_depthwise_conv", "gated_projection", "gelu_linear", "layer_norm_linear"]


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


def _layer_norm_backward(
    grad: torch.Tensor,
    inp: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    norm_w: torch.Tensor,
    norm_b: torch.Tensor,
    needs: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """ATen's LayerNorm backward over the last axis in ``grad``'s dtype, from the saved statistics: the input gradient
    in that dtype, the weight and bias gradients in the parameters' dtype. ``needs``: input, weight, bias."""
    dtype = grad.dtype
    grad_in, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad, inp.to(dtype), (inp.shape[-1],), mean, rstd, norm_w.to(dtype), norm_b.to(dtype), needs
    )
    grad_w = grad_w.to(norm_w.dtype) if grad_w is not None else None
    grad_b = grad_b.to(norm_b.dtype) if grad_b is not None else None
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
            # the weight's gradient first, so that GELU(h) is freed before the input's gradient is made: two hidden
            # (4C) fields alive at once, not three
            _, grad_w, grad_b = _linear_backward(grad, F.gelu(h), weight, (False, needs[1], needs[2] and ctx.has_bias))
            grad_h = None
            if needs[0]:
                grad_act = (grad @ weight.to(grad.dtype)).to(h.dtype)
                if torch.is_grad_enabled():  # a graph of the backward is recorded: no in-place
                    grad_h = torch.ops.aten.gelu_backward(grad_act, h)
                else:
                    grad_h = torch.ops.aten.gelu_backward.grad_input(grad_act, h, grad_input=grad_act)
        return grad_h, grad_w, grad_b


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)``: ``h (..., K)``, ``weight (N, K)``, ``bias (N,)`` -> ``(..., N)``.

    Under autograd only ``h`` is kept for the backward (the MLP's hidden activation is saved once, not twice)."""
    return _GeluLinear.apply(h, weight, bias)


class _LayerNormLinear(torch.autograd.Function):
    """``F.linear(LN(x), weight, bias)`` keeping ``x`` only: the LN (statistics included) is recomputed in the
    backward for the weight gradient (plain autograd keeps both ``x``, for the LN, and ``LN(x)``, for the GEMM)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        norm_w: torch.Tensor,
        norm_b: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        normed, _, _ = _layer_norm(x, norm_w, norm_b, eps)
        ctx.save_for_backward(x, norm_w, norm_b, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return F.linear(normed, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, norm_w, norm_b, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_nw = grad_nb = None
        with autocast_off(grad):
            normed, mean, rstd = _layer_norm(x, norm_w, norm_b, ctx.eps)
            want_input = needs[0] or needs[1] or needs[2]
            grad_normed, grad_w, grad_b = _linear_backward(
                grad, normed, weight, (want_input, needs[4], needs[5] and ctx.has_bias)
            )
            if grad_normed is not None:  # want_input
                grad_x, grad_nw, grad_nb = _layer_norm_backward(
                    grad_normed.to(normed.dtype), x, mean, rstd, norm_w, norm_b, [needs[0], needs[1], needs[2]]
                )
                grad_x = grad_x.to(x.dtype) if grad_x is not None else None
        return grad_x, grad_nw, grad_nb, None, grad_w, grad_b


def _layer_norm(
    x: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(LN(x), mean, rstd)`` over the last axis, in the wider of ``x``'s and the weight's dtypes."""
    dtype = torch.promote_types(x.dtype, norm_w.dtype)
    return torch.native_layer_norm(x.to(dtype), (x.shape[-1],), norm_w.to(dtype), norm_b.to(dtype), eps)


def layer_norm_linear(x: torch.Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> torch.Tensor:
    """``linear(norm(x))``: ``x`` ``(..., K)`` -> ``(..., N)``. Under autograd only ``x`` is kept for the backward
    (in a pre-norm block the residual stream, which a plain LN keeps as well), not ``norm(x)``."""
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


class _GatedProjection(torch.autograd.Function):
    """``F.linear(LN(c) * SiLU(z), proj_w, proj_b)`` keeping ``c`` and ``z`` only; ``LN(c)``, ``SiLU(z)`` and their
    product are recomputed in the backward (the LN statistics too: one cheap reduction, bitwise the forward's)."""

    @staticmethod
    def forward(
        ctx,
        c: torch.Tensor,
        z: torch.Tensor,
        norm_w: torch.Tensor,
        norm_b: torch.Tensor,
        eps: float,
        proj_w: torch.Tensor,
        proj_b: torch.Tensor | None,
    ) -> torch.Tensor:
        gated, _, _ = _GatedProjection._gate(c, z, norm_w, norm_b, eps)
        ctx.save_for_backward(c, z, norm_w, norm_b, proj_w)
        ctx.eps, ctx.has_bias = eps, proj_b is not None
        return F.linear(gated, proj_w, proj_b)

    @staticmethod
    def _gate(c: torch.Tensor, z: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, eps: float):
        """``(LN(c) * SiLU(z), LN(c), SiLU(z), mean, rstd)`` minus the last two: ``(B, H, W, C)`` each. The LN runs
        in the wider of the field's and its weight's dtypes (float32 for a bf16 field), as autocast does on CUDA."""
        dtype = torch.promote_types(c.dtype, norm_w.dtype)
        normed, mean, rstd = torch.native_layer_norm(
            c.to(dtype), (c.shape[-1],), norm_w.to(dtype), norm_b.to(dtype), eps
        )
        act = F.silu(z)
        return normed * act, (normed, act), (mean, rstd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c, z, norm_w, norm_b, proj_w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with autocast_off(grad):
            gated, (normed, act), (mean, rstd) = _GatedProjection._gate(c, z, norm_w, norm_b, ctx.eps)
            grad_gated, grad_pw, grad_pb = _linear_backward(
                grad, gated, proj_w, (needs[0] or needs[1] or needs[2] or needs[3], needs[5], needs[6] and ctx.has_bias)
            )
            grad_z = grad_c = grad_nw = grad_nb = None
            if grad_gated is not None:
                if needs[1]:
                    grad_z = torch.ops.aten.silu_backward((grad_gated * normed).to(z.dtype), z)
                if needs[0] or needs[2] or needs[3]:
                    grad_c, grad_nw, grad_nb = _layer_norm_backward(
                        (grad_gated * act).to(normed.dtype),
                        c,
                        mean,
                        rstd,
                        norm_w,
                        norm_b,
                        [needs[0], needs[2], needs[3]],
                    )
                    grad_c = grad_c.to(c.dtype) if grad_c is not None else None
        return grad_c, grad_z, grad_nw, grad_nb, None, grad_pw, grad_pb


def gated_projection(
    c: torch.Tensor,
    z: torch.Tensor,
    norm: torch.nn.LayerNorm,
    proj: torch.nn.Linear,
) -> torch.Tensor:
    """The HCO's output gate and projection, ``proj(norm(c) * SiLU(z))``: ``c``, ``z`` ``(B, H, W, C)`` ->
    ``(B, H, W, C_out)``. Under autograd only ``c`` and ``z`` are kept for the backward."""
    return _GatedProjection.apply(c, z, norm.weight, norm.bias, norm.eps, proj.weight, proj.bias)


class _CorrectedDepthwiseConv(torch.autograd.Function):
    """RS-vHeat's SCE correction and the HCO's depthwise conv, ``dwconv(LN(ReLU(x + sce)))``, keeping ``x`` only:
    ``x + sce``, the ReLU, the LN and its statistics are recomputed in the backward (plain autograd keeps the ReLU's
    output for the LN and the LN's output for the conv's weight gradient)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        sce: torch.Tensor,
        norm_w: torch.Tensor,
        norm_b: torch.Tensor,
        eps: float,
        conv_w: torch.Tensor,
        conv_b: torch.Tensor | None,
    ) -> torch.Tensor:
        _, _, normed, _ = _CorrectedDepthwiseConv._correct(x, sce, norm_w, norm_b, eps)
        ctx.save_for_backward(x, sce, norm_w, norm_b, conv_w)
        ctx.eps, ctx.has_bias = eps, conv_b is not None
        # (B, H, W, C) viewed as NCHW is channels_last: the conv reads and writes it without a copy
        return F.conv2d(normed.permute(0, 3, 1, 2), conv_w, conv_b, padding=1, groups=conv_w.shape[0]).permute(
            0, 2, 3, 1
        )

    @staticmethod
    def _correct(x: torch.Tensor, sce: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, eps: float):
        """``(ReLU(x + sce), (mean, rstd), LN(ReLU(x + sce)), dtype)``, ``(B, H, W, C)`` fields; the LN runs in the
        wider of the field's and its weight's dtypes."""
        act = F.relu(x + sce)
        dtype = torch.promote_types(act.dtype, norm_w.dtype)
        act = act.to(dtype)
        normed, mean, rstd = torch.native_layer_norm(act, (act.shape[-1],), norm_w.to(dtype), norm_b.to(dtype), eps)
        return act, (mean, rstd), normed, dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, sce, norm_w, norm_b, conv_w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_sce = grad_nw = grad_nb = grad_cw = grad_cb = None
        with autocast_off(grad):
            act, (mean, rstd), normed, dtype = _CorrectedDepthwiseConv._correct(x, sce, norm_w, norm_b, ctx.eps)
            want_input = needs[0] or needs[1] or needs[2] or needs[3]
            grad_normed, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
                grad.permute(0, 3, 1, 2),
                normed.to(grad.dtype).permute(0, 3, 1, 2),
                conv_w.to(grad.dtype),
                [conv_w.shape[0]] if ctx.has_bias else None,
                [1, 1],
                [1, 1],
                [1, 1],
                False,
                [0, 0],
                conv_w.shape[0],
                [want_input, needs[5], needs[6] and ctx.has_bias],
            )
            grad_cw = grad_cw.to(conv_w.dtype) if grad_cw is not None else None
            grad_cb = grad_cb.to(conv_w.dtype) if grad_cb is not None else None
            if want_input:
                grad_act, grad_nw, grad_nb = _layer_norm_backward(
                    grad_normed.permute(0, 2, 3, 1).to(dtype),
                    act,
                    mean,
                    rstd,
                    norm_w,
                    norm_b,
                    [needs[0] or needs[1], needs[2], needs[3]],
                )
                if grad_act is not None:
                    grad_pre = torch.ops.aten.threshold_backward(grad_act, act, 0)  # ReLU's, from its output
                    grad_x = grad_pre.to(x.dtype) if needs[0] else None
                    grad_sce = grad_pre.sum(0).to(sce.dtype) if needs[1] else None
        return grad_x, grad_sce, grad_nw, grad_nb, None, grad_cw, grad_cb


def corrected_depthwise_conv(
    x: torch.Tensor, sce: torch.Tensor, norm: torch.nn.LayerNorm, conv: torch.nn.Conv2d
) -> torch.Tensor:
    """``conv(norm(ReLU(x + sce)))`` on channels-last fields: ``x`` ``(B, H, W, C)``, ``sce`` ``(H, W, C)``, ``conv`` a
    3x3 depthwise ``nn.Conv2d`` (padding 1) -> ``(B, H, W, C)``. Under autograd only ``x`` (and the small ``sce``) is
    kept for the backward."""
    return _CorrectedDepthwiseConv.apply(x, sce, norm.weight, norm.bias, norm.eps, conv.weight, conv.bias)
