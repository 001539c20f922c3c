"""Lightning data modules."""

from rsvheat.datamodules.change import ChangeDetectionDataModule
from rsvheat.datamodules.classification import ClassificationDataModule
from rsvheat.datamodules.detection import DetectionDataModule
from rsvheat.datamodules.multilabel import MultiLabelDataModule
from rsvheat.datamodules.pretrain import PretrainDataModule
from rsvheat.datamodules.segmentation import SegmentationDataModule

__all__ = [
    "ChangeDetectionDataModule",
    "ClassificationDataModule",
    "DetectionDataModule",
    "MultiLabelDataModule",
    "PretrainDataModule",
    "SegmentationDataModule",
]
