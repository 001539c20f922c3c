import numpy as np
import pytest
import scipy.fft
import torch

from rsvheat.operators.heat import (
    HeatConduction,
    frequency_sq,
    heat_conduct,
    heat_conduct_reference,
    heat_filter,
)


def numpy_hco(x: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """The HCO straight from the equation, in float64 numpy: (B, H, W, C) field, (H, W, C) k*t."""
    h, w = x.shape[1:3]
    omega2 = (np.arange(h)[:, None] * np.pi / h) ** 2 + (np.arange(w)[None, :] * np.pi / w) ** 2
    spectrum = scipy.fft.dctn(x, type=2, norm="ortho", axes=(1, 2))
    return scipy.fft.idctn(spectrum * np.exp(-kt * omega2[:, :, None]), type=2, norm="ortho", axes=(1, 2))


@pytest.mark.parametrize("impl", ["matmul", "fft"])
@pytest.mark.parametrize("shape", [(2, 7, 7, 3), (1, 14, 9, 8), (3, 28, 28, 5), (1, 1, 6, 2)])
def test_heat_conduct_matches_float64_equation(shape, impl):
    x = torch.randn(*shape)
    kt = torch.rand(*shape[1:]) * 3
    expected = numpy_hco(x.double().numpy(), kt.double().numpy())
    out = heat_conduct(x, heat_filter(kt), impl=impl)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(heat_conduct_reference(x, kt).numpy(), expected, rtol=1e-10, atol=1e-10)


def test_zero_diffusivity_is_identity():
    x = torch.randn(2, 11, 13, 4)
    torch.testing.assert_close(heat_conduct(x, heat_filter(torch.zeros(11, 13, 4))), x, rtol=1e-5, atol=1e-5)


def test_dc_is_never_attenuated_and_energy_never_grows():
    x = torch.randn(2, 16, 12, 6, dtype=torch.float64)
    kt = torch.rand(16, 12, 6, dtype=torch.float64) * 10
    out = heat_conduct(x, heat_filter(kt))
    # DC of an orthonormal DCT is the (scaled) mean: heat is conserved under adiabatic borders.
    torch.testing.assert_close(out.mean(dim=(1, 2)), x.mean(dim=(1, 2)))
    assert heat_filter(kt)[0, 0].eq(1).all()
    assert (out.pow(2).sum(dim=(1, 2)) <= x.pow(2).sum(dim=(1, 2)) + 1e-9).all()
    # Long times converge to the constant field (pure DC).
    flat = heat_conduct(x, heat_filter(torch.full_like(kt, 1e4)))
    torch.testing.assert_close(flat, x.mean(dim=(1, 2), keepdim=True).expand_as(x))


def test_gradients_through_the_operator_match_finite_differences():
    x = torch.randn(1, 5, 6, 2, dtype=torch.float64, requires_grad=True)
    kt = torch.rand(5, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, k: heat_conduct(a, heat_filter(k)), (x, kt))


@pytest.mark.parametrize("impl", ["matmul", "fft"])
def test_gradients_wrt_field_and_filter_match_finite_differences(impl):
    # odd sides on both axes (the FFT DCT's even/odd reordering), float64: exactness guard of every DCT path
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64, requires_grad=True)
    filt = torch.rand(5, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, f: heat_conduct(a, f, impl), (x, filt))
    assert torch.autograd.gradgradcheck(lambda a, f: heat_conduct(a, f, impl), (x, filt))


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


def test_bfloat16_field_both_spectral_paths_against_float64():
    """A bf16 field: the exact path (float32 transforms, one rounding at the end) is as close to the float64
    equation as bf16 output can be; the bf16 GEMMs add a few roundings, still within a few bf16 epsilons."""
    x = torch.randn(2, 24, 20, 16).bfloat16()
    kt = torch.rand(24, 20, 16) * 3
    expected = torch.from_numpy(numpy_hco(x.double().numpy(), kt.double().numpy()))
    exact = heat_conduct(x, heat_filter(kt), precision="float32")
    fast = heat_conduct(x, heat_filter(kt), precision="bfloat16")
    assert exact.dtype == fast.dtype == torch.bfloat16
    eps = 2.0**-8
    assert relative_rms(exact, expected) < 0.6 * eps  # the final rounding only
    assert relative_rms(fast, expected) < 2.5 * eps
    assert relative_rms(fast, expected) > relative_rms(exact, expected)  # the paths differ: the switch is honoured
    with pytest.raises(ValueError, match="unknown spectral precision 'half'"):
        heat_conduct(x, heat_filter(kt), precision="half")  # type: ignore[arg-type]


