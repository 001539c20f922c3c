"""Semantic segmentation: RS-vHeat + UPerNet, optical or optical+SAR (fused in the stems), sliding-window evaluation."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from rsvheat.data.io import write_raster
from rsvheat.data.transforms import sample_keys
from rsvheat.datamodules.base import prediction_path
from rsvheat.files import write_atomic
from rsvheat.models.contract import SEGMENTATION
from rsvheat.models.sliding import sliding_window
from rsvheat.trainers.base import TaskModule, check_window


def split_inputs(batch: dict, modalities: dict[str, int]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The model input of a batch: the ``image`` tensor ``(B, C, H, W)``, or ``{modality: tensor}`` when several stems
    are fused, the optical one read from ``image`` and the others from their names (``sar``; see
    :func:`~rsvheat.data.transforms.sample_keys`)."""
    keys = sample_keys(modalities)
    missing = [key for key in keys.values() if key not in batch]
    if missing:
        raise ValueError(
            f"the model fuses {list(modalities)} (batch keys {list(keys.values())}), the batch has no {missing}"
        )
    return batch["image"] if len(keys) == 1 else {m: batch[key] for m, key in keys.items()}


class SegmentationTask(TaskModule):
    """
    Args:
        num_classes, classes: class ids ``0..num_classes-1`` (names optional); ``ignore_index`` pixels are not scored.
        decoder_width, decoder_norm: UPerNet channels and norm (``"batchnorm"``, or ``"groupnorm"``-free
            alternatives SMP accepts such as ``"layernorm"`` for batches of 1).
        eval_tile, eval_overlap: sliding window for validation/test/predict on images larger than ``eval_tile``.
        img_size, drop_path_rate, **kwargs: backbone, optimisation and freezing options of :class:`TaskModule`;
            ``modalities`` with two entries (``{"optical": 3, "sar": 1}``) fuses co-registered optical and SAR images
            in the stems.

    Batches: ``{"image": (B, C, H, W), ["sar": (B, C_s, H, W),] "mask": (B, H, W) int64}`` (TorchGeo's keys).

    Metrics (ignore index excluded): mIoU, mF1 (the papers' metrics), OA; the test run writes per-class IoU/F1 (CSV).
    """

    monitor = ("val/mIoU", "max")
    spec = SEGMENTATION

    def __init__(
        self,
        num_classes: int,
        classes: list[str] | None = None,
        ignore_index: int = 255,
        decoder_width: int = 256,
        decoder_norm: str = "batchnorm",
        eval_tile: int = 512,
        eval_overlap: int = 128,
        img_size: int = 512,
        drop_path_rate: float = 0.2,
        **kwargs: Any,
    ) -> None:
        check_window(eval_tile, eval_overlap)
        super().__init__(img_size=img_size, drop_path_rate=drop_path_rate, **kwargs)

    def configure_losses(self) -> None:
        self.criterion = torch.nn.CrossEntropyLoss(ignore_index=self.hparams.ignore_index)

    def configure_metrics(self) -> MetricCollection:
        kw = dict(num_classes=self.hparams.num_classes, ignore_index=self.hparams.ignore_index)
        self.per_class = MetricCollection(
            {"IoU": MulticlassJaccardIndex(average="none", **kw), "F1": MulticlassF1Score(average="none", **kw)}
        )
        return MetricCollection(
            {
                "mIoU": MulticlassJaccardIndex(**kw),
                "mF1": MulticlassF1Score(**kw),
                "OA": MulticlassAccuracy(average="micro", **kw),
            }
        )

    def forward(self, x) -> torch.Tensor:
        return self.model(x)

    def predict_logits(self, x) -> torch.Tensor:
        """Whole-image logits ``(B, K, H, W)``, by sliding window when the image exceeds ``eval_tile``."""
        h = self.hparams
        return sliding_window(self.model, x, tile=h.eval_tile, overlap=h.eval_overlap)

    def training_step(self, batch, batch_idx):
        logits = self(split_inputs(batch, self.modalities))
        loss = self.criterion(logits, batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["mask"]))
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, prefix: str) -> torch.Tensor:
        logits = self.predict_logits(split_inputs(batch, self.modalities))
        loss = self.criterion(logits, batch["mask"])
        metrics.update(logits.argmax(1), batch["mask"])
        self.log(f"{prefix}/loss", loss, batch_size=len(batch["mask"]))
        self.log_dict(metrics, prog_bar=prefix == "val", batch_size=len(batch["mask"]))
        return logits

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        logits = self._evaluate(batch, self.test_metrics, "test")
        self.per_class.update(logits.argmax(1), batch["mask"])

    def on_test_epoch_end(self) -> None:
        scores = {k: v.cpu().tolist() for k, v in self.per_class.compute().items()}
        self.per_class.reset()
        if not self.trainer.is_global_zero:
            return
        names = self.class_names()

        def table(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["class", "IoU", "F1"])
                for row in zip(names, scores["IoU"], scores["F1"], strict=True):
                    writer.writerow([row[0], f"{row[1]:.4f}", f"{row[2]:.4f}"])

        write_atomic(self.run_dir() / "per_class_scores.csv", table)

    def predict_step(self, batch, batch_idx):
        probs = self.predict_logits(split_inputs(batch, self.modalities)).softmax(1)
        return {"labels": probs.argmax(1).cpu(), "path": batch["path"], "name": batch["name"]}

    def write_batch(self, prediction, out_dir: Path) -> None:
        for labels, path, name in zip(prediction["labels"], prediction["path"], prediction["name"], strict=True):
            dtype = np.uint8 if self.hparams.num_classes <= 255 else np.uint16
            write_raster(prediction_path(out_dir, name, path), labels.numpy().astype(dtype), like=path)
