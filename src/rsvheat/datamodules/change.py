"""Change detection data module: LEVIR-CD split folders ``<split_root>/{A,B,label}``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rsvheat.data.change import ChangeDetectionFolder
from rsvheat.data.stats import Stats
from rsvheat.datamodules.base import TaskDataModule, UnlabelledImages, one_stem


class UnlabelledPairs(UnlabelledImages):
    """Image pairs to predict, in the labelled samples' layout: ``{"image": (2, C, H, W), "name", "path"}``."""

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        sample["image"] = torch.stack([sample.pop("A"), sample.pop("B")])
        return sample


class ChangeDetectionDataModule(TaskDataModule):
    """
    Args:
        train_root, val_root, test_root: LEVIR-CD split folders (``A/``, ``B/``, ``label/``); ``predict_root`` needs
            only ``A/`` and ``B/``.
        crop_size: random training crops (LEVIR-CD: 256 from the 1024² tiles); evaluation uses whole tiles.
        channels, bands: ``{stem: band count}`` of both dates (one stem, default ``{"optical": 3}``), 1-based band
            selection.
    """

    def __init__(
        self,
        train_root: str,
        val_root: str,
        test_root: str | None = None,
        predict_root: str | None = None,
        crop_size: int = 256,
        channels: dict[str, int] | None = None,
        bands: list[int] | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 2,
        stats: dict | None = None,
        stats_samples: int = 256,
        aug: Callable | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, stats, stats_samples, aug)
        self.roots = {"train": train_root, "val": val_root, "test": test_root, "predict": predict_root}
        self.crop_size, self.bands = crop_size, bands
        self.modality, self.band_count = one_stem(channels, "change detection")

    @property
    def channels(self) -> dict[str, int]:
        return {self.modality: self.band_count}

    def _dataset(self, split: str, stats: Stats) -> ChangeDetectionFolder:
        s = stats.get(self.modality, {"mean": [0.0] * self.band_count, "std": [1.0] * self.band_count})
        root = self.roots[split]
        if root is None:
            raise ValueError(f"no {split}_root configured for {type(self).__name__}")
        return ChangeDetectionFolder(
            root, self.band_count, s["mean"], s["std"], self.crop_size, split == "train", self.bands
        )

    def stats_source(self):
        ds = self._dataset("train", {})

        def read(i: int) -> dict[str, np.ndarray]:
            raw = ds.read_raw(i)
            return {self.modality: np.concatenate([raw["A"], raw["B"]], axis=-1)}

        return read, len(ds), ["change", [str(r["A"]) for r in ds.records], self.bands]

    def build(self, split: str, stats: Stats):
        folder = self.roots[split]
        if folder is None:
            return None
        if split == "predict":
            root = Path(folder)
            return UnlabelledPairs(
                {"A": root / "A", "B": root / "B"},
                self.channels,
                stats,
                {"A": self.modality, "B": self.modality},
                {self.modality: self.bands} if self.bands else None,
            )
        return self._dataset(split, stats)
