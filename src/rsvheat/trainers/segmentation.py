"""Semantic segmentation: RS-vHeat + UPerNet, optical or optical+SAR (fused in the stems), sliding-window evaluation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from rsvheat.data.io import write_raster
from rsvheat.datamodules.base import TaskDataModule, prediction_path
from rsvheat.files import write_atomic
from rsvheat.models.sliding import sliding_window
from rsvheat.models.tasks import SegmentationModel
from rsvheat.trainers.base import TaskModule


def split_inputs(batch: dict, modalities: dict[str, int]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The model input of a batch: the optical tensor, or ``{modality: tensor}`` when several stems are fused."""
    present = [m for m in modalities if m in batch]
    if len(present) != len(modalities):
        raise ValueError(f"the model fuses {list(modalities)}, the batch has {[k for k in batch if k in modalities]}")
    return batch[present[0]] if len(present) == 1 else {m: batch[m] for m in present}


class SegmentationTask(TaskModule):
    """
    Args:
        num_classes, classes: class ids ``0..num_classes-1`` (names optional); ``ignore_index`` pixels are not scored.
        backbone, weights, modalities, img_size, drop_path_rate: see :func:`build_backbone`; ``modalities`` with two
            entries (``{"optical": 3, "sar": 1}``) fuses co-registered optical and SAR images in the stems.
        decoder_width, decoder_norm: UPerNet channels and norm (``"batchnorm"``, or ``"groupnorm"``-free
            alternatives SMP accepts such as ``"layernorm"`` for batches of 1).
        eval_tile, eval_overlap: sliding window for validation/test/predict on images larger than ``eval_tile``.

    Metrics (ignore index excluded): mIoU, mF1 (the papers' metrics), OA; the test run writes per-class IoU/F1 (CSV).
    """

    monitor = ("val/mIoU", "max")

    def __init__(
        self,
        num_classes: int,
        classes: list[str] | None = None,
        backbone: str = "rsvheat_base",
        weights: str | None = None,
        modalities: dict[str, int] | None = None,
        img_size: int = 512,
        drop_path_rate: float = 0.2,
        ignore_index: int = 255,
        decoder_width: int = 256,
        decoder_norm: str = "batchnorm",
        eval_tile: int = 512,
        eval_overlap: int = 128,
        freeze_backbone: bool = False,
        freeze_stages: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        layer_decay: float = 0.9,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"num_classes is {num_classes} but {len(classes)} class names are given")
        if not 0 <= eval_overlap < eval_tile:
            raise ValueError(f"eval_overlap ({eval_overlap}) must be in [0, eval_tile) with eval_tile = {eval_tile}")
        self.save_hyperparameters()
        self.init_backbone()
        self.model = SegmentationModel(self.backbone, num_classes, decoder_width, decoder_norm)
        kw = dict(num_classes=num_classes, ignore_index=ignore_index)
        metrics = MetricCollection(
            {
                "mIoU": MulticlassJaccardIndex(**kw),
                "mF1": MulticlassF1Score(**kw),
                "OA": MulticlassAccuracy(average="micro", **kw),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.per_class = MetricCollection(
            {"IoU": MulticlassJaccardIndex(average="none", **kw), "F1": MulticlassF1Score(average="none", **kw)}
        )

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            return
        source = dm.describe() if isinstance(dm, TaskDataModule) else type(dm).__name__
        if getattr(dm, "num_classes", self.hparams.num_classes) != self.hparams.num_classes:
            raise ValueError(
                f"class list mismatch: the model has num_classes={self.hparams.num_classes}, the data module "
                f"({source}) {dm.num_classes}"
            )
        if hasattr(dm, "channels") and dm.channels != dict(self.modalities):
            raise ValueError(f"the data ({source}) gives bands {dm.channels}, the model's stems take {self.modalities}")

    def forward(self, x) -> torch.Tensor:
        return self.model(x)

    def predict_logits(self, x) -> torch.Tensor:
        """Whole-image logits ``(B, K, H, W)``, by sliding window when the image exceeds ``eval_tile``."""
        h = self.hparams
        return sliding_window(self.model, x, tile=h.eval_tile, overlap=h.eval_overlap)

    def training_step(self, batch, batch_idx):
        logits = self(split_inputs(batch, self.modalities))
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=self.hparams.ignore_index)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["mask"]))
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, prefix: str) -> torch.Tensor:
        logits = self.predict_logits(split_inputs(batch, self.modalities))
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=self.hparams.ignore_index)
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
