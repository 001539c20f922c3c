"""Scene classification: RS-vHeat + its classifier head; linear probe or full fine-tuning."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix  # noqa: E402

from rsvheat.files import write_atomic  # noqa: E402
from rsvheat.models.contract import CLASSIFICATION  # noqa: E402
from rsvheat.trainers.base import TaskModule  # noqa: E402


class ClassificationTask(TaskModule):
    """
    Args:
        num_classes, classes: the classes (``classes`` optional); ``rsvheat fit`` passes the data module's.
        label_smoothing: of the training cross-entropy (the validation loss is the plain cross-entropy).
        **kwargs: backbone, optimisation and freezing options of :class:`TaskModule` (``freeze_backbone=True`` is the
            linear probe).

    Batches: ``{"image": (B, C, H, W), "label": (B,) int64}`` (predict: ``image`` and ``path``).

    Metrics: overall accuracy (``OA``, the papers' metric), mean per-class accuracy (``AA``); the test run also writes
    per-class accuracy (CSV) and the confusion matrix (CSV and PNG) into the log folder.
    """

    monitor = ("val/OA", "max")
    spec = CLASSIFICATION

    def __init__(
        self,
        num_classes: int,
        classes: list[str] | None = None,
        label_smoothing: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.predictions: list[dict] = []

    @property
    def model(self) -> torch.nn.Module:
        """The backbone with its classifier head: ``(B, C, H, W)`` -> logits ``(B, K)``. A property, not a second
        name of the module, so that the checkpoints' weight names stay ``backbone.*``."""
        return self.backbone

    def configure_losses(self) -> None:
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=self.hparams.label_smoothing)

    def configure_metrics(self) -> MetricCollection:
        k = self.hparams.num_classes
        self.per_class = MulticlassAccuracy(k, average="none")
        self.confusion = MulticlassConfusionMatrix(k)
        return MetricCollection({"OA": MulticlassAccuracy(k, average="micro"), "AA": MulticlassAccuracy(k)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, K)``."""
        return self.model(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["label"]
        logits = self(batch["image"])
        loss = self.criterion(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labels = batch["label"]
        logits = self(batch["image"])
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=len(labels))
        self.val_metrics.update(logits, labels)
        self.log_dict(self.val_metrics, prog_bar=True, batch_size=len(labels))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        labels = batch["label"]
        logits = self(batch["image"])
        self.test_metrics.update(logits, labels)
        self.per_class.update(logits, labels)
        self.confusion.update(logits, labels)
        self.log_dict(self.test_metrics, batch_size=len(labels))

    def on_test_epoch_end(self) -> None:
        per_class = self.per_class.compute().cpu()
        matrix = self.confusion.compute().cpu()
        self.per_class.reset()
        self.confusion.reset()
        if self.trainer.is_global_zero:
            self.write_test_report(per_class, matrix, self.run_dir())

    def write_test_report(self, per_class: torch.Tensor, matrix: torch.Tensor, out: Path) -> None:
        names = self.class_names()

        def table(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["class", "accuracy", "samples"])
                for name, acc, row in zip(names, per_class.tolist(), matrix.sum(1).tolist(), strict=True):
                    writer.writerow([name, f"{acc:.4f}", row])

        def confusion_csv(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["true \\ predicted", *names])
                for name, row in zip(names, matrix.tolist(), strict=True):
                    writer.writerow([name, *row])

        def confusion_png(path: Path) -> None:
            # torchmetrics' plot, of each true class's shares (the counts are in the CSV): with classes of unequal
            # size (AID: 220 to 420 images) the counts' colours would rank the classes by size, not by confusion;
            # the figure grows with the class count (NWPU-RESISC45: 45 names) and the cell text is left out beyond 15
            share = matrix.float() / matrix.sum(1, keepdim=True).clamp_min(1)
            size = max(4.0, 0.35 * len(names) + 2)
            fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
            self.confusion.plot(share, ax=ax, add_text=len(names) <= 15, labels=names, cmap="Blues")
            fig.savefig(path, dpi=120)
            plt.close(fig)

        write_atomic(out / "per_class_accuracy.csv", table)
        write_atomic(out / "confusion_matrix.csv", confusion_csv)
        write_atomic(out / "confusion_matrix.png", confusion_png)

    def predict_step(self, batch, batch_idx):
        images = batch["image"]
        size = self.hparams.img_size
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False)
        probs = self(images).softmax(1)
        score, label = probs.max(1)
        return [
            {"path": p, "label": int(c), "score": float(s)}
            for p, c, s in zip(batch["path"], label.tolist(), score.tolist(), strict=True)
        ]

    def write_batch(self, prediction, out_dir: Path) -> None:
        self.predictions += prediction

    def finish_writing(self, out_dir: Path) -> None:
        names = self.class_names()

        def table(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "class", "label", "score"])
                for p in self.predictions:
                    writer.writerow([p["path"], names[p["label"]], p["label"], f"{p['score']:.4f}"])

        write_atomic(Path(out_dir) / "classification.csv", table)
        self.predictions = []
