"""Numeric precision of a forward pass: ``"fp32"`` (the default) or ``"bf16"`` (autocast).

Under ``"bf16"`` the GEMMs and convolutions run in bfloat16 through ``torch.autocast`` on the tensors' device type
(``cpu`` or ``cuda``, the same code for both); the spectral transforms of the heat operator stay in float32 (it
switches autocast off around them, :func:`rsvheat.operators.dct.autocast_off`), since their sums over a whole feature
map need float32's mantissa. Training uses Lightning's ``--trainer.precision bf16-mixed``, which is the same autocast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]
#: the choices of every ``--precision`` option
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def compile_in_place(
    module: nn.Module,
    backend: str | bool = "inductor",
    dynamic: bool | None = None,
    frozen: bool = False,
    fullgraph: bool = False,
) -> nn.Module:
    """``module``'s forward run through ``torch.compile`` from now on, in place (its ``forward`` replaced, so that
    state-dict keys, hooks and ``isinstance`` are unchanged), with ``backend`` (``True``: inductor); ``False`` leaves
    it eager. Graphs are built at the first forward of each input shape (tile and batch sizes: keep them fixed).
    ``dynamic`` is ``torch.compile``'s: ``False`` for serving, where the shapes are few and fixed, so that a shape
    this process compiled before (in training, say) never turns the graphs symbolic (measured: a 5x slower capture
    of the scene map's tiles). ``frozen``, for inference that never changes the weights (inductor only): the weights
    become constants of the graphs (inductor's freezing), folded into the kernels and pre-packed for the GEMMs and
    convolutions, at the cost of a second copy of them; on an AVX2 CPU it turned compiled RS-vHeat from slower than
    eager into faster (``docs/efficiency.md``). ``fullgraph``: a graph break is an error. Returns ``module``.

    (``nn.Module.compile``, which compiles the module's call instead of its forward, traces nothing on torch 2.11.)"""
    if backend is False:
        return module
    name = "inductor" if backend is True else backend
    compiled = torch.compile(module.forward, backend=name, dynamic=dynamic, fullgraph=fullgraph)
    forward = compiled
    if frozen and name == "inductor":

        def forward(*args, **kwargs):
            # Dynamo reads the freezing flag from the global config while it traces (torch.compile's `options` come
            # too late for it): set it for this module's calls only, not for the rest of the process.
            with torch._inductor.config.patch(freezing=True):
                return compiled(*args, **kwargs)

    module.forward = forward
    return module


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


@contextmanager
def low_precision_weights(model: nn.Module, precision: str) -> Iterator[nn.Module]:
    """While open, ``model``'s linear and convolution weights and biases are held in bfloat16 (for ``"bf16"``;
    ``"fp32"`` changes nothing), so that the forward passes under :func:`autocast` inside do not cast every weight
    again on every call. (Autocast's own weight cache is off under ``torch.inference_mode`` and is emptied whenever
    the autocast region is left, while the models call the same weights many times per pass: the MLP in row chunks,
    the tiles of a scene; on RS-vHeat-B at 1024² those casts were a sixth of the bf16 forward's time.) The results are
    those of autocast, which rounds the same weights to bfloat16 at every call. On exit the float32 tensors are put
    back as they were. For inference: no gradient flows to the rounded copies."""
    if check_precision(precision) == "fp32":
        yield model
        return
    kept = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                for param in (module.weight, module.bias):
                    if param is not None and param.dtype == torch.float32:
                        kept.append((param, param.data))
                        param.data = param.data.to(torch.bfloat16)
    try:
        yield model
    finally:
        for param, data in kept:
            param.data = data
        from rsvheat.models.rsvheat import HeatStage

        for module in model.modules():
            if isinstance(module, HeatStage):
                module.drop_folds()  # folded from the rounded weights: fold again from the float32 ones
