"""Object detection data module: Pascal VOC XML (DIOR) or COCO JSON annotations, images of any size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rsvheat.data.detection import DetectionDataset, collate_detection
from rsvheat.data.stats import Stats
from rsvheat.datamodules.base import TaskDataModule, UnlabelledImages, one_stem


class DetectionDataModule(TaskDataModule):
    """
    Args:
        format: ``"voc"`` (each split: ``{images, annotations, ids?}``) or ``"coco"`` (``{images, annotation_file}``).
            Boxes come out 0-based and continuous (VOC's 1-based pixel indices converted, see
            :mod:`rsvheat.data.detection`).
        train, val, test: the split specifications; ``predict_dir``: a folder of images to detect on.
        classes: names in label order (labels 1..K). Default: the training JSON's COCO categories in category-id
            order (categories without boxes included), or the sorted VOC names of the training annotations; val/test
            use the same list.
        channels, bands: ``{stem: band count}`` (one stem, default ``{"optical": 3}``; SAR-AIRcraft: ``{"sar": 1}``),
            1-based band selection.
    """

    def __init__(
        self,
        train: dict,
        val: dict,
        test: dict | None = None,
        format: Literal["voc", "coco"] = "voc",
        classes: Sequence[str] | None = None,
        predict_dir: str | None = None,
        channels: dict[str, int] | None = None,
        bands: list[int] | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 4,
        num_workers: int = 2,
        stats: dict | None = None,
        stats_samples: int = 256,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, stats, stats_samples)
        if format not in ("voc", "coco"):
            raise ValueError(f"format must be 'voc' or 'coco', got {format!r}")
        self.specs = {"train": train, "val": val, "test": test}
        self.format, self.predict_dir = format, predict_dir
        self.bands = bands
        self.modality, self.band_count = one_stem(channels, "detection")
        # The class list is fixed by the training split and imposed on the others.
        self.classes = list(self._dataset("train", None, classes).classes)

    @property
    def channels(self) -> dict[str, int]:
        return {self.modality: self.band_count}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        """Where the training split (which sets the class list) is read from, for error messages."""
        return ", ".join(f"{k}={v}" for k, v in (self.specs["train"] or {}).items())

    def _dataset(self, split: str, stats: Stats | None, classes=None) -> DetectionDataset:
        s = (stats or {}).get(self.modality, {"mean": [0.0] * self.band_count, "std": [1.0] * self.band_count})
        kwargs: dict[str, Any] = dict(
            # None (first call, no list configured): the loader's default, COCO categories or sorted VOC names
            classes=classes if classes is not None else getattr(self, "classes", None),
            channels=self.band_count,
            mean=s["mean"],
            std=s["std"],
            train=split == "train",
            bands=self.bands,
        )
        spec = self.specs[split]
        if spec is None:
            raise ValueError(f"no {split} split configured for {type(self).__name__}")
        if self.format == "voc":
            return DetectionDataset.from_voc(**spec, **kwargs)
        return DetectionDataset.from_coco(**spec, **kwargs)

    def stats_source(self):
        ds = self._dataset("train", None)
        return (lambda i: {self.modality: ds.read_raw(i)}), len(ds), ["detection", [str(p) for p, *_ in ds.items]]

    def build(self, split: str, stats: Stats):
        if split == "predict":
            if self.predict_dir is None:
                return None
            return UnlabelledImages({"image": self.predict_dir}, self.channels, stats, {"image": self.modality})
        return self._dataset(split, stats) if self.specs[split] is not None else None

    def collate(self, split: str):
        return collate_detection
