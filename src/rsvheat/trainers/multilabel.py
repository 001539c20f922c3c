"""Multi-label scene classification (BigEarthNet): RS-vHeat + its classifier head, one independent sigmoid per class."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MultilabelAccuracy,
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)
from torchmetrics.utilities.data import dim_zero_cat

from rsvheat.files import write_atomic
from rsvheat.models.contract import MULTILABEL
from rsvheat.trainers.base import TaskModule


class MultiLabelBCE(torch.nn.Module):
    """Binary cross-entropy on logits, averaged over images and classes; ``pos_weight`` ``(K,)`` scales each class's
    positive term (``n_negative / n_positive`` balances a rare class). The weight is a training choice, not part of
    the model: it is kept out of the checkpoint's weights (a non-persistent buffer), so a model trained with one
    loads into a task configured without."""

    pos_weight: torch.Tensor | None  # the buffer

    def __init__(self, pos_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        weight = None if pos_weight is None else torch.tensor(list(pos_weight), dtype=torch.float32)
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, K)``, ``target`` ``(B, K)`` 0/1 (any dtype) -> scalar loss."""
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=self.pos_weight)


class PresentClassAP(MultilabelAveragePrecision):
    """Average precision per class ``(K,)`` (``reduce=False``) or its mean over the classes (``reduce=True``, the
    macro mAP), with ``nan`` for, and the mean taken without, a class that has no positive among the evaluated images.

    torchmetrics' own macro average scores such a class as AP 0 (and warns): a validation or test set that lacks a
    rare class would pull the mean down by a class that cannot be scored, and the checkpoint ranking with it. Where
    every class occurs (BigEarthNet's test split) both agree."""

    def __init__(self, num_labels: int, reduce: bool = True) -> None:
        super().__init__(num_labels, average="none")
        self.reduce = reduce

    # torchmetrics' own compute overrides the precision-recall curve's tuple the same way (it ignores the error too)
    def compute(self) -> torch.Tensor:  # type: ignore[override]
        with warnings.catch_warnings():  # the classes it warns about are left out below
            warnings.filterwarnings("ignore", message="No positive samples found in target")
            per_class = super().compute()
        present = dim_zero_cat(self.target).sum(0) > 0
        per_class = torch.where(present, per_class, torch.full_like(per_class, math.nan))
        return per_class.nanmean() if self.reduce else per_class


