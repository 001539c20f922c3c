"""Object detection (horizontal boxes): torchvision Faster R-CNN with an FPN on RS-vHeat's four stages."""

from __future__ import annotations

import json
from pathlib import Path

from torchmetrics.detection import MeanAveragePrecision

from rsvheat.datamodules.base import TaskDataModule
from rsvheat.files import write_atomic
from rsvheat.models.tasks import faster_rcnn
from rsvheat.trainers.base import TaskModule


class DetectionTask(TaskModule):
    """
    Args:
        num_classes, classes: object classes (without the background); checked against the data module's list.
        backbone, weights, modalities (one stem: ``{"optical": 3}`` or ``{"sar": 1}`` for SAR-AIRcraft),
            img_size (where FVE/SCE are stored; images of any size are accepted), drop_path_rate.
        min_size, max_size: the detector resizes each image so that its short side is ``min_size`` (long side at most
            ``max_size``); DIOR's 800² images: 800.
        box_score_thresh, box_detections_per_img: of the output.
        detector_kwargs: further options of torchvision's ``FasterRCNN``, e.g. ``rpn_post_nms_top_n_train``,
            ``box_batch_size_per_image`` (RoIAlign's backward is the costliest op on CPU: fewer sampled boxes, faster).

    Metrics (torchmetrics, COCO protocol through pycocotools): ``mAP50`` (VOC-style mAP at IoU 0.5, DIOR's metric) and
    ``mAP`` (COCO mAP@[.5:.95]).
    """

    monitor = ("val/mAP50", "max")

    def __init__(
        self,
        num_classes: int,
        classes: list[str] | None = None,
        backbone: str = "rsvheat_base",
        weights: str | None = None,
        modalities: dict[str, int] | None = None,
        img_size: int = 800,
        drop_path_rate: float = 0.2,
        min_size: int = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        box_detections_per_img: int = 100,
        freeze_backbone: bool = False,
        freeze_stages: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        layer_decay: float = 0.9,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        detector_kwargs: dict | None = None,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if modalities is not None and len(modalities) != 1:
            raise ValueError(f"detection takes one modality, got {modalities}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"num_classes is {num_classes} but {len(classes)} class names are given")
        self.save_hyperparameters()
        self.init_backbone()
        self.model = faster_rcnn(
            self.backbone,
            num_classes,
            min_size,
            max_size,
            box_detections_per_img,
            box_score_thresh,
            **dict(detector_kwargs or {}),
        )
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.predictions: list[dict] = []

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "classes"):
            source = dm.describe() if isinstance(dm, TaskDataModule) else type(dm).__name__
            if len(dm.classes) != self.hparams.num_classes:
                raise ValueError(
                    f"class list mismatch: the model has num_classes={self.hparams.num_classes}, the data "
                    f"({source}) {len(dm.classes)} classes {dm.classes}"
                )
            self.check_classes(self.hparams.classes, dm.classes, source)

    @staticmethod
    def _targets(targets: list[dict]) -> list[dict]:
        return [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, self._targets(targets))
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        return loss

    def _evaluate(self, batch, metric: MeanAveragePrecision, prefix: str) -> None:
        images, targets = batch
        metric.update(self.model(images), self._targets(targets))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_map, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_map, "test")

    def _log_map(self, metric: MeanAveragePrecision, prefix: str) -> None:
        scores = metric.compute()
        self.log_dict({f"{prefix}/mAP": scores["map"], f"{prefix}/mAP50": scores["map_50"]}, prog_bar=True)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def predict_step(self, batch, batch_idx):
        detections = self.model(batch["image"])
        return [
            {"path": p, "boxes": d["boxes"].cpu(), "labels": d["labels"].cpu(), "scores": d["scores"].cpu()}
            for p, d in zip(batch["path"], detections, strict=True)
        ]

    def write_batch(self, prediction, out_dir: Path) -> None:
        self.predictions += prediction

    def finish_writing(self, out_dir: Path) -> None:
        names = self.class_names()
        rows = [
            {
                "image": p["path"],
                "bbox_xyxy": [round(v, 2) for v in box],
                "label": int(label),
                "class": names[int(label) - 1],
                "score": round(float(score), 4),
            }
            for p in self.predictions
            for box, label, score in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), strict=True)
        ]
        write_atomic(Path(out_dir) / "detections.json", lambda path: path.write_text(json.dumps(rows, indent=1)))
        self.predictions = []
