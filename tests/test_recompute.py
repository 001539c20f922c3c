"""Exactness of the training path's autograd functions: recompute-in-backward (rsvheat.operators.recompute) and the
strided convolutions' GEMM backward (rsvheat.operators.conv).

The reference is the plain autograd composition of the same torch ops, written out here: the functions are patched
out of the model for the reference pass, so every parameter's gradient is compared with what autograd gives.
"""

import pytest
import torch
import torch.nn.functional as F

import rsvheat.models.rsvheat as rsvheat_module
import rsvheat.operators.conv as conv_module
import rsvheat.operators.heat as heat_module
from rsvheat.operators.conv import StridedConv3x3
from rsvheat.operators.recompute import (
    _CorrectedDepthwiseConv,
    _GatedProjection,
    _LayerNormLinear,
    corrected_depthwise_conv,
    gated_projection,
    gelu_linear,
    layer_norm_linear,
)
from tests.conftest import micro_model


def _plain_gelu_linear(h, weight, bias=None):
    return F.linear(F.gelu(h), weight, bias)


def _plain_layer_norm_linear(x, norm, linear):
    return linear(norm(x))


def _plain_gated_projection(c, z, norm, proj):
    return proj(norm(c) * F.silu(z))


def _plain_corrected_depthwise_conv(x, sce, norm, conv):
    return conv(norm(F.relu(x + sce)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _plain_strided_conv3x3(x, conv):
    return F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, stride=2, padding=1).permute(0, 2, 3, 1)


def _use_plain_autograd(monkeypatch):
    """Patch the training path's functions out of the model: the reference pass is the plain autograd composition."""
    monkeypatch.setattr(StridedConv3x3, "gemm_backward_on_cpu", False)
    monkeypatch.setattr(rsvheat_module, "gelu_linear", _plain_gelu_linear)
    monkeypatch.setattr(rsvheat_module, "layer_norm_linear", _plain_layer_norm_linear)
    monkeypatch.setattr(heat_module, "gated_projection", _plain_gated_projection)
    monkeypatch.setattr(heat_module, "corrected_depthwise_conv", _plain_corrected_depthwise_conv)


def test_gelu_linear_gradcheck_float64():
    h = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gelu_linear, (h, w, b))
    assert torch.autograd.gradcheck(gelu_linear, (h, w))  # no bias


def test_layer_norm_linear_gradcheck_float64():
    norm = torch.nn.LayerNorm(7).double()
    linear = torch.nn.Linear(7, 4).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    params = (norm.weight, norm.bias, linear.weight, linear.bias)

    def fn(x, nw, nb, w, b):
        return _LayerNormLinear.apply(x, nw, nb, norm.eps, w, b)

    assert torch.autograd.gradcheck(fn, (x, *params))
    torch.testing.assert_close(layer_norm_linear(x, norm, linear), _plain_layer_norm_linear(x, norm, linear))


def test_gated_projection_gradcheck_float64():
    norm = torch.nn.LayerNorm(6).double()
    proj = torch.nn.Linear(6, 5).double()
    with torch.no_grad():  # not the identity affine: its gradient terms must show
        norm.weight.normal_()
        norm.bias.normal_()
    c = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    params = (norm.weight, norm.bias, proj.weight, proj.bias)

    def fn(c, z, nw, nb, pw, pb):
        return _GatedProjection.apply(c, z, nw, nb, norm.eps, pw, pb)

    assert torch.autograd.gradcheck(fn, (c, z, *params))
    # and the module-level wrapper equals the plain composition
    torch.testing.assert_close(gated_projection(c, z, norm, proj), _plain_gated_projection(c, z, norm, proj))


def test_corrected_depthwise_conv_gradcheck_float64():
    norm = torch.nn.LayerNorm(4).double()
    conv = torch.nn.Conv2d(4, 4, kernel_size=3, padding=1, groups=4).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # odd sides; the ReLU's kink is avoided by finite differences' step at these magnitudes
    x = torch.randn(2, 5, 7, 4, dtype=torch.float64, requires_grad=True)
    sce = torch.randn(5, 7, 4, dtype=torch.float64, requires_grad=True)
    params = (norm.weight, norm.bias, conv.weight, conv.bias)

    def fn(x, sce, nw, nb, cw, cb):
        return _CorrectedDepthwiseConv.apply(x, sce, nw, nb, norm.eps, cw, cb)

    assert torch.autograd.gradcheck(fn, (x, sce, *params))
    torch.testing.assert_close(
        corrected_depthwise_conv(x, sce, norm, conv), _plain_corrected_depthwise_conv(x, sce, norm, conv)
    )


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 10), (9, 5)])
def test_strided_conv_gemm_backward_gradcheck_float64(monkeypatch, size, bias, chunked):
    # odd and even sides, down to one pixel: every tap's border handling, against the library convolution; chunked:
    # one output row at a time, so that neighbouring chunks add into the same input rows
    if chunked:
        monkeypatch.setattr(conv_module, "_CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    conv = StridedConv3x3(3, 4, bias=bias).double()
    x = torch.randn(2, *size, 3, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    assert type(out.grad_fn).__name__ == "_StridedConvGemmBackwardBackward"
    torch.testing.assert_close(out, _plain_strided_conv3x3(x, conv), rtol=0, atol=1e-13)
    params = tuple(conv.parameters())
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *params), grad)
    expected = torch.autograd.grad(_plain_strided_conv3x3(x, conv), (x, *params), grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)
    assert got[1].is_contiguous()  # the weight gradient in the weight's layout
    assert torch.autograd.gradcheck(conv, (x,))


