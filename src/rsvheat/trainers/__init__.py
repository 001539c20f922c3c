"""Lightning modules (training tasks) and the LightningCLI that drives them."""

from rsvheat.trainers.change import ChangeDetectionTask
from rsvheat.trainers.classification import ClassificationTask
from rsvheat.trainers.detection import DetectionTask
from rsvheat.trainers.multilabel import MultiLabelClassificationTask
from rsvheat.trainers.pretrain import PretrainTask
from rsvheat.trainers.segmentation import SegmentationTask

__all__ = [
    "ChangeDetectionTask",
    "ClassificationTask",
    "DetectionTask",
    "MultiLabelClassificationTask",
    "PretrainTask",
    "SegmentationTask",
]
