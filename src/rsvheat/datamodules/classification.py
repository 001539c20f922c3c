"""Scene classification data module: class folders (UC Merced, AID, NWPU-RESISC45, EuroSAT) with a seeded,
stratified train/val/test split written to (and read back from) a JSON split file."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from rsvheat.data.classification import (
    Label,
    SceneClassification,
    resolve_root,
    scan_class_folders,
    stratified_split,
)
from rsvheat.data.stats import Stats
from rsvheat.datamodules.base import TaskDataModule, UnlabelledImages, one_stem
from rsvheat.files import write_json_atomic


class ClassificationDataModule(TaskDataModule):
    """
    Args:
        root: the dataset folder (``root/<class>/<image>``).
        classes: class names in label order; must equal the class folders (default: the folders, sorted).
        train_ratio: per-class training share (AID: 0.2 or 0.5; NWPU-RESISC45: 0.1 or 0.2); the rest is the test
            split, never used for validation.
        val_ratio: share of each class's training share held out for validation, which picks ``best.ckpt``.
            ``0``: train on the whole training share (the papers' protocol) without validation; ``best.ckpt`` is
            then the last epoch's model.
        seed: of the split.
        split_file: JSON split (written if missing, read if present; it records ``train_ratio``, ``val_ratio`` and
            ``seed``, and other values than the file's are an error). Default
            ``splits/<root name>_tr<train_ratio>_val<val_ratio>_seed<seed>.json`` in the working directory.
        img_size: images are resized to ``img_size × img_size``.
        channels, bands: ``{stem: band count}`` after selecting the 1-based ``bands`` (one stem, default
            ``{"optical": 3}``; 13-band EuroSAT-MS: ``{"optical": 13}``).
        predict_dir: a folder of unlabelled images for ``rsvheat predict``.
    """

    #: ``[(path relative to root, label)]``: class indices here, multi-hot vectors in the multi-label subclass.
    samples: Sequence[tuple[str, Label]]
    #: 1-based band indices here; the multi-label subclass keeps BigEarthNet's band names (read by its overrides).
    bands: Sequence[int] | Sequence[str] | None

    def __init__(
        self,
        root: str,
        classes: Sequence[str] | None = None,
        train_ratio: float = 0.2,
        val_ratio: float = 0.1,
        seed: int = 0,
        split_file: str | None = None,
        img_size: int = 224,
        channels: dict[str, int] | None = None,
        bands: Sequence[int] | None = None,
        predict_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        stats: dict | None = None,
        stats_samples: int = 256,
        aug: Callable | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, stats, stats_samples, aug)
        self.img_size, self.bands = img_size, bands
        self.modality, self.band_count = one_stem(channels, "classification")
        self.root, self.classes, self.samples = self.scan(root, classes)
        self.predict_dir = predict_dir
        default_file = f"splits/{self.root.name}_tr{train_ratio:g}_val{val_ratio:g}_seed{seed}.json"
        self.split_file = Path(split_file or default_file)
        self.split = self._load_or_write_split(train_ratio, val_ratio, seed)

    def scan(self, root: str, classes: Sequence[str] | None) -> tuple[Path, list[str], Sequence[tuple[str, Label]]]:
        """``(root, classes, [(path relative to root, label), ...])`` of the dataset; here the class folders. The
        multi-label data module reads its own layouts and keeps the split, statistics and loaders of this class."""
        folder = resolve_root(root) if Path(root).is_dir() else Path(root)
        found, samples = scan_class_folders(folder, classes)
        return folder, found, samples

    def strata(self) -> list[int]:
        """One group per sample for :func:`stratified_split` (here its class)."""
        return [cast(int, label) for _, label in self.samples]  # class folders: class indices

    def _band_indices(self) -> Sequence[int] | None:
        """``bands``: 1-based band indices in every layout this class reads (the multi-label subclass checks that its
        CSV layout has indices, and reads BigEarthNet's band names in its own overrides)."""
        return cast("Sequence[int] | None", self.bands)

    @property
    def channels(self) -> dict[str, int]:
        return {self.modality: self.band_count}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_validation(self) -> bool:
        """Whether the split holds validation samples (``val_ratio > 0``); without, fitting runs no validation."""
        return bool(self.split["val"])

    def _load_or_write_split(self, train_ratio: float, val_ratio: float, seed: int) -> dict[str, list[str]]:
        paths = [p for p, _ in self.samples]
        if self.split_file.is_file():
            split = self._read_split()
            asked = {"train_ratio": train_ratio, "val_ratio": val_ratio, "seed": seed}
            stored = {k: split.get(k) for k in asked}
            if stored != asked:
                raise ValueError(
                    f"{self.split_file}: the split was drawn with {stored}, this run asks for {asked}; delete the "
                    "file to draw a new split, or pass another split_file"
                )
            if split.get("classes") != self.classes:
                raise ValueError(f"{self.split_file}: written for classes {split.get('classes')}, not {self.classes}")
            missing = sorted(set(sum((split[k] for k in ("train", "val", "test")), [])) - set(paths))[:3]
            if missing:
                raise ValueError(f"{self.split_file}: lists files that are not in {self.root}, e.g. {missing}")
            return split
        indices = stratified_split(self.strata(), train_ratio, val_ratio, seed)
        split = {
            "root": str(self.root),
            "classes": self.classes,
            "train_ratio": train_ratio,
            "val_ratio": val_ratio,  # a share of the training share
            "seed": seed,
            **{k: [paths[i] for i in v] for k, v in indices.items()},
        }
        write_json_atomic(split, self.split_file)
        return split

    def _read_split(self) -> dict:
        """The split file's content, with an error naming the file if it is not a split this module wrote."""
        try:
            split = json.loads(self.split_file.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{self.split_file}: not a readable split file ({err}); delete it to draw the split again"
            ) from err
        lists = ("train", "val", "test")
        if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in lists):
            raise ValueError(
                f"{self.split_file}: not a split file (expected a JSON object with 'train', 'val' and 'test' lists); "
                "delete it to draw the split again"
            )
        return split

    def _dataset(self, files: list[str], stats: Stats, train: bool) -> SceneClassification:
        label = dict(self.samples)
        return SceneClassification(
            self.root,
            [(f, label[f]) for f in files],
            self.band_count,
            **stats[self.modality],
            size=self.img_size,
            bands=self._band_indices(),
            train=train,
        )

    def stats_source(self):
        ds = self._dataset(self.split["train"], {self.modality: {"mean": [0.0], "std": [1.0]}}, False)
        identity = ["classification", str(self.root), self.bands, self.split["train"]]
        return (lambda i: {self.modality: ds.read_raw(i)}), len(ds), identity

    def build(self, split: str, stats: Stats):
        if split == "predict":
            if self.predict_dir is None:
                return None
            indices = self._band_indices()
            bands = {self.modality: indices} if indices else None  # the training band selection
            return UnlabelledImages({"image": self.predict_dir}, self.channels, stats, {"image": self.modality}, bands)
        # no validation share: no validation data (the test split is never used to pick a model)
        files = self.split[split]
        return self._dataset(files, stats, train=split == "train") if files else None
