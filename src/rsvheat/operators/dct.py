"""Orthonormal DCT-II / DCT-III (its inverse) along the spatial axes of image-like tensors.

Two implementations share one contract:

* ``matmul``: a dense ``(N, N)`` basis applied with batched GEMMs. Cost ``O(N)`` per element and axis, but it runs at
  GEMM speed, which wins for the map sizes a backbone sees (up to a few hundred pixels per side).
* ``fft``: Makhoul's reordering plus a complex FFT, ``O(log N)`` per element and axis. It wins for large images
  (the pre-training masking works on whole tiles) and is exact to float error as well.

Bases are cached per ``(size, device, dtype)`` because building them costs more than using them at small sizes.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import Literal

import torch

DctImpl = Literal["auto", "matmul", "fft"]

#: From this many coefficients per axis on, ``auto`` uses the FFT path for images ``(..., H, W)``. Measured with
#: ``benchmarks/bench_dct.py`` (2-core CPU: FFT 1.1x faster at 256, 1.7x at 512-1024, 2.7x at 2048).
FFT_MIN_SIZE = 256


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached for later autograd use: never an inference tensor
def _dct_basis_cached(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built in float64 so that float32/bfloat16 bases are correctly rounded, not accumulated rounding.
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    freq = torch.arange(n, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * freq * pos) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.to(device=device, dtype=dtype)


def dct_basis(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` of shape ``(n, n)``: ``D[k, x] = c_k cos(pi k (x + 1/2) / n)``.

    ``c_0 = sqrt(1/n)``, ``c_k = sqrt(2/n)``. ``D @ f`` is the DCT of ``f``; ``D.T @ F`` its inverse.
    """
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        return torch.empty(n, n, device=device, dtype=dtype)
    if torch.compiler.is_compiling():  # a constant of the graph: built once per compiled size, not cached here
        return _dct_basis_cached.__wrapped__(n, device, dtype)
    return _dct_basis_cached(n, device, dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision transforms lose too much (the DC term sums N values), so they run in float32.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _fft_dct_last(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Orthonormal DCT-II (or its inverse) along the last axis via Makhoul's N-point FFT."""
    n = x.shape[-1]
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))  # exp(-i pi k / 2n)
    scale = torch.full((n,), math.sqrt(2.0 / n), device=x.device, dtype=x.dtype)
    scale[0] = math.sqrt(1.0 / n)
    if not inverse:
        v = torch.cat([x[..., 0::2], x[..., 1::2].flip(-1)], dim=-1)
        return (torch.fft.fft(v, dim=-1) * twiddle).real * scale
    # Inverse: rebuild the half-spectrum V_k = conj(twiddle_k) (X_k - i X_{n-k}) / scale, then one inverse FFT.
    coeffs = x / scale
    shifted = torch.cat([torch.zeros_like(coeffs[..., :1]), coeffs[..., 1:].flip(-1)], dim=-1)
    spectrum = torch.complex(coeffs, -shifted) * twiddle.conj()
    v = torch.fft.ifft(spectrum, dim=-1).real
    out = torch.empty_like(v)
    half = (n + 1) // 2
    out[..., 0::2] = v[..., :half]
    out[..., 1::2] = v[..., half:].flip(-1)
    return out


def _transform_axis(x: torch.Tensor, dim: int, inverse: bool, impl: DctImpl) -> torch.Tensor:
    n = x.shape[dim]
    if impl == "auto":
        impl = "fft" if n >= FFT_MIN_SIZE else "matmul"
    if impl == "fft":
        return _fft_dct_last(x.movedim(dim, -1), inverse).movedim(-1, dim)
    if impl != "matmul":
        raise ValueError(f"unknown DCT implementation {impl!r}; expected 'auto', 'matmul' or 'fft'")
    basis = dct_basis(n, x.device, x.dtype)
    if dim in (-1, x.ndim - 1):
        return x @ (basis if inverse else basis.T)
    moved = x.movedim(dim, -2)
    return ((basis.T if inverse else basis) @ moved).movedim(-2, dim)


def autocast_off(x: torch.Tensor) -> AbstractContextManager:
    """Autocast switched off on ``x``'s device: under it the spectral GEMMs would run in bf16/fp16 whatever the
    input dtype. (The meta device used for FLOP counting has no autocast.)"""
    return torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else nullcontext()


def _transform_2d(x: torch.Tensor, inverse: bool, impl: DctImpl) -> torch.Tensor:
    dtype = x.dtype
    with autocast_off(x):
        x = x.to(_compute_dtype(x))
        return _transform_axis(_transform_axis(x, -1, inverse, impl), -2, inverse, impl).to(dtype)


def dct2d(x: torch.Tensor, impl: DctImpl = "auto") -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two axes of ``x``: ``(..., H, W)``, any H and W (no power-of-2 padding).

    Computed in float32 (or float64) even for half inputs and under autocast; returned in the input's dtype."""
    return _transform_2d(x, False, impl)


def idct2d(x: torch.Tensor, impl: DctImpl = "auto") -> torch.Tensor:
    """Inverse of :func:`dct2d` (orthonormal DCT-III) over the last two axes of ``x`` of shape ``(..., H, W)``."""
    return _transform_2d(x, True, impl)
