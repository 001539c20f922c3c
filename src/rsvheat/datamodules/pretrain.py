"""Lightning data module for pre-training: any mix of unpaired optical folders, unpaired SAR folders, paired OPT-SAR
folders and BigEarthNet S1/S2 pairs.

Each source has its own loader (band counts differ between sources, so they cannot share a batch); a training step
sees one batch of every source (Lightning's ``CombinedLoader``, ``max_size_cycle``: an epoch is the longest source,
shorter ones cycle). Under DDP Lightning gives every loader a distributed sampler.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from rsvheat.data.pretrain import (
    BigEarthNetPretrain,
    ImageFolderPretrain,
    PairedFolderPretrain,
    PretrainImages,
    SarScale,
)

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

#: a source cycled this many times per pass over the largest one is flagged: its images get memorised
MEMORISED_REUSE = 20


def warn_if_memorised(datasets: Mapping[str, Dataset]) -> None:
    """Every step takes one batch of every source, so a small source is cycled ``len(largest) / len(small)`` times
    per epoch. Measured: 6 BigEarthNet pairs beside 9,400 AID images were each seen ~1,200 times in a 620-step run,
    and the shared encoder spent half its gradient memorising them."""
    sizes = {name: len(ds) for name, ds in datasets.items()}  # type: ignore[arg-type]  # map-style datasets
    largest = max(sizes, key=sizes.__getitem__)
    for name, size in sizes.items():
        if size and sizes[largest] / size >= MEMORISED_REUSE:
            warnings.warn(
                f"pre-training source {name!r} has {size} images against {sizes[largest]} in {largest!r}: every step "
                f"takes a batch of each, so each of its images is seen ~{sizes[largest] // size} times per pass over "
                f"{largest!r} and will be memorised; add images to it or leave it out",
                stacklevel=2,
            )


class PretrainDataModule(pl.LightningDataModule):
    """
    Args:
        optical_dirs, sar_dirs: folders of unpaired images (searched recursively).
        paired_dirs: folders with ``s1/`` (SAR) and ``s2/`` (optical) subfolders of matching names (SEN1-2-like).
        bigearthnet_s1, bigearthnet_s2: BigEarthNet S1 and S2 patch folders (paired through the S1 metadata).
        modalities: band count per stem, e.g. ``{"optical": 3, "sar": 1}`` (must match the model's).
        optical_bands, sar_bands: 1-based band indices to read from folder images (all bands by default).
        bigearthnet_s2_bands, bigearthnet_s1_bands: BigEarthNet band names.
        crop_size: training crop (the pre-training resolution).
        zoom_out: ``(low, high)``: each crop covers ``crop_size × s`` source pixels, ``s`` log-uniform in the range
            (capped by the image), resampled to ``crop_size``, so that the encoder also learns the coarser scales
            downstream tasks see (see :mod:`rsvheat.data.pretrain`); ``(1, 1)``: native resolution only.
        batch_size: per source and per device.
        repeat: visits of each image per epoch (new random crop each time), for small archives.
        stats: per-modality ``{"mean": [...], "std": [...]}``; computed and cached when not given.
        sar_scale: ``"db"`` or ``"linear"`` SAR pixels of ``sar_dirs`` and ``paired_dirs`` (see
            :mod:`rsvheat.data.pretrain`); BigEarthNet S1 is always read as dB.
        skip_bad: warn about and skip bad files instead of stopping.
    """

    def __init__(
        self,
        optical_dirs: Sequence[str] = (),
        sar_dirs: Sequence[str] = (),
        paired_dirs: Sequence[str] = (),
        bigearthnet_s1: str | None = None,
        bigearthnet_s2: str | None = None,
        modalities: Mapping[str, int] | None = None,
        optical_bands: Sequence[int] | None = None,
        sar_bands: Sequence[int] | None = None,
        bigearthnet_s2_bands: Sequence[str] = ("B04", "B03", "B02"),
        bigearthnet_s1_bands: Sequence[str] = ("VV",),
        crop_size: int = 224,
        zoom_out: tuple[float, float] = (1.0, 1.0),
        batch_size: int = 32,
        num_workers: int = 2,
        repeat: int = 1,
        stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        stats_samples: int = 256,
        sar_scale: SarScale = "db",
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        if not (optical_dirs or sar_dirs or paired_dirs or bigearthnet_s1):
            raise ValueError("no pre-training data: give optical_dirs, sar_dirs, paired_dirs or bigearthnet_s1/_s2")
        if (bigearthnet_s1 is None) != (bigearthnet_s2 is None):
            raise ValueError("BigEarthNet needs both bigearthnet_s1 and bigearthnet_s2")
        self.save_hyperparameters()
        self.modalities = dict(modalities or {"optical": 3, "sar": 1})
        self.datasets: dict[str, Dataset] = {}

    if TYPE_CHECKING:

        @property
        def hparams(self) -> AttributeDict:
            """``save_hyperparameters`` stores the arguments as an ``AttributeDict`` (Lightning types it loosely)."""

    def _common(self) -> dict:
        h = self.hparams
        return dict(
            crop_size=h.crop_size,
            zoom_out=tuple(h.zoom_out),
            repeat=h.repeat,
            stats=h.stats,
            stats_samples=h.stats_samples,
            sar_scale=h.sar_scale,
            skip_bad=h.skip_bad,
        )

    def _channels(self, modality: str) -> int:
        if modality not in self.modalities:
            raise ValueError(f"data of modality {modality!r} given, but modalities are {self.modalities}")
        return self.modalities[modality]

    def build_datasets(self) -> dict[str, Dataset]:
        """The sources, by name (``optical``, ``sar``, ``paired``, ``bigearthnet``)."""
        h, common = self.hparams, self._common()
        sources: dict[str, list[PretrainImages]] = {}
        for modality, dirs, bands in (("optical", h.optical_dirs, h.optical_bands), ("sar", h.sar_dirs, h.sar_bands)):
            for root in dirs:
                sources.setdefault(modality, []).append(
                    ImageFolderPretrain(root, modality, self._channels(modality), bands, **common)
                )
        for root in h.paired_dirs:
            sources.setdefault("paired", []).append(
                PairedFolderPretrain(
                    root,
                    optical_channels=self._channels("optical"),
                    sar_channels=self._channels("sar"),
                    optical_bands=h.optical_bands,
                    sar_bands=h.sar_bands,
                    **common,
                )
            )
        if h.bigearthnet_s1:
            ben = BigEarthNetPretrain(
                h.bigearthnet_s1,
                h.bigearthnet_s2,
                h.bigearthnet_s2_bands,
                h.bigearthnet_s1_bands,
                **{**common, "sar_scale": "db"},  # BigEarthNet S1 is dB whatever the folders' SAR is stored as
            )
            for modality, c in ben.channels.items():
                if c != self._channels(modality):
                    raise ValueError(
                        f"BigEarthNet gives {c} {modality} band(s), the model's stem takes {self._channels(modality)}"
                    )
            sources["bigearthnet"] = [ben]
        return {name: parts[0] if len(parts) == 1 else ConcatDataset(parts) for name, parts in sources.items()}

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.build_datasets()
            warn_if_memorised(self.datasets)

    def train_dataloader(self) -> CombinedLoader:
        h = self.hparams
        loaders = {
            name: DataLoader(
                ds,
                batch_size=h.batch_size,
                shuffle=True,
                num_workers=h.num_workers,
                persistent_workers=h.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
                drop_last=len(ds) > h.batch_size,  # type: ignore[arg-type]  # a ragged last batch of 1 would break BatchNorm and InfoNCE
            )
            for name, ds in self.datasets.items()
        }
        return CombinedLoader(loaders, mode="max_size_cycle")
