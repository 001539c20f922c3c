"""Change detection: siamese RS-vHeat on the two dates, multi-scale feature differences, UPerNet, one change logit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex, BinaryPrecision, BinaryRecall

from rsvheat.data.io import write_raster
from rsvheat.datamodules.base import prediction_path
from rsvheat.models.contract import CHANGE_DETECTION
from rsvheat.models.sliding import sliding_window
from rsvheat.trainers.base import TaskModule, check_window


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice of the change class: robust to the rarity of changed pixels (~5 % in LEVIR-CD)."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1).float()
    return (1 - (2 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)).mean()


def change_mask(batch: dict) -> torch.Tensor:
    """The ``(B, H, W)`` change mask of a batch: rsvheat's datasets give ``(B, H, W)``, TorchGeo's LEVIR-CD
    ``(B, 1, H, W)`` (a time axis for Kornia's ``VideoSequential``)."""
    mask = batch["mask"]
    return mask[:, 0] if mask.ndim == 4 else mask


class ChangeDetectionTask(TaskModule):
    """
    Args:
        decoder_width, decoder_norm: UPerNet on the merged features.
        dice_weight: loss = BCE + dice_weight × Dice.
        threshold: on the change probability.
        eval_tile, eval_overlap: sliding window on full tiles (LEVIR-CD: 1024²) for validation/test/predict.
        img_size, lr, **kwargs: backbone, optimisation and freezing options of :class:`TaskModule`; ``modalities``
            has one entry: both dates use the same stem.

    Batches: ``{"image": (B, 2, C, H, W) (the two dates, as TorchGeo 0.8's change datasets), "mask": (B, H, W) or
    (B, 1, H, W) in {0, 1}}``.

    Metrics of the change class: precision, recall, F1 (the paper's), IoU.
    """

    monitor = ("val/F1", "max")
    spec = CHANGE_DETECTION

    def __init__(
        self,
        decoder_width: int = 128,
        decoder_norm: str = "batchnorm",
        dice_weight: float = 1.0,
        threshold: float = 0.5,
        eval_tile: int = 512,
        eval_overlap: int = 128,
        img_size: int = 256,
        lr: float = 2e-4,
        modalities: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if modalities is not None and len(modalities) != 1:
            raise ValueError(f"change detection takes one modality for both dates, got {modalities}")
        check_window(eval_tile, eval_overlap)
        super().__init__(img_size=img_size, lr=lr, modalities=modalities, **kwargs)

    def configure_metrics(self) -> MetricCollection:
        t = self.hparams.threshold
        return MetricCollection(
            {
                "precision": BinaryPrecision(threshold=t),
                "recall": BinaryRecall(threshold=t),
                "F1": BinaryF1Score(threshold=t),
                "IoU": BinaryJaccardIndex(threshold=t),
            }
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 2, C, H, W)`` pairs -> change logits ``(B, 1, H, W)``."""
        return self.model(image[:, 0], image[:, 1])

    def criterion(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BCE + ``dice_weight`` × Dice of ``(B, 1, H, W)`` logits against the ``(B, H, W)`` mask."""
        logits = logits[:, 0]
        bce = F.binary_cross_entropy_with_logits(logits, mask.float())
        return bce + self.hparams.dice_weight * dice_loss(logits, mask)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        mask = change_mask(batch)
        loss = self.criterion(self(batch["image"]), mask)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(mask))
        return loss

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-pair logits ``(B, 1, H, W)`` of ``(B, 2, C, H, W)``, by sliding window beyond ``eval_tile``."""
        h = self.hparams
        return sliding_window(self.model, image[:, 0], image[:, 1], tile=h.eval_tile, overlap=h.eval_overlap)

    def _evaluate(self, batch: dict, metrics: MetricCollection, prefix: str) -> None:
        mask = change_mask(batch)
        logits = self.predict_logits(batch["image"])
        self.log(f"{prefix}/loss", self.criterion(logits, mask), batch_size=len(mask))
        metrics.update(logits[:, 0].sigmoid(), mask)
        self.log_dict(metrics, prog_bar=prefix == "val", batch_size=len(mask))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        prob = self.predict_logits(batch["image"])[:, 0].sigmoid()
        return {"change": (prob > self.hparams.threshold).cpu(), "path": batch["path"], "name": batch["name"]}

    def write_batch(self, prediction, out_dir: Path) -> None:
        for change, path, name in zip(prediction["change"], prediction["path"], prediction["name"], strict=True):
            write_raster(prediction_path(out_dir, name, path), change.numpy().astype(np.uint8) * 255, like=path)
