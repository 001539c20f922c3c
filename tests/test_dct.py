import numpy as np
import pytest
import scipy.fft
import torch

from rsvheat.operators.dct import dct2d, dct_basis, idct2d

SIZES = [(1, 1), (7, 5), (8, 8), (13, 31), (56, 56), (33, 64)]


@pytest.mark.parametrize("impl", ["matmul", "fft"])
@pytest.mark.parametrize("size", SIZES)
def test_dct2d_matches_scipy_orthonormal_dct(size, impl):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(dct2d(x, impl=impl).numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(idct2d(torch.from_numpy(expected), impl=impl).numpy(), x.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["matmul", "fft"])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_float32(size, impl):
    x = torch.randn(4, *size)
    torch.testing.assert_close(idct2d(dct2d(x, impl=impl), impl=impl), x, rtol=1e-5, atol=1e-5)


def test_basis_is_orthonormal_and_cached():
    for n in (1, 2, 9, 64):
        d = dct_basis(n, dtype=torch.float64)
        torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64))
    assert dct_basis(17) is dct_basis(17)
    assert dct_basis(17, dtype=torch.float64) is not dct_basis(17)


def test_half_precision_input_is_transformed_in_float32():
    x = torch.randn(3, 24, 40)
    out = dct2d(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dct2d(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown DCT implementation 'cuda'"):
        dct2d(torch.randn(4, 4), impl="cuda")


@pytest.mark.parametrize("impl", ["matmul", "fft"])
def test_float32_input_stays_float32_under_autocast(impl):
    x = torch.randn(2, 3, 24, 40)
    reference = torch.from_numpy(scipy.fft.dctn(x.double().numpy(), type=2, norm="ortho", axes=(-2, -1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dct2d(x, impl)
        back = idct2d(out, impl)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
