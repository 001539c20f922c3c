"""Parameter and FLOP counts in the two conventions papers use.

* ``train``: the model as trained. Parameters: every parameter (FVE, SCE, ``to_k``). FLOPs: one forward in train mode,
  including ``to_k`` applied to each FVE.
* ``folded`` (the vHeat / RS-vHeat papers' convention, their ``infer_init`` + fvcore): ``to_k`` and FVE replaced by the
  precomputed filters ``k_exp`` (``H x W x C`` per block, counted as parameters), and the SCE not counted (the official
  code deletes it; it is still needed to run, see ``params_folded_runtime``).

FLOPs are multiply-accumulates ("G" in the papers = GMACs), measured with :mod:`torch.utils.flop_counter` for every
matmul and convolution. ``fvcore=True`` adds what fvcore, the counter the papers used, also counts: 5 per LayerNorm
element, 1 per pooled element, and half an operation per element of the HCO's filter multiply (fvcore's einsum rule).

Training memory is counted by :func:`activation_bytes`: what a forward pass leaves alive for its backward pass, and
kernels by :func:`kernel_counts`: the compute kernels a call launches in eager PyTorch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.multiprocessing.reductions import StorageWeakRef
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from rsvheat.models.rsvheat import HeatBlock, HeatStage, RSVHeat
from rsvheat.operators.heat import HeatConduction


@dataclass
class Counts:
    variant: str
    img_size: tuple[int, int]
    params_train: int
    params_folded: int
    params_folded_runtime: int
    gmacs_train: float
    gmacs_folded: float

    def as_dict(self) -> dict:
        return asdict(self)


def _stage_sizes(model: RSVHeat, img_size: tuple[int, int]) -> list[tuple[int, int]]:
    h, w = -(-img_size[0] // 4), -(-img_size[1] // 4)
    sizes = []
    for i in range(len(model.stages)):
        if i > 0:
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def _stages(model: RSVHeat) -> list[HeatStage]:
    return [cast(HeatStage, s) for s in model.stages]  # the ModuleList holds HeatStages


def count_params(model: RSVHeat, img_size: tuple[int, int]) -> dict[str, int]:
    """``train``, ``folded`` (paper convention) and ``folded_runtime`` (folded + the SCE a running model keeps)."""
    train = sum(p.numel() for p in model.parameters())
    stages = _stages(model)
    to_k = sum(p.numel() for s in stages for b in s.blocks for p in cast(HeatBlock, b).hco.to_k.parameters())
    fve = sum(s.freq_embed.numel() for s in stages)
    sce = sum(s.heat_capacity.numel() for s in stages if s.heat_capacity is not None)
    stage_sizes = list(zip(stages, _stage_sizes(model, img_size), strict=True))
    k_exp = sum(h * w * s.dim * len(s.blocks) for s, (h, w) in stage_sizes)
    sce_at_size = sum(h * w * s.dim for s, (h, w) in stage_sizes) if model.use_sce else 0
    folded = train - to_k - fve - sce + k_exp
    return dict(train=train, folded=folded, folded_runtime=folded + sce_at_size)


def _fvcore_extras():
    def layer_norm(input_shape, *args, out_shape=None, **kwargs):
        return 2 * 5 * math.prod(input_shape)  # the counter halves totals into MACs below

    def mean(input_shape, *args, out_shape=None, **kwargs):
        return 2 * math.prod(input_shape)

    return {torch.ops.aten.native_layer_norm: layer_norm, torch.ops.aten.mean: mean}


def count_gmacs(
    model: RSVHeat,
    img_size: tuple[int, int],
    folded: bool,
    fvcore: bool = True,
    in_chans: int | None = None,
    modality: str | None = None,
) -> float:
    """GMACs of one forward of a batch of 1 at ``img_size``; ``folded`` precomputes the filters first (not counted)."""
    modality = modality or model.default_modality
    x = torch.zeros(1, in_chans or model.modalities[modality], *img_size, device=next(model.parameters()).device)
    was_training = model.training
    filter_elems = []
    hooks = (
        [
            m.register_forward_hook(lambda mod, args, out: filter_elems.append(out.numel()))
            for m in model.modules()
            if isinstance(m, HeatConduction)
        ]
        if fvcore
        else []
    )
    try:
        if folded:
            model.fold(img_size)
        else:
            model.train()
        counter = FlopCounterMode(display=False, custom_mapping=_fvcore_extras() if fvcore else None)
        with counter, torch.no_grad() if folded else torch.enable_grad():
            model(x, modality=modality)
        total = counter.get_total_flops() / 2 + sum(filter_elems) / 2
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total / 1e9


def count(model: RSVHeat, img_size: int | tuple[int, int], variant: str = "", fvcore: bool = True) -> Counts:
    """Parameters and GMACs of ``model`` at ``img_size`` in both conventions."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    size = (height, width)
    params = count_params(model, size)
    return Counts(
        variant=variant,
        img_size=size,
        params_train=params["train"],
        params_folded=params["folded"],
        params_folded_runtime=params["folded_runtime"],
        gmacs_train=count_gmacs(model, size, folded=False, fvcore=fvcore),
        gmacs_folded=count_gmacs(model, size, folded=True, fvcore=fvcore),
    )


