"""What the downstream data modules share: loaders, normalisation statistics, unlabelled prediction inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Sized
from pathlib import Path, PurePosixPath
from typing import cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsvheat.data.io import image_key, match_files, read_image
from rsvheat.data.stats import Stats, band_stats, check_stats
from rsvheat.data.transforms import batch_augmentation, normalise


class TaskDataModule(pl.LightningDataModule):
    """Loaders for ``train``/``val``/``test``/``predict`` datasets built by :meth:`build`; per-band statistics
    ``stats`` given (``{modality: {"mean": [...], "std": [...]}}``) or computed from up to ``stats_samples`` training
    images (cached, see :mod:`rsvheat.data.stats`). ``aug``: augmentations of the training batches on top of the
    datasets' random crops and flips: a kornia ``AugmentationSequential``, an albumentations ``Compose`` or a
    callable on the batch dict (:func:`rsvheat.data.transforms.batch_augmentation`); ``None`` (default) adds none."""

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 2,
        stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        stats_samples: int = 256,
        aug: Callable | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.given_stats, self.stats_samples = stats, stats_samples
        self.aug = batch_augmentation(aug) if aug is not None else None
        self.datasets: dict[str, Dataset] = {}
        self.stats: Stats | None = None

    # subclasses ------------------------------------------------------------------------------------------------------
    @property
    def channels(self) -> dict[str, int]:
        raise NotImplementedError

    def build(self, split: str, stats: Stats) -> Dataset | None:
        """The dataset of ``split`` (``None`` when not configured)."""
        raise NotImplementedError

    def stats_source(self) -> tuple[Callable[[int], Mapping[str, np.ndarray]], int, object]:
        """``(read(i) -> {modality: (C, H, W)}, count, identity)`` of the un-normalised training images."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the data is read from, for error messages (subclasses name their folders)."""
        return type(self).__name__

    def collate(self, split: str) -> Callable | None:
        """The loader's ``collate_fn`` for ``split`` (``None``: PyTorch's default, stacking)."""
        return None

    # shared ----------------------------------------------------------------------------------------------------------
    def resolve_stats(self) -> Stats:
        if self.stats is None:
            if self.given_stats is not None:
                self.stats = check_stats(self.given_stats, self.channels)
            else:
                read, count, identity = self.stats_source()
                self.stats = band_stats(read, count, self.channels, identity, self.stats_samples)
        return self.stats

    def setup(self, stage: str | None = None) -> None:
        stats = self.resolve_stats()
        wanted: dict[str | None, tuple[str, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }
        for split in wanted.get(stage, ("train", "val", "test", "predict")):
            if split not in self.datasets and (ds := self.build(split, stats)) is not None:
                self.datasets[split] = ds

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"no {split} data configured for {type(self).__name__}")
        ds = self.datasets[split]
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # every dataset build returns is map-style, with a length
            drop_last=train
            and len(cast(Sized, ds)) > self.batch_size,  # a last batch of 1 breaks the decoders' BatchNorm
            collate_fn=self.collate(split),
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # training batches only, on the device they train on (as TorchGeo applies its `aug`)
        if self.aug is not None and self.trainer is not None and self.trainer.training:
            batch = self.aug(batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        # no validation data (e.g. a classification split with nothing left over): Lightning skips validation
        return self._loader("val", False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False)


def one_stem(channels: Mapping[str, int] | None, what: str) -> tuple[str, int]:
    """``(modality, band count)`` of a data module that feeds one stem; ``channels`` is ``{modality: bands}`` as in
    every data module (default ``{"optical": 3}``)."""
    channels = dict(channels or {"optical": 3})
    if len(channels) != 1:
        raise ValueError(f"{what} reads one stem: channels must have one entry, e.g. {{sar: 1}}, got {channels}")
    return next(iter(channels.items()))


def prediction_path(out_dir: str | Path, name: str, source: str | Path) -> Path:
    """Where the map predicted for the input file ``source`` is written: ``out_dir/<name>.tif`` for a TIFF source (it
    keeps the georeferencing), ``out_dir/<name>.png`` otherwise.

    ``name`` is the sample's name (its path relative to the input folder, without extension, ``/``-separated), so
    sub-folders of the input are mirrored in ``out_dir``: ``a/tile.tif`` and ``b/tile.tif`` never overwrite each
    other. A name that would leave ``out_dir`` (absolute, or holding ``..``) raises.
    """
    rel = PurePosixPath(name)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"prediction name {name!r} (of {source}) is not a path inside the output folder")
    suffix = ".tif" if Path(source).suffix.lower() in (".tif", ".tiff") else ".png"
    # appended, not with_suffix: a name such as "tile.v2" keeps its dot
    return Path(out_dir, *rel.parent.parts, rel.name + suffix)


class UnlabelledImages(Dataset):
    """Images to predict: ``{"<key>": (C, H, W), ..., "name": str, "path": str}`` from one folder per key (e.g.
    ``{"image": dir}``, ``{"image": optical dir, "sar": dir}``, or the change pair ``{"A": dir, "B": dir}``), matched
    by the path relative to the folder (see :func:`~rsvheat.data.io.match_files`). ``name`` is that relative path of
    the first folder's file without extension (the file's stem at the top level), ``path`` the file itself."""

    def __init__(
        self,
        folders: Mapping[str, str | Path],
        channels: Mapping[str, int],
        stats: Stats,
        modality_of: Mapping[str, str] | None = None,
        bands: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.records = match_files({k: Path(v) for k, v in folders.items()}, {}, list(folders))
        self.first_root = Path(next(iter(folders.values())))
        self.modality_of = dict(modality_of or {k: k for k in folders})
        self.channels, self.stats, self.bands = channels, stats, dict(bands or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample: dict = {}
        for key, path in record.items():
            modality = self.modality_of[key]
            raw = read_image(path, self.bands.get(modality), self.channels[modality])
            sample[key] = normalise(raw, **self.stats[modality])
        first = next(iter(record.values()))
        sample.update(name=image_key(first, self.first_root), path=str(first))
        return sample
