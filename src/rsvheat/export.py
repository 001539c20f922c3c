"""Export a folded backbone or a task model to ONNX or to a ``torch.export`` program, checked against PyTorch.

The graph is traced for one input size. Everything that depends only on the weights and that size (the resized
FVE/SCE, the decay filters ``exp(-k·t·ω²)``, the DCT bases) is a constant subgraph, which ONNX Runtime folds when it
loads the model: the inference folding of the official ``infer_init``. The DCTs use the matmul form (plain GEMMs,
portable to every runtime). The exported graph takes inputs of exactly that size; export once per deployment size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsvheat.operators.heat import HeatConduction


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


def export_model(
    model: nn.Module,
    out: str | Path,
    inputs: Sequence[torch.Tensor],
    kind: str = "single",
    opset: int = 18,
) -> dict:
    """Write ``out`` (``.onnx``: ONNX through the dynamo exporter, checked with ONNX Runtime; ``.pt2``:
    ``torch.export`` program, reloaded and run) and return ``{"path", "max_abs_diff", "reference_max_abs"}``,
    the largest difference between the exported model's and PyTorch's outputs on ``inputs``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    adapter = prepare(model, kind)
    inputs = tuple(inputs)
    with torch.no_grad():
        reference = adapter(*inputs)
    # Traced with autograd on: the graph holds the plain (out-of-place) ops, so the program also runs where
    # gradients are enabled; the filters, computed from parameters only, are constant-folded by the exporters.
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    if out.suffix == ".onnx":
        import onnxruntime

        torch.onnx.export(adapter, inputs, dynamo=True, opset_version=opset, verbose=False).save(str(tmp))
        tmp.replace(out)
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs, strict=True)}
        exported = torch.from_numpy(np.asarray(session.run(None, feeds)[0]))
    elif out.suffix == ".pt2":
        torch.export.save(torch.export.export(adapter, inputs), str(tmp))
        tmp.replace(out)
        with torch.no_grad():
            exported = torch.export.load(str(out)).module()(*inputs)
    else:
        raise ValueError(f"export to .onnx or .pt2, got {out.name}")
    return {
        "path": out,
        "max_abs_diff": float((exported - reference).abs().max()),
        "reference_max_abs": float(reference.abs().max()),
    }


def export_checkpoint(
    out: str | Path,
    size: Sequence[int],
    checkpoint: str | Path | None = None,
    variant: str = "rsvheat_tiny",
    weights: str | Path | None = None,
    channels: int = 3,
) -> dict:
    """``rsvheat export``: a task checkpoint (classification: backbone + head; segmentation: logits; change
    detection: change logits from two inputs), or a backbone ``variant`` (with optional ``weights``) giving its last
    stage's features; checked on random inputs of ``size``."""
    import rsvheat

    height, width = (size[0], size[0]) if len(size) == 1 else size[:2]
    if checkpoint is not None:
        from rsvheat.inference.tasks import load_task
        from rsvheat.trainers import ChangeDetectionTask, ClassificationTask, SegmentationTask

        task, _ = load_task(checkpoint)
        if len(task.modalities) != 1:
            raise ValueError(f"export takes single-stem models; this one fuses {list(task.modalities)}")
        channels = next(iter(task.modalities.values()))
        if isinstance(task, ClassificationTask):
            model, kind, count = task.backbone, "single", 1
        elif isinstance(task, SegmentationTask):
            model, kind, count = task.model, "single", 1
        elif isinstance(task, ChangeDetectionTask):
            model, kind, count = task.model, "change", 2
        else:
            raise ValueError(
                f"export does not handle {type(task).__name__} (Faster R-CNN: use torchvision's detection export)"
            )
    else:
        model = rsvheat.create_model(variant, num_classes=0, modalities={"optical": channels})
        if weights is not None:
            rsvheat.load_checkpoint(model, weights)
        model, kind, count = _Features(model), "single", 1
    inputs = [torch.randn(1, channels, height, width) for _ in range(count)]
    return export_model(model, out, inputs, kind)


class _Features(nn.Module):
    """A backbone as ``(B, C, H, W) -> (B, dims[-1], H/32, W/32)`` features (no head), foldable like the backbone."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)
