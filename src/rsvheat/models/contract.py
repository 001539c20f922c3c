"""The task contract: what each downstream task is, for everything that serves a trained model.

A :class:`TaskSpec` says which rasters a task reads (its input roles), what it writes (its output kind), whether and how
it exports, and how its network is built from the hyper-parameters a checkpoint saved. The Lightning task modules
(:mod:`rsvheat.trainers`) build their networks through their spec, and inference, export and batch mapping read the
spec of a checkpoint instead of asking which task class it is: serving a model imports no Lightning.

Adding a task: its network in :mod:`rsvheat.models.tasks`, a spec here (registered in :data:`SPECS`), a data module,
a trainer whose ``spec`` is that spec, a config (see the developer guide).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rsvheat
from rsvheat.models.checkpoint import CheckpointError, read_torch_file
from rsvheat.models.foreign import foreign_network
from rsvheat.models.rsvheat import RSVHeat, fold_backbones
from rsvheat.models.tasks import ChangeDetectionModel, SegmentationModel, faster_rcnn
from rsvheat.models.weights import load_weights

#: what a task writes: a class label per image (``label``), several (``labels``), a class map (``class_map``), a
#: change map (``change_map``), boxes (``boxes``)
OUTPUTS = ("label", "labels", "class_map", "change_map", "boxes")


def build_backbone(
    variant: str,
    modalities: Mapping[str, int],
    img_size: int,
    weights: str | Path | None = None,
    drop_path_rate: float = 0.1,
    num_classes: int = 0,
    encoder_kwargs: Mapping | None = None,
) -> RSVHeat:
    """An RS-vHeat backbone for a task: stems for ``modalities``, FVE/SCE stored at ``img_size`` (the task resolution;
    weights made at another resolution are resized bilinearly), loaded from ``weights``: a file (rsvheat
    ``.safetensors``, an ``rsvheat pretrain`` encoder, or an official vHeat/RS-vHeat ``.pth``; see
    :func:`~rsvheat.models.checkpoint.load_checkpoint`) or the name of the official vHeat ImageNet-1k weights
    (``vheat_tiny``, ``vheat_small``, ``vheat_base``: downloaded once through timm; see
    :mod:`rsvheat.models.weights`)."""
    model = rsvheat.create_model(
        variant,
        modalities=dict(modalities),
        img_size=img_size,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        **dict(encoder_kwargs or {}),
    )
    if weights:
        load_weights(model, weights)
    return model


def _single(modalities: Mapping[str, int]) -> dict[str, str]:
    only = next(iter(modalities))
    return {only: only}


def _per_stem(modalities: Mapping[str, int]) -> dict[str, str]:
    return {name: name for name in modalities}


def _two_dates(modalities: Mapping[str, int]) -> dict[str, str]:
    only = next(iter(modalities))
    return {"before": only, "after": only}


def _classifier(backbone: RSVHeat, h: Mapping[str, Any]) -> nn.Module:
    return backbone  # the backbone carries the classifier head


def _segmenter(backbone: RSVHeat, h: Mapping[str, Any]) -> nn.Module:
    return SegmentationModel(backbone, h["num_classes"], h["decoder_width"], h["decoder_norm"])


def _change_detector(backbone: RSVHeat, h: Mapping[str, Any]) -> nn.Module:
    return ChangeDetectionModel(backbone, h["decoder_width"], h["decoder_norm"])


def _detector(backbone: RSVHeat, h: Mapping[str, Any]) -> nn.Module:
    return faster_rcnn(
        backbone,
        h["num_classes"],
        h["min_size"],
        h["max_size"],
        h["box_detections_per_img"],
        h["box_score_thresh"],
        **dict(h.get("detector_kwargs") or {}),
    )


def _class_probabilities(network: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    x = next(iter(inputs.values())) if len(inputs) == 1 else dict(inputs)
    return network(x).softmax(1)


def _change_probability(network: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return network(inputs["before"], inputs["after"]).sigmoid()


@dataclass(frozen=True)
class TaskSpec:
    """One task's contract.

    Attributes:
        name: the task's short name (``segmentation``), recorded in its checkpoints.
        task: the Lightning module that trains it, as checkpoints name it (``module.QualName``; imported by nobody
            here).
        output: what it writes, one of :data:`OUTPUTS`.
        roles: ``modalities -> {input role: modality}``: the rasters it reads, in order (one per stem, the two dates,
            one image).
        network: ``(backbone, hyper-parameters) -> nn.Module``: the network it trains and serves.
        classifier_head: the backbone carries a classifier of ``num_classes`` (classification); otherwise none.
        weights_prefix: where the network's weights sit in the task module's state dict.
        export: ``"single"`` (one input), ``"change"`` (two dates) or ``None`` (no ONNX/torch.export program).
        dense: ``(network, {role: (B, C, h, w)}) -> (B, K, h, w)`` probabilities, for the tasks that map scenes
            densely (``class_map``, ``change_map``); ``None`` otherwise.
    """

    name: str
    task: str
    output: str
    roles: Callable[[Mapping[str, int]], dict[str, str]]
    network: Callable[[RSVHeat, Mapping[str, Any]], nn.Module]
    classifier_head: bool = False
    weights_prefix: str = "model."
    export: str | None = "single"
    dense: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None

    def build(self, h: Mapping[str, Any], weights: str | Path | None = None) -> tuple[RSVHeat, nn.Module]:
        """The backbone and the task network from hyper-parameters ``h`` (a trainer's ``hparams``), the backbone
        started from ``weights`` (``None``: random initialisation)."""
        backbone = build_backbone(
            h["backbone"],
            modalities_of(h),
            h["img_size"],
            weights,
            h["drop_path_rate"],
            h["num_classes"] if self.classifier_head else 0,
            h.get("encoder_kwargs"),
        )
        return backbone, self.network(backbone, h)

    @property
    def class_name(self) -> str:
        """The training class's name, for messages: ``SegmentationTask``."""
        return self.task.rsplit(".", 1)[-1]


def modalities_of(h: Mapping[str, Any]) -> dict[str, int]:
    """The stems of a task's hyper-parameters (``{"optical": 3}`` unless configured)."""
    return dict(h.get("modalities") or {"optical": 3})


_TRAINERS = "rsvheat.trainers"
CLASSIFICATION = TaskSpec(
    "classification",
    f"{_TRAINERS}.classification.ClassificationTask",
    "label",
    _single,
    _classifier,
    classifier_head=True,
    weights_prefix="backbone.",
)
MULTILABEL = TaskSpec(
    "multilabel",
    f"{_TRAINERS}.multilabel.MultiLabelClassificationTask",
    "labels",
    _single,
    _classifier,
    classifier_head=True,
    weights_prefix="backbone.",
)
SEGMENTATION = TaskSpec(
    "segmentation", f"{_TRAINERS}.segmentation.SegmentationTask", "class_map", _per_stem, _segmenter,
    dense=_class_probabilities,
)  # fmt: skip
CHANGE_DETECTION = TaskSpec(
    "change_detection", f"{_TRAINERS}.change.ChangeDetectionTask", "change_map", _two_dates, _change_detector,
    export="change", dense=_change_probability,
)  # fmt: skip
DETECTION = TaskSpec(
    "detection", f"{_TRAINERS}.detection.DetectionTask", "boxes", _single, _detector, export=None
)  # fmt: skip

#: every task, by name
SPECS: dict[str, TaskSpec] = {
    s.name: s for s in (CLASSIFICATION, MULTILABEL, SEGMENTATION, CHANGE_DETECTION, DETECTION)
}


@dataclass
class ServedTask:
    """A trained task ready to serve, without its training machinery: ``model`` (the network, in eval mode) on
    ``backbone``, the ``hparams`` it was built from, and its ``spec``."""

    spec: TaskSpec
    model: nn.Module
    backbone: RSVHeat
    hparams: dict[str, Any]

    @property
    def modalities(self) -> dict[str, int]:
        return modalities_of(self.hparams)

    @property
    def name(self) -> str:
        """For messages: ``SegmentationTask``."""
        return self.spec.class_name


def spec_of(meta: Mapping[str, Any]) -> TaskSpec | None:
    """The spec a checkpoint's ``rsvheat`` entry names: by ``spec`` (its short name), or by ``task`` (the class path
    that every checkpoint records, the only one before specs were recorded)."""
    if meta.get("spec") in SPECS:
        return SPECS[meta["spec"]]
    return next((s for s in SPECS.values() if s.task == meta.get("task")), None)


def load_task(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[ServedTask, dict]:
    """The task of a ``rsvheat fit`` checkpoint in eval mode on ``device``, and its ``rsvheat`` metadata (task, spec,
    normalisation statistics, class names). The network is rebuilt from the stored hyper-parameters through the
    task's spec, without reading the original ``weights`` and without Lightning.

    A TorchGeo or TerraTorch classification or segmentation checkpoint on an RS-vHeat/vHeat backbone is served too
    (:mod:`rsvheat.models.foreign`); neither tool stores the normalisation, so ``normalisation`` (``(mean, std)``
    per band, or one value for every band: what its data module applied, e.g. ``([0], [255])``) gives the statistics
    (``None``: the caller must not need them). Given for a one-stem rsvheat checkpoint, it replaces the stored
    statistics.

    The file is untrusted: it is read with ``weights_only=True`` (tensors and plain data, never code), its task must
    be one of rsvheat's, TorchGeo's or TerraTorch's (no module named by the file is imported), and anything that does
    not fit raises :class:`CheckpointError` naming the file."""
    path = Path(checkpoint)
    ckpt = read_torch_file(path)
    found = foreign_network(ckpt, path) if isinstance(ckpt, dict) else None
    if found is not None:
        name, model, backbone, hparams = found
        served = ServedTask(SPECS[name], fold_backbones(model).to(device), backbone, hparams)
        foreign: dict[str, Any] = {"task": hparams["source"], "spec": name, "stats": None, "classes": None}
        return served, _with_normalisation(foreign, served, normalisation, path)
    meta = ckpt.get("rsvheat") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not meta.get("stats"):
        raise CheckpointError(
            f"{path} is not a task checkpoint of `rsvheat fit` with normalisation statistics (no 'rsvheat' entry), "
            "nor a TorchGeo/TerraTorch classification or segmentation checkpoint"
        )
    spec = spec_of(meta)
    if spec is None:
        known = ", ".join(s.task for s in SPECS.values())
        raise CheckpointError(f"{path}: unknown task {meta.get('task')!r} (rsvheat's tasks: {known})")
    hparams, state = ckpt.get("hyper_parameters"), ckpt.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: no hyper_parameters / state_dict in the checkpoint")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    weights = {k.removeprefix(spec.weights_prefix): v for k, v in state.items() if k.startswith(spec.weights_prefix)}
    try:
        backbone, model = spec.build(hparams)  # the state dict below holds the fine-tuned weights
        model.load_state_dict(weights)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} does not rebuild a {spec.class_name}: {str(err).strip().splitlines()[0]}"
        ) from err
    served = ServedTask(spec, fold_backbones(model).to(device), backbone, hparams)
    return served, _with_normalisation(meta, served, normalisation, path)


def _with_normalisation(
    meta: dict, task: ServedTask, normalisation: tuple[Sequence[float], Sequence[float]] | None, path: Path
) -> dict:
    if normalisation is None:
        return meta
    if len(task.modalities) != 1:
        raise ValueError(f"{path} has {len(task.modalities)} stems: one mean/std cannot normalise them all")
    ((modality, bands),) = task.modalities.items()
    stats = {}
    for name, values in zip(("mean", "std"), normalisation, strict=True):
        values = [float(v) for v in values]
        if len(values) not in (1, bands):
            raise ValueError(f"{path} takes {bands} bands: give one {name} or {bands}, not {len(values)}")
        if name == "std" and min(values) <= 0:
            raise ValueError(f"std must be positive, got {values}")
        stats[name] = values * bands if len(values) == 1 else values
    return {**meta, "stats": {modality: stats}}
