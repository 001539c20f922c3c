"""Semantic segmentation data module: per split, a folder with an image folder, a mask folder and optionally a
co-registered SAR folder (``<split_root>/{images,masks,sar}`` by default; LoveDA: ``images_png``/``masks_png``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

from rsvheat.data.segmentation import ISPRS_PALETTE, SegmentationFolder, check_label_map
from rsvheat.data.stats import Stats
from rsvheat.data.transforms import sample_keys
from rsvheat.datamodules.base import TaskDataModule, UnlabelledImages

PALETTES = {"isprs": ISPRS_PALETTE}


class _Dirs(TypedDict):
    """Sub-folder names of a split folder (``sar``: ``None`` for optical-only data)."""

    images: str
    masks: str
    sar: str | None


class _Suffixes(TypedDict):
    """Suffixes removed from file stems before matching (keyword arguments of :class:`SegmentationFolder`)."""

    image_suffix: str
    mask_suffix: str
    sar_suffix: str


class SegmentationDataModule(TaskDataModule):
    """
    Args:
        train_root, val_root, test_root, predict_root: split folders (``test``/``predict`` optional; ``predict``
            needs only images, and SAR when the model fuses it). ``val_root`` picks ``best.ckpt``: make it a
            validation folder (e.g. a few training tiles moved aside), not the test folder.
        num_classes: class ids ``0..num_classes-1``; ``ignore_index`` pixels are not scored.
        images_dir, masks_dir, sar_dir: sub-folder names; ``sar_dir=None`` for optical-only data.
        image_suffix, mask_suffix, sar_suffix: removed from file stems before matching (Potsdam: ``_RGB``/``_label``).
        palette: ``"isprs"`` (Potsdam/Vaihingen colours), a list of RGB triplets, or ``None`` for index masks.
        label_map: index masks storing other values than the class ids: ``{stored value: class id}``, values not in
            the map become ``ignore_index`` (WHU-OPT-SAR: ``{10: 0, 20: 1, ..., 70: 6}``, its 0 background ignored).
        reduce_zero_label: index masks whose 0 means "no data" (LoveDA): 0 is ignored and ``v`` becomes ``v - 1``.
        channels: ``{"optical": 3}``, or ``{"optical": 4, "sar": 1}`` to fuse SAR; ``bands``: 1-based band lists.
        crop_size: random training crops; evaluation runs on whole images (sliding window in the task).
    """

    def __init__(
        self,
        train_root: str,
        val_root: str,
        num_classes: int,
        test_root: str | None = None,
        predict_root: str | None = None,
        images_dir: str = "images",
        masks_dir: str = "masks",
        sar_dir: str | None = None,
        image_suffix: str = "",
        mask_suffix: str = "",
        sar_suffix: str = "",
        palette: str | Sequence[Sequence[int]] | None = None,
        label_map: dict[int, int] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        channels: dict[str, int] | None = None,
        bands: dict[str, list[int]] | None = None,
        crop_size: int = 512,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 2,
        stats: dict | None = None,
        stats_samples: int = 256,
        aug: Callable | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, stats, stats_samples, aug)
        self.roots = {"train": train_root, "val": val_root, "test": test_root, "predict": predict_root}
        self.num_classes, self.ignore_index, self.crop_size = num_classes, ignore_index, crop_size
        self.dirs: _Dirs = {"images": images_dir, "masks": masks_dir, "sar": sar_dir}
        self.suffixes: _Suffixes = {"image_suffix": image_suffix, "mask_suffix": mask_suffix, "sar_suffix": sar_suffix}
        self.palette = PALETTES[palette] if isinstance(palette, str) else palette
        # checked here too, so that a bad label option fails when the module is built, not at setup
        self.label_map = check_label_map(label_map, reduce_zero_label, self.palette, num_classes, ignore_index)
        self.reduce_zero_label = reduce_zero_label
        self._channels = dict(channels or {"optical": 3})
        if ("sar" in self._channels) != (sar_dir is not None):
            raise ValueError(f"channels {self._channels} and sar_dir {sar_dir!r}: give both or neither for SAR fusion")
        self.bands = bands

    @property
    def channels(self) -> dict[str, int]:
        return self._channels

    def describe(self) -> str:
        """The configured split folders, for error messages."""
        return ", ".join(f"{k}_root={v}" for k, v in self.roots.items() if v is not None)

    def _dataset(self, split: str, stats: Stats) -> SegmentationFolder:
        folder = self.roots[split]
        if folder is None:
            raise ValueError(f"no {split}_root configured for {type(self).__name__}")
        root = Path(folder)
        return SegmentationFolder(
            root / self.dirs["images"],
            root / self.dirs["masks"],
            self.num_classes,
            self._channels,
            stats,
            sar=root / self.dirs["sar"] if self.dirs["sar"] else None,
            crop_size=self.crop_size,
            train=split == "train",
            ignore_index=self.ignore_index,
            palette=self.palette,
            label_map=self.label_map,
            reduce_zero_label=self.reduce_zero_label,
            bands=self.bands,
            **self.suffixes,
        )

    def stats_source(self):
        ds = self._dataset("train", {})
        return ds.read_raw, len(ds), ["segmentation", [str(r["optical"]) for r in ds.records], self.bands]

    def build(self, split: str, stats: Stats):
        folder = self.roots[split]
        if folder is None:
            return None
        if split == "predict":
            root = Path(folder)
            keys = sample_keys(self._channels)  # the sample keys of the labelled splits: image (optical), sar
            folders = {"image": root / self.dirs["images"]}
            if self.dirs["sar"]:
                folders["sar"] = root / self.dirs["sar"]
            modality_of = {key: m for m, key in keys.items()}
            return UnlabelledImages(folders, self._channels, stats, modality_of, self.bands)
        return self._dataset(split, stats)
