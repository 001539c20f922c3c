"""Scene classification data: one folder per class, as UC Merced, AID, NWPU-RESISC45 and EuroSAT are distributed.

``root/<class name>/<image>`` (any depth below the class folder; PNG/JPG/TIFF/GeoTIFF). A root holding a single folder
that is not a class (UC Merced's ``UCMerced_LandUse/Images``, EuroSAT's ``2750``) is descended into automatically.

The paper's protocols take a seeded, stratified share of every class for training (AID TR 20 %/50 %,
NWPU-RESISC45 TR 10 %/20 %) and the rest for testing; :func:`stratified_split` draws it, holding out part of the
training share for validation (model selection never looks at the test split), and the data module writes it to a
JSON split file that later runs read back, so every run of an experiment sees the same split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from rsvheat.data.io import IMAGE_SUFFIXES, list_images, read_image
from rsvheat.data.transforms import crop_and_flip, normalise

Samples = list[tuple[str, int]]  # (path relative to the root, label)
# A sample's label: a class index, or a multi-hot vector (the multi-label datasets, rsvheat.data.multilabel)
Label = int | tuple[int, ...]


def scan_class_folders(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[str], Samples]:
    """``(classes, [(path relative to root, label), ...])``; ``classes`` (if given) must equal the folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    root = resolve_root(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [f.name for f in folders if list_images(f)]
    if not found:
        raise ValueError(f"{root}: no class folders with images (expected root/<class>/<image>)")
    empty = [f for f in folders if f.name not in found]
    if empty:
        # a class dropped without a word would shift every later label and shrink the head
        kinds = sorted({p.suffix.lower() or p.name for f in empty for p in f.rglob("*") if p.is_file()})
        raise ValueError(
            f"{root}: class folder(s) without images: {', '.join(f.name for f in empty)} (images are "
            f"{', '.join(IMAGE_SUFFIXES)}"
            + (f"; found {', '.join(kinds[:5])}" if kinds else "; the folder is empty")
            + "): add images or move the folder out of the dataset"
        )
    if classes is not None and list(classes) != found:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(
            f"{root}: the class list does not match the class folders (in the config, not on disk: {missing}; on "
            f"disk, not in the config: {extra}{'; same names in another order' if not missing and not extra else ''})"
        )
    samples = [
        (str(path.relative_to(root)), label) for label, name in enumerate(found) for path in list_images(root / name)
    ]
    return found, samples


def resolve_root(root: str | Path) -> Path:
    """The folder that holds the class folders (see :func:`scan_class_folders`)."""
    root = Path(root)
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    while len(folders) == 1 and not any(f.is_file() for f in folders[0].iterdir()):
        root = folders[0]
        folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return root


def stratified_split(
    labels: Sequence[int], train_ratio: float, val_ratio: float = 0.0, seed: int = 0
) -> dict[str, list[int]]:
    """Indices of a seeded per-class random split. Of every class's ``n_c`` samples, a training share of
    ``train_ratio·n_c`` (rounded half up, at least 1) is drawn and the rest is the test split; ``val_ratio`` of that
    training share (half up, leaving at least one training sample) is held out for validation. The validation samples
    therefore never come from the test split, which stays exactly the paper protocol's (``train_ratio`` → test)."""
    if not 0 < train_ratio <= 1 or not 0 <= val_ratio < 1:
        raise ValueError(f"train_ratio must be in (0, 1] and val_ratio in [0, 1), got {train_ratio} and {val_ratio}")
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels)
    split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in np.unique(label_array):
        idx = rng.permutation(np.flatnonzero(label_array == c))
        n_share = max(1, int(train_ratio * len(idx) + 0.5))  # half up: 2.5 -> 3
        n_val = min(int(val_ratio * n_share + 0.5), n_share - 1)
        split["val"] += idx[:n_val].tolist()
        split["train"] += idx[n_val:n_share].tolist()
        split["test"] += idx[n_share:].tolist()
    return {k: sorted(v) for k, v in split.items()}


class SceneClassification(Dataset):
    """``{"image": (C, size, size) float32, "label": () int64}`` samples (TorchGeo's keys) from ``root`` for the given
    relative paths.

    Args:
        samples: ``[(relative path, label)]`` (from :func:`scan_class_folders` and a split).
        channels: bands every image must have after ``bands`` selection.
        mean, std: per-band normalisation.
        size: images are resized (bilinear) to ``size × size``; ``None`` keeps them (then batch only equal sizes).
        train: random flips / 90° rotations.
    """

    def __init__(
        self,
        root: str | Path,
        samples: Sequence[tuple[str, Label]],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        size: int | None = 224,
        bands: Sequence[int] | None = None,
        train: bool = False,
    ) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.channels, self.mean, self.std = channels, list(mean), list(std)
        self.size, self.bands, self.train = size, bands, train

    def __len__(self) -> int:
        return len(self.samples)

    def read_raw(self, index: int) -> np.ndarray:
        return read_image(self.root / self.samples[index][0], self.bands, self.channels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image = normalise(self.read_raw(index), self.mean, self.std)
        if self.size is not None and tuple(image.shape[-2:]) != (self.size, self.size):
            image = F.interpolate(image[None], (self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.train:
            image = crop_and_flip({"image": image}, None, True)["image"]
        return {"image": image, "label": torch.tensor(self.samples[index][1])}