def test_bf16_spectral_gemms_cost_no_more_than_bf16_elsewhere():
    """Under bf16 autocast, a model's features move away from its float64 twin; the bf16 spectral GEMMs add at most
    as much again as every other bf16 layer already costs (measured per stage in benchmarks/results/dct.md)."""
    from rsvheat.models.rsvheat import RSVHeat

    torch.manual_seed(0)
    model = RSVHeat(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), img_size=64, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.double()(x.double())
        model.float()
        errors = {}
        for precision in ("float32", "bfloat16"):
            model.set_spectral_precision(precision)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errors[precision] = relative_rms(model(x), reference)
    assert errors["float32"] > 1e-3  # bf16 is really in use elsewhere
    assert errors["bfloat16"] < 2 * errors["float32"]


def test_spectral_dtype_per_device():
    """``auto``: bf16 GEMMs for bf16 fields on CUDA, float32 on CPUs (slower there without bf16 instructions);
    float16 and the FFT path always in float32; float32/float64 fields untouched."""
    from rsvheat.operators.heat import spectral_dtype

    bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    assert spectral_dtype(bf16, "cuda") == bf16
    assert spectral_dtype(bf16, "cpu") == f32
    assert spectral_dtype(bf16, "cpu", "bfloat16") == bf16
    assert spectral_dtype(bf16, "cuda", "float32") == f32
    assert spectral_dtype(bf16, "cuda", impl="fft") == f32
    assert spectral_dtype(f16, "cuda", "bfloat16") == f32
    assert spectral_dtype(f64, "cuda", "bfloat16") == f64
    assert spectral_dtype(f32, "cpu", "bfloat16") == f32
    from rsvheat.models.rsvheat import RSVHeat

    with pytest.raises(ValueError, match="unknown spectral precision 'half'"):  # refused when the model is built
        RSVHeat(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), spectral_precision="half")  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [1, 3])
def test_training_pass_makes_no_copies_of_the_filter(batch):
    # the filter's gradient at batch 1 is the product itself, not a sum over a batch of one; no negation of kt or of
    # its gradient (the negated frequency grid is cached)
    from rsvheat.models.counting import kernel_counts

    kt = torch.rand(6, 5, 4, requires_grad=True)
    x = torch.randn(batch, 6, 5, 4, requires_grad=True)

    def step():
        heat_conduct(x, heat_filter(kt), "matmul").sum().backward()

    step()
    counts = kernel_counts(step)
    assert counts["neg"] == 0 and counts["exp_"] == 1, counts
    assert counts["sum"] == (0 if batch == 1 else 1) + 1  # (+ the loss)
    torch.testing.assert_close(heat_filter(kt), torch.exp(-kt * frequency_sq(6, 5)[:, :, None]), rtol=0, atol=0)


def test_filter_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"heat filter has shape \(4, 4, 3\), expected \(5, 5, 3\)"):
        heat_conduct(torch.randn(1, 5, 5, 3), torch.ones(4, 4, 3))


def test_module_uses_a_folded_filter_only_when_folded():
    hco = HeatConduction(8)
    fve = torch.randn(6, 7, 8)
    x = torch.randn(2, 6, 7, 8)
    hco.eval()
    with torch.no_grad():
        computed = hco.decay_filter(fve)
        assert hco.folded_filter is None  # eval mode alone folds nothing
        folded = hco.fold(fve)
        assert hco.decay_filter(fve) is folded
        torch.testing.assert_close(folded, computed, rtol=0, atol=0)
        assert hco.decay_filter(fve[:3]) is not folded  # another size: computed
    hco.unfold()
    out = hco(x, fve)
    out.sum().backward()  # gradients reach to_k
    assert hco.to_k.weight.grad is not None and hco.to_k.weight.grad.abs().sum() > 0
    hco.fold(fve)
    hco.train()  # about to change the weights: the fold is dropped
    assert hco.folded_filter is None


def test_sce_is_required_when_built_with_it():
    with pytest.raises(ValueError, match="spatial correction embedding"):
        HeatConduction(4, use_sce=True)(torch.randn(1, 3, 3, 4), torch.zeros(3, 3, 4))
