"""Export a folded backbone or a task model to ONNX or to a ``torch.export`` program, checked against PyTorch.

The graph is traced for one input size. Everything that depends only on the weights and that size (the resized
FVE/SCE, the decay filters ``exp(-k·t·ω²)``, the DCT bases) is a constant subgraph, which ONNX Runtime folds when it
loads the model: the inference folding of the official ``infer_init``. ``torch.export`` programs are not
constant-folded when run, so for ``.pt2`` the model is folded before tracing: the resized FVE/SCE and every block's
decay filter are computed once and stored in the program as constants. The DCTs use the matmul form (plain GEMMs,
portable to every runtime). The exported graph takes inputs of exactly that size; export once per deployment size.

The export is written to a temporary file, run and compared with PyTorch, and only renamed onto the output when the
difference is within the tolerance; an existing output is replaced only with ``overwrite``.

ONNX files name their inputs (``image``; ``before`` and ``after`` for change detection) and output (``logits``;
``features`` for a backbone), take any batch size (checked with ONNX Runtime at two batch sizes), and carry what a
deployment needs to feed them as ``metadata_props`` (strings; lists and numbers JSON-encoded): ``model``,
``input_size`` ``[H, W]``, ``bands``, per-band ``mean`` and ``std`` (of a task checkpoint: the training statistics)
and ``classes``. ``.pt2`` programs hold the same metadata as the extra file ``rsvheat.json``
(``torch.export.load(path, extra_files={"rsvheat.json": ""})``).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsvheat.files import check_output, refuse_inputs_as_outputs, write_atomic, write_bytes_to
from rsvheat.inference.scene import MIN_TILE
from rsvheat.models.rsvheat import RSVHeat, fold_backbones
from rsvheat.models.tasks import ChangeDetectionModel
from rsvheat.operators.heat import HeatConduction
from rsvheat.progress import Steps

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
            if isinstance(self.model, ChangeDetectionModel) and torch.compiler.is_compiling():
                return _change_by_slices(self.model, inputs[0], inputs[1])
            return self.model(inputs[0], inputs[1])
        return self.model(inputs[0])


def _change_by_slices(model: ChangeDetectionModel, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``ChangeDetectionModel.forward`` on ``(B, C, H, W)`` tensors, splitting the two dates' features by slicing at
    ``B`` instead of ``chunk(2)``: the tracer cannot prove that ``chunk(2)`` of ``2·B`` rows is ``B`` for every ``B``
    and would fix the batch size. Only traced; the export is checked against the model's own forward."""
    batch = before.shape[0]
    features = model.backbone.forward_intermediates(torch.cat([before, after]), intermediates_only=True)
    merged = []
    for merge, f in zip(model.merge, features, strict=True):
        a, b = f[:batch], f[batch:]
        merged.append(merge(torch.cat([(a - b).abs(), a + b], dim=1)))
    return model.head(merged, tuple(before.shape[-2:]))


def input_names(kind: str) -> list[str]:
    """The exported graph's input names: ``["image"]``, or ``["before", "after"]`` for ``kind="change"``."""
    return ["before", "after"] if kind == "change" else ["image"]


