"""Export a folded backbone or a task model to ONNX or to a ``torch.export`` program, checked against PyTorch.

The graph is traced for one input size. Everything that depends only on the weights and that size (the resized
FVE/SCE, the decay filters ``exp(-k·t·ω²)``, the DCT bases) is a constant subgraph, which ONNX Runtime folds when it
loads the model: the inference folding of the official ``infer_init``. ``torch.export`` programs are not
constant-folded when run, so for ``.pt2`` the model is folded before tracing: the resized FVE/SCE and every block's
decay filter are computed once and stored in the program as constants. The DCTs use the matmul form (plain GEMMs,
portable to every runtime). The exported graph takes inputs of exactly that size; export once per deployment size.

The export is written to a temporary file, run and compared with PyTorch, and only renamed onto the output when the
difference is within the tolerance; an existing output is replaced only with ``overwrite``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsvheat.files import check_output, refuse_inputs_as_outputs, write_atomic
from rsvheat.inference.scene import MIN_TILE
from rsvheat.models.rsvheat import RSVHeat
from rsvheat.operators.heat import HeatConduction

#: Default largest accepted ``max |exported - PyTorch| / max |PyTorch|``.
TOLERANCE = 1e-3


class ExportMismatchError(ValueError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


class _Adapter(nn.Module):
    """Positional tensors in, one tensor out: what exporters and runtimes expect."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.kind == "change":
            return self.model(inputs[0], inputs[1])
        return self.model(inputs[0])


def prepare(model: nn.Module, kind: str) -> nn.Module:
    """``model`` (an :class:`RSVHeat` backbone/classifier, a ``SegmentationModel`` or a ``ChangeDetectionModel``) in
    eval mode with matmul DCTs, wrapped to take positional tensors."""
    model = model.eval()
    for module in model.modules():
        if isinstance(module, HeatConduction):
            module.dct_impl = "matmul"
    return _Adapter(model, kind).eval()


def _check_output(out: str | Path, overwrite: bool) -> Path:
    return check_output(out, overwrite, (".onnx", ".pt2"), "an export (ONNX or torch.export program)")


def export_model(
    model: nn.Module,
    out: str | Path,
    inputs: Sequence[torch.Tensor],
    kind: str = "single",
    opset: int = 18,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
) -> dict:
    """Write ``out`` (``.onnx``: ONNX through the dynamo exporter, checked with ONNX Runtime; ``.pt2``:
    ``torch.export`` program of the folded model, reloaded and run) and return ``{"path", "max_abs_diff",
    "reference_max_abs", "relative_diff"}``, the largest difference between the exported model's and PyTorch's outputs
    on ``inputs`` (``(B, C, H, W)`` tensors; two for ``kind="change"``), absolute and relative to the largest output.

    Raises ``FileExistsError`` if ``out`` exists and not ``overwrite`` (before exporting), and
    :class:`ExportMismatchError` if the relative difference exceeds ``tolerance``: ``out`` is then left untouched.
    """
    out = _check_output(out, overwrite)
    if tolerance < 0:
        raise ValueError(f"the tolerance must be >= 0, got {tolerance}")
    adapter = prepare(model, kind)
    inputs = tuple(inputs)
    with torch.no_grad():
        # eval mode without autograd: this forward also folds every heat stage for the size it sees (RSVHeat.fold)
        reference = adapter(*inputs)
    result: dict = {"path": out, "reference_max_abs": float(reference.abs().max())}

    def check(exported: torch.Tensor) -> None:
        diff = float((exported - reference).abs().max())
        scale = result["reference_max_abs"]
        result.update(max_abs_diff=diff, relative_diff=diff / scale if scale > 0 else diff)
        if not result["relative_diff"] <= tolerance:  # also catches NaN
            raise ExportMismatchError(
                f"{out}: the exported model differs from PyTorch by {result['relative_diff']:.2e} relative to its "
                f"largest output (max |difference| {diff:.2e}, outputs up to {scale:.2f}), above the tolerance "
                f"{tolerance:g}; nothing written"
            )

    # Traced with autograd on: the graph holds the plain (out-of-place) ops, so the program also runs where
    # gradients are enabled.
    if out.suffix == ".onnx":

        def write(tmp: Path) -> None:
            import onnxruntime

            # unfolded: the filters, computed from parameters only, are a constant subgraph that ONNX Runtime folds
            # at load (the file stays as small as the weights)
            for module in adapter.modules():
                if isinstance(module, RSVHeat):
                    module.clear_caches()
            torch.onnx.export(adapter, inputs, dynamo=True, opset_version=opset, verbose=False).save(str(tmp))
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs, strict=True)}
            check(torch.from_numpy(np.asarray(session.run(None, feeds)[0])))

    else:

        def write(tmp: Path) -> None:
            # folded by the reference forward: the program stores the resized FVE/SCE and filters as constants
            torch.export.save(torch.export.export(adapter, inputs), str(tmp))
            with torch.no_grad():
                check(torch.export.load(str(tmp)).module()(*inputs))

    # checked before it is renamed: a failed export or check leaves neither the output nor a temporary file
    write_atomic(out, write)
    return result


def export_checkpoint(
    out: str | Path,
    size: Sequence[int],
    checkpoint: str | Path | None = None,
    variant: str = "rsvheat_tiny",
    weights: str | Path | None = None,
    channels: int = 3,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
) -> dict:
    """``rsvheat export``: a task checkpoint (classification: backbone + head; segmentation: logits; change
    detection: change logits from two inputs), or a backbone ``variant`` (with optional ``weights``) giving its last
    stage's features; checked on random inputs of ``size`` (see :func:`export_model`)."""
    import rsvheat

    out = _check_output(out, overwrite)  # before loading anything
    refuse_inputs_as_outputs([out], [p for p in (checkpoint, weights) if p is not None])
    if not 1 <= len(size) <= 2 or min(size) < MIN_TILE:
        raise ValueError(f"--size takes H or H W, each at least {MIN_TILE} px, got {list(size)}")
    height, width = (size[0], size[0]) if len(size) == 1 else size[:2]
    if checkpoint is not None:
        from rsvheat.inference.tasks import load_task
        from rsvheat.trainers import ChangeDetectionTask, DetectionTask

        task, _ = load_task(checkpoint)
        if len(task.modalities) != 1:
            raise ValueError(f"export takes single-stem models; this one fuses {list(task.modalities)}")
        channels = next(iter(task.modalities.values()))
        if isinstance(task, DetectionTask):
            raise ValueError(
                f"export does not handle {type(task).__name__} (Faster R-CNN: use torchvision's detection export)"
            )
        model = task.model  # every task's network: the classifier, the segmenter, the siamese change model
        kind, count = ("change", 2) if isinstance(task, ChangeDetectionTask) else ("single", 1)
    else:
        model = rsvheat.create_model(variant, num_classes=0, modalities={"optical": channels})
        if weights is not None:
            rsvheat.load_checkpoint(model, weights)
        model, kind, count = _Features(model), "single", 1
    inputs = [torch.randn(1, channels, height, width) for _ in range(count)]
    return export_model(model, out, inputs, kind, overwrite=overwrite, tolerance=tolerance)


class _Features(nn.Module):
    """A backbone as ``(B, C, H, W) -> (B, dims[-1], H/32, W/32)`` features (no head), foldable like the backbone."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)