class _NewStorages(TorchDispatchMode):
    """Weak references to every storage an operator allocates while the mode is on (not the views and in-place
    results that alias its inputs: a weight's transpose is not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            address = storage.data_ptr()
            known = self.storages.get(address)
            # an address is reused once its storage is freed
            if address not in inputs and (known is None or known[0].expired()):
                self.storages[address] = (StorageWeakRef(storage), storage.nbytes())
        return out


def activation_bytes(forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``forward`` (a forward pass under autograd) and count the activation memory it leaves for the backward
    pass: the bytes of every storage created during the call that is still alive when it returns, except the
    returned tensor's own. That is what autograd saved (and what gradient checkpointing keeps to recompute from), the
    memory a training step holds at its peak besides weights, gradients and optimizer state, counted exactly and
    independently of the allocator (peak RSS on CPU also holds freed-but-cached heap and short-lived temporaries).

    Returns ``(output, bytes)``. Runs every operator through a Python dispatch mode: slower than a plain forward."""
    mode = _NewStorages()
    with mode:
        out = forward()
    own = {t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
    held = sum(n for ptr, (ref, n) in mode.storages.items() if ptr not in own and not ref.expired())
    return out, held


#: ATen operators that launch no kernel of their own: views (found from their schemas), allocations without a fill,
#: queries, and operators that return their input when there is nothing to do (else they call the ones that work).
_NO_KERNEL = frozenset(
    {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided", "resize_"}
    | {"resolve_conj", "resolve_neg", "_unsafe_view", "lift_fresh", "detach", "promote_types", "result_type"}
    | {"size", "stride", "dropout", "contiguous", "to", "reshape", "flatten", "alias", "type_as"}
)
#: Library calls counted as one kernel whatever the CPU backend runs inside them (its addmm copies the bias into the
#: output before the GEMM, its sum zero-fills the output first; a GPU's do not).
_ONE_KERNEL = frozenset(
    {"addmm", "mm", "bmm", "baddbmm", "convolution", "convolution_backward", "native_layer_norm", "_softmax"}
    | {"native_layer_norm_backward", "_softmax_backward_data", "sum", "mean"}
)


def _moves_data(name: str) -> bool:
    if name in _NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, name, None)
    return packet is None or not any(getattr(packet, overload).is_view for overload in packet.overloads())


def kernel_counts(run: Callable[[], object]) -> Counter[str]:
    """The compute kernels one call of ``run`` launches in eager PyTorch, by ATen operator name.

    Counted with the profiler on the ATen call tree: the outermost operators that move data (views and bare
    allocations are free) and do not call others that do, with GEMMs, convolutions, LayerNorm, softmax and sums
    counted as one each. The count depends on the model and the input size, hardly on the device: on a GPU each is
    about one kernel launch. Run ``run`` once before, so that one-time work (caches, folds) is not counted."""
    counts: Counter[str] = Counter()

    def count(event: FunctionEvent) -> int:
        name = event.name.removeprefix("aten::")
        is_aten = event.name.startswith("aten::")
        if is_aten and name in _ONE_KERNEL:
            counts[name] += 1
            return 1
        inner = sum(count(child) for child in event.cpu_children)
        if inner == 0 and is_aten and _moves_data(name):
            counts[name] += 1
            return 1
        return inner

    with profile(activities=[ProfilerActivity.CPU], acc_events=True) as prof:
        run()
    for event in prof.events():
        if event.cpu_parent is None:
            count(event)
    return counts