def prepare(model: nn.Module, kind: str) -> nn.Module:
    """``model`` (an :class:`RSVHeat` backbone/classifier, a ``SegmentationModel`` or a ``ChangeDetectionModel``) in
    eval mode, its backbones folded (:func:`fold_backbones`), with matmul DCTs, wrapped to take positional tensors."""
    model = fold_backbones(model)
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
    output_name: str = "logits",
    metadata: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write ``out`` (``.onnx``: ONNX through the dynamo exporter, checked with ONNX Runtime; ``.pt2``:
    ``torch.export`` program of the folded model, reloaded and run) and return ``{"path", "max_abs_diff",
    "reference_max_abs", "relative_diff"}``, the largest difference between the exported model's and PyTorch's outputs
    on ``inputs`` (``(B, C, H, W)`` tensors; two for ``kind="change"``), absolute and relative to the largest output.

    ONNX: inputs named by :func:`input_names`, the output ``output_name``, the batch dimension dynamic (traced and
    checked at batch ``max(B, 2)`` too: a batch of 1 would be specialised by the tracer; a model whose batch cannot
    be dynamic is exported at ``B`` with a warning); ``metadata`` (values other than strings JSON-encoded) is stored
    as the model's ``metadata_props``, or in a ``.pt2`` as the extra file ``rsvheat.json``.

    Raises ``FileExistsError`` if ``out`` exists and not ``overwrite`` (before exporting), and
    :class:`ExportMismatchError` if the relative difference exceeds ``tolerance``: ``out`` is then left untouched.
    ``progress``: a bar over the steps (reference, trace, save, check) on stderr when it is a terminal.
    """
    out = _check_output(out, overwrite)
    if tolerance < 0:
        raise ValueError(f"the tolerance must be >= 0, got {tolerance}")
    adapter = prepare(model, kind)
    inputs = tuple(inputs)
    names = input_names(kind)
    if len(names) != len(inputs):
        raise ValueError(f"a {kind!r} model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    props = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    # tracing and checking a base model take minutes on a CPU: say which step runs
    steps = Steps(4, f"export {out.name}", progress)
    steps.next("reference forward")
    with torch.no_grad():
        # folded mode: this forward folds every heat stage for the size it sees (RSVHeat.fold)
        reference = adapter(*inputs)
    result: dict = {"path": out, "reference_max_abs": float(reference.abs().max())}

    def check(exported: torch.Tensor, expected: torch.Tensor = reference) -> None:
        diff = float((exported - expected).abs().max())
        scale = result["reference_max_abs"]
        result.update(max_abs_diff=max(diff, result.get("max_abs_diff", 0.0)))
        result.update(relative_diff=result["max_abs_diff"] / scale if scale > 0 else result["max_abs_diff"])
        if not result["relative_diff"] <= tolerance:  # also catches NaN
            raise ExportMismatchError(
                f"{out}: the exported model differs from PyTorch by {result['relative_diff']:.2e} relative to its "
                f"largest output (max |difference| {diff:.2e}, outputs up to {scale:.2f}), above the tolerance "
                f"{tolerance:g}; nothing written"
            )

    # Traced with autograd on: the graph holds the plain (out-of-place) ops, so the program also runs where
    # gradients are enabled.
    if out.suffix == ".onnx":
        batch = inputs[0].shape[0]
        # torch.export specialises a dimension whose example size is 1: trace the dynamic batch at >= 2
        traced = inputs if batch >= 2 else tuple(torch.cat([x, torch.randn_like(x)]) for x in inputs)
        with torch.no_grad():
            traced_reference = reference if traced is inputs else adapter(*traced)

        def write(tmp: Path) -> None:
            import onnxruntime

            # unfolded: the filters, computed from parameters only, are a constant subgraph that ONNX Runtime folds
            # at load (the file stays as small as the weights)
            for module in adapter.modules():
                if isinstance(module, RSVHeat):
                    module.unfold()

            steps.next("trace (dynamo exporter)")

            def onnx_program(sample: tuple[torch.Tensor, ...], dynamic: bool):
                # forward(*inputs): dynamic_shapes has one entry, the tuple of the inputs' specs
                batch_dim = torch.export.Dim("batch")  # one dimension shared by both dates of a change pair
                shapes = (tuple({0: batch_dim} for _ in sample),) if dynamic else None
                with warnings.catch_warnings():
                    # the second date's batch axis is the first's: the exporter says it names it once
                    warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
                    return torch.onnx.export(
                        adapter,
                        sample,
                        dynamo=True,
                        opset_version=opset,
                        verbose=False,
                        input_names=names,
                        output_names=[output_name],
                        dynamic_shapes=shapes,
                    )

            checks: tuple[tuple[tuple[torch.Tensor, ...], torch.Tensor], ...]  # (inputs, PyTorch's output) to compare
            try:
                program, checks = onnx_program(traced, True), ((inputs, reference), (traced, traced_reference))
            except Exception as err:  # noqa: BLE001 - the exporter raises many types; a fixed batch still works
                warnings.warn(
                    f"{out}: the batch size cannot be made dynamic for this model ({str(err).splitlines()[0]}); "
                    f"the export takes batches of {batch} only",
                    stacklevel=3,
                )
                program, checks = onnx_program(inputs, False), ((inputs, reference),)
            program.model.metadata_props.update(props)
            steps.next("save")
            program.save(str(tmp))
            steps.next("check with ONNX Runtime")
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            for sample, expected in checks:
                feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), sample, strict=True)}
                check(torch.from_numpy(np.asarray(session.run(None, feeds)[0])), expected)

    else:

        def write(tmp: Path) -> None:
            # folded by the reference forward: the program stores the resized FVE/SCE and filters as constants
            steps.next("trace (torch.export)")
            program = torch.export.export(adapter, inputs)
            steps.next("save")
            buffer = io.BytesIO()  # serialised in memory: torch's file writer aborts the process on a full disk
            torch.export.save(program, buffer, extra_files={"rsvheat.json": json.dumps(props)})
            write_bytes_to(tmp, buffer.getbuffer())
            steps.next("reload and check")
            with torch.no_grad():
                check(torch.export.load(str(tmp)).module()(*inputs))

    # checked before it is renamed: a failed export or check leaves neither the output nor a temporary file
    with steps:
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
    progress: bool = True,
) -> dict:
    """``rsvheat export``: a task checkpoint (classification: backbone + head; segmentation: logits; change
    detection: change logits from two inputs), or a backbone ``variant`` (with optional ``weights``) giving its last
    stage's features; checked on random inputs of ``size`` (see :func:`export_model`). The export's metadata names the
    model, the input size and bands, and for a task checkpoint the training mean/std per band and the class names."""
    import rsvheat

    out = _check_output(out, overwrite)  # before loading anything
    if weights is not None:
        from rsvheat.models.weights import resolve_weights

        weights = resolve_weights(weights)  # a known name or an existing file, checked before anything is built
    # a weights name (a str once resolved) is no file that the output could overwrite
    sources = [p for p in (checkpoint, weights if isinstance(weights, Path) else None) if p is not None]
    refuse_inputs_as_outputs([out], sources)
    if not 1 <= len(size) <= 2 or min(size) < MIN_TILE:
        raise ValueError(f"--size takes H or H W, each at least {MIN_TILE} px, got {list(size)}")
    height, width = (size[0], size[0]) if len(size) == 1 else size[:2]
    if checkpoint is not None:
        from rsvheat.models.contract import load_task

        task, meta = load_task(checkpoint)
        if len(task.modalities) != 1:
            raise ValueError(f"export takes single-stem models; this one fuses {list(task.modalities)}")
        channels = next(iter(task.modalities.values()))
        if task.spec.export is None:
            raise ValueError(f"export does not handle {task.name} (Faster R-CNN: use torchvision's detection export)")
        model = task.model  # every task's network: the classifier, the segmenter, the siamese change model
        kind = task.spec.export
        modality, stats = next(iter(task.modalities)), meta.get("stats") or {}
        metadata = {
            "model": f"{task.name}({task.hparams.get('backbone')})",
            "checkpoint": Path(checkpoint).name,
            "bands": channels,
            "modality": modality,
        }
        band_stats = stats.get(modality) or (next(iter(stats.values())) if len(stats) == 1 else None)
        if band_stats:
            metadata.update(mean=list(band_stats["mean"]), std=list(band_stats["std"]))
        else:  # TorchGeo and TerraTorch keep the normalisation in their data modules
            metadata["normalisation"] = f"not stored in the {meta['task']} checkpoint: use its data module's"
        if meta.get("classes"):
            metadata["classes"] = list(meta["classes"])
        output_name = "logits"
    else:
        model = rsvheat.create_model(variant, num_classes=0, modalities={"optical": channels})
        if weights is not None:
            from rsvheat.models.weights import load_weights

            load_weights(model, weights)
        model, kind = _Features(model), "single"
        # a bare backbone's file holds no training statistics: say so rather than leave a reader guessing
        metadata = {
            "model": variant,
            "weights": (weights if isinstance(weights, str) else weights.name)
            if weights is not None
            else "random initialisation",
            "bands": channels,
            "normalisation": "not stored with a backbone: use the statistics of its pre-training data",
        }
        output_name = "features"
    metadata.update(input_size=[height, width], inputs=input_names(kind), output=output_name)
    inputs = [torch.randn(1, channels, height, width) for _ in input_names(kind)]
    return export_model(
        model,
        out,
        inputs,
        kind,
        overwrite=overwrite,
        tolerance=tolerance,
        output_name=output_name,
        metadata=metadata,
        progress=progress,
    )


class _Features(nn.Module):
    """A backbone as ``(B, C, H, W) -> (B, dims[-1], H/32, W/32)`` features (no head), foldable like the backbone."""

    def __init__(self, backbone: RSVHeat) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)
