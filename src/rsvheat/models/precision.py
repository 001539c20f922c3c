"""Numeric precision of a forward pass: ``"fp32"`` (the default) or ``"bf16"`` (autocast).

Under ``"bf16"`` the GEMMs and convolutions run in bfloat16 through ``torch.autocast`` on the tensors' device type
(``cpu`` or ``cuda``, the same code for both); the spectral transforms of the heat operator stay in float32 (it
switches autocast off around them, :func:`rsvheat.operators.dct.autocast_off`), since their sums over a whole feature
map need float32's mantissa. Training uses Lightning's ``--trainer.precision bf16-mixed``, which is the same autocast.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
#: the choices of every ``--precision`` option
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def check_precision(precision: str) -> Precision:
    """``precision`` itself when it is one of :data:`PRECISIONS`; otherwise a ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision  # type: ignore[return-value]


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context a forward pass at ``precision`` runs in on ``device``: nothing for ``"fp32"``, bfloat16 autocast
    of ``device``'s type for ``"bf16"``. Outputs may then be bfloat16: callers that keep numbers cast them with
    ``.float()``."""
    if check_precision(precision) == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