def test_strided_conv_weight_gradient_of_an_input_without_gradient():
    # the stem's first convolution: the image needs no gradient, the weights do
    torch.manual_seed(0)
    conv = StridedConv3x3(3, 5).double()
    x = torch.randn(1, 9, 8, 3, dtype=torch.float64)
    grad = torch.randn(1, 5, 4, 5, dtype=torch.float64)
    got = torch.autograd.grad(conv(x), tuple(conv.parameters()), grad)
    expected = torch.autograd.grad(_plain_strided_conv3x3(x, conv), tuple(conv.parameters()), grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)


def test_strided_conv_takes_the_library_convolution_elsewhere(monkeypatch):
    conv = StridedConv3x3(3, 4)
    x = torch.randn(1, 6, 6, 3, requires_grad=True)

    def backward_of(x):
        return type(conv(x).grad_fn).__name__

    assert backward_of(x) == "_StridedConvGemmBackwardBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backward_of(x) != "_StridedConvGemmBackwardBackward"
    conv.eval()
    assert backward_of(x) != "_StridedConvGemmBackwardBackward"
    conv.train()
    monkeypatch.setattr(conv, "gemm_backward_on_cpu", False)
    assert backward_of(x) != "_StridedConvGemmBackwardBackward"


def test_partial_gradients_only_for_what_requires_them():
    norm, proj = torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    proj.requires_grad_(False)
    c = torch.randn(2, 5, 4, requires_grad=True)
    z = torch.randn(2, 5, 4)  # no gradient wanted
    gated_projection(c, z, norm, proj).sum().backward()
    assert c.grad is not None and norm.weight.grad is not None and proj.weight.grad is None


def _grads(model, x, seed):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same drop-path masks in every pass
    model(x).square().mean().backward()
    return {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("post_norm", [True, False])
def test_every_gradient_equals_plain_autograd_float64(monkeypatch, post_norm, checkpointing):
    # odd sides, drop path on, float64: every parameter's gradient and the input's, against the plain composition
    torch.manual_seed(0)
    model = micro_model(post_norm=post_norm, layer_scale=1e-5 if post_norm else None, drop_path_rate=0.2).double()
    with torch.no_grad():  # non-trivial LN affines in the gate, the SCE correction, the MLP's
        for block in (b for s in model.stages for b in s.blocks):
            for norm in (block.hco.out_norm, block.hco.sce_norm, block.norm2):
                norm.weight.normal_()
                norm.bias.normal_()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 45, 39, dtype=torch.float64)
    fused = _grads(model, x, seed=1)
    _use_plain_autograd(monkeypatch)
    plain = _grads(model, x, seed=1)
    assert all(g is not None for g in plain.values())
    for name, expected in plain.items():
        torch.testing.assert_close(fused[name], expected, rtol=1e-10, atol=1e-13, msg=name)


def test_autocast_bf16_training_step_matches_plain_autocast(monkeypatch):
    torch.manual_seed(0)
    model = micro_model()
    x = torch.randn(2, 3, 37, 41)

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    fused = grads()
    _use_plain_autograd(monkeypatch)
    plain = grads()
    for name, expected in plain.items():
        got = fused[name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        # bf16 GEMMs on both sides; the gate's LN runs in float32 here, autocast's CPU LN in bf16
        scale = expected.abs().max().clamp_min(1e-12)
        assert (got - expected).abs().max() / scale < 5e-2, name


def test_inference_keeps_its_paths():
    # without autograd no recompute function is recorded (and none is needed): outputs equal under no_grad and grad
    model = micro_model().eval()
    x = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        expected = model(x)
    out = model(x)
    assert out.grad_fn is not None
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)
