"""Object detection (horizontal boxes): torchvision Faster R-CNN with an FPN on RS-vHeat's four stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.detection import MeanAveragePrecision

from rsvheat.files import write_atomic
from rsvheat.models.contract import DETECTION
from rsvheat.trainers.base import TaskModule


def targets_of(batch: dict) -> list[dict[str, torch.Tensor]]:
    """torchvision's targets (``boxes`` ``(N, 4)`` xyxy, ``labels`` ``(N,)`` in 1..K) of a batch with TorchGeo's keys:
    per image ``bbox_xyxy`` and ``label``."""
    return [{"boxes": b, "labels": c} for b, c in zip(batch["bbox_xyxy"], batch["label"], strict=True)]


class DetectionMAP(MeanAveragePrecision):
    """torchmetrics' COCO mAP scored on up to ``limit`` detections per image (COCO's ``maxDets``).

    torchmetrics' default limits ``[1, 10, 100]`` score a dense scene (hundreds of trees) on its top 100 boxes only,
    whatever the detector may output. pycocotools computes ``map`` (mAP@[.5:.95], all areas) at a hard-coded 100
    detections, not at the last limit (its ``map_50``, ``map_75``, ... use the last limit): for another limit ``map``
    is recomputed here from the accumulated precision table, as pycocotools does for 100.
    """

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        super().__init__(
            box_format="xyxy",
            iou_type="bbox",
            backend="pycocotools",
            max_detection_thresholds=[1, min(10, limit), limit],
            # the precision table is needed only when pycocotools' own "map" is not at the limit
            extended_summary=limit != 100,
        )

    def compute(self) -> dict[str, torch.Tensor]:
        scores = super().compute()
        if "precision" in scores:
            # (T IoU thresholds, R recall thresholds, K classes, A areas, M limits) -> area "all", the last limit
            precision = scores["precision"][..., 0, -1]
            valid = precision[precision > -1]
            scores["map"] = valid.mean().float() if valid.numel() else torch.tensor(-1.0)
            for key in ("ious", "precision", "recall", "scores"):
                scores.pop(key, None)
        return scores


class DetectionTask(TaskModule):
    """
    Args:
        num_classes, classes: object classes (without the background); ``rsvheat fit`` passes the data module's.
        min_size, max_size: the detector resizes each image so that its short side is ``min_size`` (long side at most
            ``max_size``); DIOR's 800² images: 800.
        box_score_thresh, box_detections_per_img: of the output; ``box_detections_per_img`` is also the limit at which
            mAP is scored (COCO's ``maxDets``).
        detector_kwargs: further options of torchvision's ``FasterRCNN``, e.g. ``rpn_post_nms_top_n_train``,
            ``box_batch_size_per_image`` (RoIAlign's backward is the costliest op on CPU: fewer sampled boxes, faster).
        img_size (where FVE/SCE are stored; images of any size are accepted), drop_path_rate, modalities (one stem:
            ``{"optical": 3}`` or ``{"sar": 1}`` for SAR-AIRcraft), **kwargs: options of :class:`TaskModule`.

    Batches: ``{"image": list of (C, H, W) or (B, C, H, W), "bbox_xyxy": list of (N, 4), "label": list of (N,)}``
    (TorchGeo 0.8's ``collate_fn_detection`` keys).

    Metrics (torchmetrics, COCO protocol through pycocotools): ``mAP50`` (VOC-style mAP at IoU 0.5, DIOR's metric) and
    ``mAP`` (COCO mAP@[.5:.95]).
    """

    monitor = ("val/mAP50", "max")
    spec = DETECTION

    def __init__(
        self,
        num_classes: int,
        classes: list[str] | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        box_score_thresh: float = 0.05,
        box_detections_per_img: int = 100,
        detector_kwargs: dict | None = None,
        img_size: int = 800,
        drop_path_rate: float = 0.2,
        modalities: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if modalities is not None and len(modalities) != 1:
            raise ValueError(f"detection takes one modality, got {modalities}")
        super().__init__(img_size=img_size, drop_path_rate=drop_path_rate, modalities=modalities, **kwargs)
        self.predictions: list[dict] = []

    def configure_metrics(self) -> MetricCollection:
        limit = int(self.hparams.box_detections_per_img)
        return MetricCollection({"mAP": DetectionMAP(limit)})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.model(batch["image"], targets_of(batch))
        loss = sum(losses.values())
        size = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_metrics.update(self.model(batch["image"]), targets_of(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_metrics.update(self.model(batch["image"]), targets_of(batch))

    def _log_map(self, metrics: MetricCollection, prefix: str) -> None:
        scores = metrics.compute()
        # the collection flattens the metric's dict into "<prefix>/map", "<prefix>/map_50", ...
        self.log_dict(
            {f"{prefix}/mAP": scores[f"{prefix}/map"], f"{prefix}/mAP50": scores[f"{prefix}/map_50"]}, prog_bar=True
        )
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
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
