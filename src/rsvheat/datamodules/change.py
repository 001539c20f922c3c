"""Change detection data module: LEVIR-CD split folders ``<split_root>/{A,B,label}``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rsvheat.data.change import ChangeDetectionFolder
from rsvheat.data.stats import Stats
from rsvheat.datamodules.base import TaskDataModule, UnlabelledImages


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
        channels, bands, modality: band count of both dates, 1-based band selection, and the stem to use.
    """

    def __init__(
        self,
        train_root: str,
        val_root: str,
        test_root: str | None = None,
        predict_root: str | None = None,
        crop_size: int = 256,
        channels: int = 3,
        bands: list[int] | None = None,
        modality: str = "optical",
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 2,
        stats: dict | None = None,
        stats_samples: int = 256,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, stats, stats_samples)
        self.roots = {"train": train_root, "val": val_root, "test": test_root, "predict": predict_root}
        self.crop_size, self._channels, self.bands, self.modality = crop_size, channels, bands, modality

    @property
    def channels(self) -> dict[str, int]:
        return {self.modality: self._channels}

    def _dataset(self, split: str, stats: Stats) -> ChangeDetectionFolder:
        s = stats.get(self.modality, {"mean": [0.0] * self._channels, "std": [1.0] * self._channels})
        return ChangeDetectionFolder(
            self.roots[split], self._channels, s["mean"], s["std"], self.crop_size, split == "train", self.bands
        )

    def stats_source(self):
        ds = self._dataset("train", {})

        def read(i: int) -> dict[str, np.ndarray]:
            raw = ds.read_raw(i)
            return {self.modality: np.concatenate([raw["A"], raw["B"]], axis=-1)}

        return read, len(ds), ["change", [str(r["A"]) for r in ds.records], self.bands]

    def build(self, split: str, stats: Stats):
        if self.roots[split] is None:
            return None
        if split == "predict":
            root = Path(self.roots[split])
            return UnlabelledPairs(
                {"A": root / "A", "B": root / "B"},
                self.channels,
                stats,
                {"A": self.modality, "B": self.modality},
                {self.modality: self.bands} if self.bands else None,
            )
        return self._dataset(split, stats)
