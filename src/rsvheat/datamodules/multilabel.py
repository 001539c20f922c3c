"""Multi-label scene classification data module: BigEarthNet-S2 patch folders or a folder of images with a label CSV
(see :mod:`rsvheat.data.multilabel`), with the split file, normalisation statistics, band selection and loaders of
:class:`~rsvheat.datamodules.ClassificationDataModule`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from rsvheat.data.multilabel import (
    BIGEARTHNET_S2_BANDS,
    BigEarthNetPatches,
    MultiHot,
    rarest_label_strata,
    read_label_csv,
    read_split_lists,
    scan_bigearthnet,
)
from rsvheat.data.stats import Stats
from rsvheat.datamodules.classification import ClassificationDataModule

#: BigEarthNet bands read when none are named, by the stem's band count: true colour, or all twelve.
_DEFAULT_BANDS = {3: ("B04", "B03", "B02"), 12: BIGEARTHNET_S2_BANDS}


class MultiLabelDataModule(ClassificationDataModule):
    """Samples ``{"image": (C, img_size, img_size), "label": (K,) int64 multi-hot}`` (TorchGeo's keys and label form).

    Args:
        root: the BigEarthNet-S2 folder of patch folders (``labels`` not given), or the image folder of the CSV layout.
        labels: the label CSV of the CSV layout (``filename,labels`` with ``;``-separated labels, or
            ``filename,<class>,<class>,...`` with 0/1 columns), file names relative to ``root``.
        classes: class names in label order. CSV layout: default the labels found (sorted; one-hot: the header's
            order). BigEarthNet: the nomenclature's names, which ``classes`` must equal if given.
        nomenclature: BigEarthNet's 19 classes (the BigEarthNet-19 benchmark, default) or its 43 original ones.
        bands: CSV layout: 1-based band indices of every image (as in the single-label module). BigEarthNet: band
            names, e.g. ``["B04", "B03", "B02"]``; by default true colour for 3 channels, all twelve bands (B01 ...
            B12, 20/60 m bands resampled to 10 m) for 12.
        split_lists: a fixed split instead of a drawn one: ``{train: csv, val: csv, test: csv}`` (``val`` and
            ``test`` optional), each CSV's lines starting with a sample's name, e.g. BigEarthNet's official
            ``train.csv``/``val.csv``/``test.csv`` (see :func:`~rsvheat.data.multilabel.read_split_lists`); the
            ratios, ``seed`` and ``split_file`` are then unused.
        predict_dir: images (CSV layout) or patch folders (BigEarthNet) to predict; their labels are not read.
        train_ratio, val_ratio, seed, split_file, img_size, channels, batch_size, ...: as in
            :class:`~rsvheat.datamodules.ClassificationDataModule`; the split is stratified on each image's rarest
            class (:func:`~rsvheat.data.multilabel.rarest_label_strata`).
    """

    samples: list[tuple[str, MultiHot]]

    def __init__(
        self,
        root: str,
        labels: str | None = None,
        classes: Sequence[str] | None = None,
        nomenclature: int = 19,
        train_ratio: float = 0.6,
        val_ratio: float = 0.2,
        seed: int = 0,
        split_file: str | None = None,
        split_lists: dict[str, str] | None = None,
        img_size: int = 120,
        channels: dict[str, int] | None = None,
        bands: Sequence[int] | Sequence[str] | None = None,
        predict_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        stats: dict | None = None,
        stats_samples: int = 256,
        aug: Callable | None = None,
    ) -> None:
        self.labels_csv, self.nomenclature, self.split_lists = labels, nomenclature, split_lists
        super().__init__(
            root,
            classes,
            train_ratio,
            val_ratio,
            seed,
            split_file,
            img_size,
            channels,
            # stored as given: BigEarthNet's band names are read by this class's overrides only
            cast("Sequence[int] | None", bands),
            predict_dir,
            batch_size,
            eval_batch_size,
            num_workers,
            stats,
            stats_samples,
            aug,
        )

    @property
    def bigearthnet(self) -> bool:
        """BigEarthNet layout (no label CSV given)."""
        return self.labels_csv is None

    def scan(self, root: str, classes: Sequence[str] | None) -> tuple[Path, list[str], list[tuple[str, MultiHot]]]:
        folder = Path(root)
        if self.labels_csv is not None:  # the CSV layout (not self.bigearthnet)
            if self.bands is not None and not all(isinstance(b, int) for b in self.bands):
                raise ValueError(f"bands of the CSV layout are 1-based band indices, got {list(self.bands)}")
            return (folder, *read_label_csv(self.labels_csv, folder, classes))
        if self.bands is None:
            if self.band_count not in _DEFAULT_BANDS:
                raise ValueError(
                    f"BigEarthNet with {self.band_count} {self.modality} channels: name the bands to read "
                    f"(data.bands, from {list(BIGEARTHNET_S2_BANDS)})"
                )
            self.bands = list(_DEFAULT_BANDS[self.band_count])
        if len(self.bands) != self.band_count:
            raise ValueError(f"{len(self.bands)} BigEarthNet bands {list(self.bands)} for {self.band_count} channels")
        return (folder, *scan_bigearthnet(folder, classes, self.nomenclature))

    def _load_or_write_split(self, train_ratio: float, val_ratio: float, seed: int) -> dict[str, list[str]]:
        if self.split_lists is None:
            return super()._load_or_write_split(train_ratio, val_ratio, seed)
        return read_split_lists(self.split_lists, [name for name, _ in self.samples])

    def _band_names(self) -> Sequence[str]:
        """BigEarthNet's bands, set by :meth:`scan`: names (:class:`BigEarthNetPatches` checks each one)."""
        if self.bands is None:
            raise RuntimeError("the BigEarthNet bands are set when the data module scans its root")
        return cast("Sequence[str]", self.bands)

    def strata(self) -> list[int]:
        return rarest_label_strata([label for _, label in self.samples])

    def _dataset(self, files: list[str], stats: Stats, train: bool):
        if not self.bigearthnet:
            return super()._dataset(files, stats, train)
        label = dict(self.samples)
        return BigEarthNetPatches(
            self.root,
            [(f, label[f]) for f in files],
            self._band_names(),
            **stats[self.modality],
            size=self.img_size,
            train=train,
        )

    def build(self, split: str, stats: Stats):
        if split == "predict" and self.predict_dir is not None and self.bigearthnet:
            folder = Path(self.predict_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"predict_dir not found: {folder}")
            patches = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            none = (0,) * self.num_classes  # prediction reads no labels
            return BigEarthNetPatches(
                folder, [(p, none) for p in patches], self._band_names(), **stats[self.modality], size=self.img_size
            )
        return super().build(split, stats)
