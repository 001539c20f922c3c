"""Operators: orthonormal DCT and the Heat Conduction Operator."""

from rsvheat.operators.dct import dct2d, dct_basis, idct2d
from rsvheat.operators.heat import HeatConduction, frequency_sq, heat_conduct, heat_conduct_reference, heat_filter

__all__ = [
    "HeatConduction",
    "dct2d",
    "dct_basis",
    "frequency_sq",
    "heat_conduct",
    "heat_conduct_reference",
    "heat_filter",
    "idct2d",
]