class MultiLabelClassificationTask(TaskModule):
    """
    Args:
        num_classes, classes: the classes (``classes`` optional); ``rsvheat fit`` passes the data module's.
        pos_weight: per-class weight of the positive term of the loss (``K`` values), e.g. ``n_neg / n_pos``.
        threshold: a class is predicted present when its probability is at least this (metrics and predictions).
        **kwargs: backbone, optimisation and freezing options of :class:`TaskModule`.

    Batches: ``{"image": (B, C, H, W), "label": (B, K) int64 multi-hot}`` (TorchGeo's ``BigEarthNet`` form; predict:
    ``image`` and ``path``).

    Metrics (torchmetrics, multi-label, on the sigmoid of the logits): ``OA`` (accuracy over every image × class
    decision, micro), ``AA`` (per-class accuracy averaged), ``F1_micro``, ``F1_macro``, ``mAP_macro`` (average
    precision per class, averaged over the classes that have a positive among the evaluated images: see
    :class:`PresentClassAP`; threshold-free, the checkpoint's ranking metric) and ``mAP_micro`` (one precision-recall
    curve over all image × class decisions). ``F1_macro`` averages over all ``K`` classes (torchmetrics' convention:
    a class without positives or predictions scores F1 0). ``AA`` equals ``OA`` here, since every class is judged on
    every image; it is kept for the names TorchGeo's tasks log. The test run also writes per-class precision,
    recall, F1, AP and positives (CSV) into the log folder; prediction writes every image's per-class probabilities
    and its predicted labels (CSV).
    """

    monitor = ("val/mAP_macro", "max")
    spec = MULTILABEL

    def __init__(
        self,
        num_classes: int,
        classes: list[str] | None = None,
        pos_weight: list[float] | None = None,
        threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if pos_weight is not None and len(pos_weight) != num_classes:
            raise ValueError(f"pos_weight has {len(pos_weight)} values, one per class is needed ({num_classes})")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        super().__init__(**kwargs)
        self.predictions: list[dict] = []

    @property
    def model(self) -> torch.nn.Module:
        """The backbone with its classifier head: ``(B, C, H, W)`` -> logits ``(B, K)`` (weights named
        ``backbone.*``, as the single-label task's)."""
        return self.backbone

    def configure_losses(self) -> None:
        self.criterion = MultiLabelBCE(self.hparams.pos_weight)

    def configure_metrics(self) -> MetricCollection:
        k, t = self.hparams.num_classes, self.hparams.threshold
        self.per_class = MetricCollection(
            {
                "precision": MultilabelPrecision(k, t, average="none"),
                "recall": MultilabelRecall(k, t, average="none"),
                "F1": MultilabelF1Score(k, t, average="none"),
                "AP": PresentClassAP(k, reduce=False),
            }
        )
        return MetricCollection(
            {
                "OA": MultilabelAccuracy(k, t, average="micro"),
                "AA": MultilabelAccuracy(k, t, average="macro"),
                "F1_micro": MultilabelF1Score(k, t, average="micro"),
                "F1_macro": MultilabelF1Score(k, t, average="macro"),
                "mAP_macro": PresentClassAP(k),
                "mAP_micro": MultilabelAveragePrecision(k, average="micro"),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, K)``."""
        return self.model(x)

    def _labels(self, batch: dict) -> torch.Tensor:
        """The batch's ``(B, K)`` multi-hot labels as int64, checked against the class count."""
        labels = batch["label"]
        if labels.ndim != 2 or labels.shape[1] != self.hparams.num_classes:
            raise ValueError(
                f"multi-label batches carry (B, {self.hparams.num_classes}) multi-hot labels, got shape "
                f"{tuple(labels.shape)} (a single-label data module?)"
            )
        return labels.long()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = self._labels(batch)
        logits = self(batch["image"])
        loss = self.criterion(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labels = self._labels(batch)
        logits = self(batch["image"])
        self.log("val/loss", self.criterion(logits, labels), batch_size=len(labels))
        # probabilities, not logits: torchmetrics takes inputs that all lie in [0, 1] for probabilities already
        self.val_metrics.update(logits.sigmoid(), labels)
        self.log_dict(self.val_metrics, prog_bar=True, batch_size=len(labels))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        labels = self._labels(batch)
        logits = self(batch["image"])
        probs = logits.sigmoid()
        self.test_metrics.update(probs, labels)
        self.per_class.update(probs, labels)
        self.log_dict(self.test_metrics, batch_size=len(labels))

    def on_test_epoch_start(self) -> None:
        self.support = torch.zeros(self.hparams.num_classes, dtype=torch.long, device=self.device)

    def on_test_batch_end(self, outputs, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.support += self._labels(batch).sum(0)

    def on_test_epoch_end(self) -> None:
        values = {name: value.cpu() for name, value in self.per_class.compute().items()}
        self.per_class.reset()
        support = self.support.cpu()
        if self.trainer.world_size > 1:  # the metrics are synchronised; the counts are summed here
            support = cast(torch.Tensor, self.all_gather(self.support)).sum(0).cpu()  # a tensor gathers as a tensor
        if self.trainer.is_global_zero:
            self.write_test_report(values, support, self.run_dir())

    def write_test_report(self, values: dict[str, torch.Tensor], support: torch.Tensor, out: Path) -> None:
        """``per_class_metrics.csv``: per class its precision, recall, F1, AP (``(K,)`` each; AP empty for a class
        without positives) and its count of positive images."""
        names = self.class_names()
        columns = ("precision", "recall", "F1", "AP")

        def table(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["class", *columns, "positives"])
                for i, name in enumerate(names):
                    cells = [float(values[c][i]) for c in columns]
                    # a class without positives has no AP: an empty cell, not a number that looks like a score
                    writer.writerow([name, *("" if math.isnan(v) else f"{v:.4f}" for v in cells), int(support[i])])

        write_atomic(out / "per_class_metrics.csv", table)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Per image ``{"path", "probabilities": [K floats]}`` (sigmoid of the logits)."""
        images = batch["image"]
        size = self.hparams.img_size
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False)
        probs = self(images).sigmoid()
        return [{"path": p, "probabilities": row} for p, row in zip(batch["path"], probs.tolist(), strict=True)]

    def write_batch(self, prediction, out_dir: Path) -> None:
        self.predictions += prediction

    def finish_writing(self, out_dir: Path) -> None:
        """``multilabel.csv``: path, the labels at or above ``threshold`` (``;``-separated), one probability column
        per class."""
        names, threshold = self.class_names(), self.hparams.threshold

        def table(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "labels", *names])
                for p in self.predictions:
                    present = [n for n, v in zip(names, p["probabilities"], strict=True) if v >= threshold]
                    writer.writerow([p["path"], ";".join(present), *(f"{v:.4f}" for v in p["probabilities"])])

        write_atomic(Path(out_dir) / "multilabel.csv", table)
        self.predictions = []
