"""Change detection: siamese RS-vHeat on the two dates, multi-scale feature differences, UPerNet, one change logit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex, BinaryPrecision, BinaryRecall

from rsvheat.data.io import write_raster
from rsvheat.datamodules.base import prediction_path
from rsvheat.models.sliding import sliding_window
from rsvheat.models.tasks import ChangeDetectionModel
from rsvheat.trainers.base import TaskModule


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice of the change class: robust to the rarity of changed pixels (~5 % in LEVIR-CD)."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1).float()
    return (1 - (2 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)).mean()


class ChangeDetectionTask(TaskModule):
    """
    Args:
        backbone, weights, modalities (one entry: both dates use the same stem), img_size, drop_path_rate: see
            :func:`build_backbone`.
        decoder_width, decoder_norm: UPerNet on the merged features.
        dice_weight: loss = BCE + dice_weight × Dice.
        threshold: on the change probability.
        eval_tile, eval_overlap: sliding window on full tiles (LEVIR-CD: 1024²) for validation/test/predict.

    Metrics of the change class: precision, recall, F1 (the paper's), IoU.
    """

    monitor = ("val/F1", "max")

    def __init__(
        self,
        backbone: str = "rsvheat_base",
        weights: str | None = None,
        modalities: dict[str, int] | None = None,
        img_size: int = 256,
        drop_path_rate: float = 0.1,
        decoder_width: int = 128,
        decoder_norm: str = "batchnorm",
        dice_weight: float = 1.0,
        threshold: float = 0.5,
        eval_tile: int = 512,
        eval_overlap: int = 128,
        freeze_backbone: bool = False,
        freeze_stages: int = 0,
        lr: float = 2e-4,
        weight_decay: float = 0.05,
        layer_decay: float = 0.9,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if modalities is not None and len(modalities) != 1:
            raise ValueError(f"change detection takes one modality for both dates, got {modalities}")
        if not 0 <= eval_overlap < eval_tile:
            raise ValueError(f"eval_overlap ({eval_overlap}) must be in [0, eval_tile) with eval_tile = {eval_tile}")
        self.save_hyperparameters()
        self.init_backbone()
        self.model = ChangeDetectionModel(self.backbone, decoder_width, decoder_norm)
        metrics = MetricCollection(
            {
                "precision": BinaryPrecision(threshold=threshold),
                "recall": BinaryRecall(threshold=threshold),
                "F1": BinaryF1Score(threshold=threshold),
                "IoU": BinaryJaccardIndex(threshold=threshold),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "channels") and dm.channels != dict(self.modalities):
            raise ValueError(f"the data gives bands {dm.channels}, the model's stem takes {self.modalities}")

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return self.model(before, after)

    def loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = logits[:, 0]
        bce = F.binary_cross_entropy_with_logits(logits, mask.float())
        return bce + self.hparams.dice_weight * dice_loss(logits, mask)

    def training_step(self, batch, batch_idx):
        loss = self.loss(self(batch["before"], batch["after"]), batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["mask"]))
        return loss

    def predict_logits(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        return sliding_window(self.model, before, after, tile=h.eval_tile, overlap=h.eval_overlap)

    def _evaluate(self, batch, metrics: MetricCollection, prefix: str) -> None:
        logits = self.predict_logits(batch["before"], batch["after"])
        self.log(f"{prefix}/loss", self.loss(logits, batch["mask"]), batch_size=len(batch["mask"]))
        metrics.update(logits[:, 0].sigmoid(), batch["mask"])
        self.log_dict(metrics, prog_bar=prefix == "val", batch_size=len(batch["mask"]))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx):
        prob = self.predict_logits(batch["before"], batch["after"])[:, 0].sigmoid()
        return {"change": (prob > self.hparams.threshold).cpu(), "path": batch["path"], "name": batch["name"]}

    def write_batch(self, prediction, out_dir: Path) -> None:
        for change, path, name in zip(prediction["change"], prediction["path"], prediction["name"], strict=True):
            write_raster(prediction_path(out_dir, name, path), change.numpy().astype(np.uint8) * 255, like=path)
