"""Multi-label scene classification data: every image carries a set of classes (BigEarthNet: the CORINE land-cover
classes present in a Sentinel-2 patch), stored as a multi-hot vector ``label`` of shape ``(K,)`` (int64, 0/1), as
TorchGeo's ``BigEarthNet`` dataset and its multi-label task expect.

Two layouts are read:

* **BigEarthNet-S2 (v1)**: ``root/<patch>/<patch>_<band>.tif`` (one GeoTIFF per band: B02, B03, B04, B08 at 10 m,
  120 × 120; B05, B06, B07, B8A, B11, B12 at 20 m; B01, B09 at 60 m) and ``root/<patch>/<patch>_labels_metadata.json``
  whose ``"labels"`` list names the CORINE Land Cover classes of the 43-class nomenclature. The 19-class nomenclature
  of the BigEarthNet-19 benchmark merges and drops some of them (:data:`BIGEARTHNET_19`).
* **CSV**: a folder of images and a CSV with a header row. Two columns (``filename,labels``): the labels of each image
  ``;``-separated (``beach;sea``). More columns (``filename,beach,forest,...``): one 0/1 column per class, the header
  naming the classes.

Every file or label that does not fit raises an error naming the file (and the CSV line): a label outside the class
list, an image that is missing, a CSV row without labels.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rsvheat.data.classification import SceneClassification
from rsvheat.data.io import ImageReadError, read_image

MultiHot = tuple[int, ...]
Samples = list[tuple[str, MultiHot]]  # (path relative to the root, multi-hot label vector)

#: BigEarthNet's 43 CORINE Land Cover (level-3) class names, as written in the patches' ``labels`` lists, in the
#: order of the CLC nomenclature (the class index of the 43-class setting).
BIGEARTHNET_43: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)

#: The 19-class nomenclature (BigEarthNet-19), in its class order, each with the 43-class labels it is made of. The
#: 43-class labels named nowhere here (roads and rail, ports, airports, mineral extraction, dump and construction
#: sites, green urban areas, sport and leisure, bare rock, burnt areas, intertidal flats) have no 19-class counterpart
#: and are dropped from a patch's label set.
BIGEARTHNET_19: dict[str, tuple[str, ...]] = {
    "Urban fabric": ("Continuous urban fabric", "Discontinuous urban fabric"),
    "Industrial or commercial units": ("Industrial or commercial units",),
    "Arable land": ("Non-irrigated arable land", "Permanently irrigated land", "Rice fields"),
    "Permanent crops": (
        "Vineyards",
        "Fruit trees and berry plantations",
        "Olive groves",
        "Annual crops associated with permanent crops",
    ),
    "Pastures": ("Pastures",),
    "Complex cultivation patterns": ("Complex cultivation patterns",),
    "Land principally occupied by agriculture, with significant areas of natural vegetation": (
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    ),
    "Agro-forestry areas": ("Agro-forestry areas",),
    "Broad-leaved forest": ("Broad-leaved forest",),
    "Coniferous forest": ("Coniferous forest",),
    "Mixed forest": ("Mixed forest",),
    "Natural grassland and sparsely vegetated areas": ("Natural grassland", "Sparsely vegetated areas"),
    "Moors, heathland and sclerophyllous vegetation": ("Moors and heathland", "Sclerophyllous vegetation"),
    "Transitional woodland, shrub": ("Transitional woodland/shrub",),
    "Beaches, dunes, sands": ("Beaches, dunes, sands",),
    "Inland wetlands": ("Inland marshes", "Peatbogs"),
    "Coastal wetlands": ("Salt marshes", "Salines"),
    "Inland waters": ("Water courses", "Water bodies"),
    "Marine waters": ("Coastal lagoons", "Estuaries", "Sea and ocean"),
}

#: The twelve Sentinel-2 L2A bands of a BigEarthNet-S2 patch (B10, the cirrus band, is not in L2A products).
BIGEARTHNET_S2_BANDS: tuple[str, ...] = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B11",
    "B12",
)
#: Side of a patch on the 10 m grid: the 20 m and 60 m bands are resampled (bilinear) onto it when read.
BIGEARTHNET_PATCH_SIZE = 120


def bigearthnet_classes(nomenclature: int) -> list[str]:
    """The class names of BigEarthNet's 19- or 43-class nomenclature, in class-index order."""
    if nomenclature == 19:
        return list(BIGEARTHNET_19)
    if nomenclature == 43:
        return list(BIGEARTHNET_43)
    raise ValueError(f"BigEarthNet's nomenclature has 19 or 43 classes, got {nomenclature}")


def multi_hot(names: Sequence[str], classes: Sequence[str], where: str) -> MultiHot:
    """``(K,)`` 0/1 vector of the class names ``names`` over ``classes``; a name outside ``classes`` is a
    ``ValueError`` naming ``where`` (the file or CSV line) and the class list."""
    index = {name: i for i, name in enumerate(classes)}
    vector = [0] * len(classes)
    for name in names:
        if name not in index:
            raise ValueError(f"{where}: label {name!r} is not in the class list {list(classes)}")
        vector[index[name]] = 1
    return tuple(vector)


def _bigearthnet_names(labels: Sequence[str], nomenclature: int, where: str) -> list[str]:
    """A patch's 43-class ``labels`` in the names of ``nomenclature`` (19: merged, unmapped ones dropped)."""
    unknown = [name for name in labels if name not in BIGEARTHNET_43]
    if unknown:
        raise ValueError(f"{where}: label {unknown[0]!r} is not one of BigEarthNet's 43 CORINE classes")
    if nomenclature == 43:
        return list(labels)
    merged = {old: new for new, olds in BIGEARTHNET_19.items() for old in olds}
    return [merged[name] for name in labels if name in merged]


def scan_bigearthnet(
    root: str | Path, classes: Sequence[str] | None = None, nomenclature: int = 19
) -> tuple[list[str], Samples]:
    """``(classes, [(patch folder name, multi-hot), ...])`` of the BigEarthNet-S2 patch folders under ``root``.

    ``classes`` (optional) must equal the nomenclature's names, in its order: a model's class index then means the
    same class as in every BigEarthNet paper. A patch whose labels all lie outside the 19 classes keeps an all-zero
    label vector (a patch with none of the classes), as TorchGeo's dataset does."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BigEarthNet folder not found: {root}")
    names = bigearthnet_classes(nomenclature)
    if classes is not None and list(classes) != names:
        raise ValueError(
            f"{root}: the class list must be BigEarthNet's {nomenclature}-class nomenclature in its order "
            f"({names[:2]} ...); to use other classes, convert the labels to the CSV layout"
        )
    samples: Samples = []
    for patch in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = patch / f"{patch.name}_labels_metadata.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{patch}: no {meta.name} (BigEarthNet-S2 v1 patch folders hold one)")
        try:
            labels = json.loads(meta.read_text())["labels"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta}: no readable 'labels' list ({err})") from err
        if not isinstance(labels, list):
            raise ValueError(f"{meta}: 'labels' is not a list")
        samples.append((patch.name, multi_hot(_bigearthnet_names(labels, nomenclature, str(meta)), names, str(meta))))
    if not samples:
        raise ValueError(f"{root}: no BigEarthNet patch folders (expected root/<patch>/<patch>_labels_metadata.json)")
    return names, samples


def read_label_csv(
    csv_path: str | Path, image_root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[str], Samples]:
    """``(classes, [(file name relative to image_root, multi-hot), ...])`` from a label CSV (see the module
    docstring for its two forms).

    ``classes`` defaults to the labels found (list form: sorted; one-hot form: the header's columns, in order); given,
    every label must be in it (list form) or the header must name exactly these classes in this order (one-hot form).
    Errors name the CSV and its line: a missing image, a row without labels, a label outside the class list, a one-hot
    value other than 0/1, a file listed twice."""
    csv_path, image_root = Path(csv_path), Path(image_root)
    if not csv_path.is_file():
        raise FileNotFoundError(f"label CSV not found: {csv_path}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_root}")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a byte-order mark
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise ValueError(f"{csv_path}: expected a header row and one row per image, e.g. 'filename,labels'")
    (_, header), rows = rows[0], rows[1:]
    header = [cell.strip() for cell in header]
    one_hot = len(header) > 2
    if one_hot:
        found = header[1:]
        if classes is not None and list(classes) != found:
            raise ValueError(f"{csv_path}: the header's class columns {found} are not the class list {list(classes)}")
    entries: list[tuple[str, list[str]]] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        where = f"{csv_path} line {line}"
        name = row[0].strip()
        if name in seen:
            raise ValueError(f"{where}: {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line
        if not (image_root / name).is_file():
            raise ImageReadError(f"{where}: image not found: {image_root / name}")
        if one_hot:
            values = [cell.strip() for cell in row[1:]]
            if len(values) != len(found) or any(v not in ("0", "1") for v in values):
                raise ValueError(f"{where}: expected {len(found)} values of 0 or 1 after the file name, got {values}")
            labels = [c for c, v in zip(found, values, strict=True) if v == "1"]
        else:
            labels = [part.strip() for part in (row[1] if len(row) > 1 else "").split(";") if part.strip()]
            if not labels:
                raise ValueError(f"{where}: no labels for {name!r} (give them ';'-separated, e.g. 'beach;sea')")
        entries.append((name, labels))
    if not one_hot:
        found = sorted({label for _, labels in entries for label in labels})
    names = list(classes) if classes is not None else found
    return names, [(name, multi_hot(labels, names, f"{csv_path} line {seen[name]}")) for name, labels in entries]


def read_split_lists(lists: Mapping[str, str | Path], names: Sequence[str]) -> dict[str, list[str]]:
    """A fixed split (BigEarthNet's official ``train``/``val``/``test`` lists) from one CSV per split whose lines start
    with a sample's name: a BigEarthNet S2 patch folder (the official lists' ``s2 patch,s1 patch`` lines) or an image
    file of the CSV layout (a first line ``filename,...`` is taken as a header). Samples on disk that no list names
    (BigEarthNet's patches under snow, cloud or shadow) are left out; a listed name that is not among ``names``, or one
    listed twice, is an error naming the list and its line."""
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    unknown = sorted(set(lists) - set(split))
    if unknown or "train" not in lists:
        raise ValueError(f"split lists are given for train, val and test (train required), got {sorted(lists)}")
    known = set(names)
    seen: dict[str, str] = {}  # sample name -> where it was listed
    for key, path in lists.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{key} split list not found: {path}")
        with open(path, newline="", encoding="utf-8-sig") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                name = row[0].strip() if row else ""
                if not name or (line == 1 and name.lower() == "filename"):
                    continue
                where = f"{path} line {line}"
                if name not in known:
                    raise ValueError(f"{where}: {name!r} is not a sample of the dataset (no such patch or image)")
                if name in seen:
                    raise ValueError(f"{where}: {name!r} is listed twice (first at {seen[name]})")
                seen[name] = where
                split[key].append(name)
    return split


def rarest_label_strata(labels: Sequence[MultiHot]) -> list[int]:
    """A group per sample for :func:`~rsvheat.data.classification.stratified_split`: the index of its rarest class
    (over all samples), ``K`` for a sample without any class. Stratifying on it puts a share of every class's rarest
    occurrences into each split, where a plain random split could leave a rare class out of training."""
    matrix = np.asarray(labels, dtype=np.int64).reshape(len(labels), -1)
    counts = matrix.sum(0)
    # classes a sample does not hold rank after every class it holds: count + total pushes them past the maximum
    rank = np.where(matrix > 0, counts, counts.sum() + 1 + counts)
    groups = rank.argmin(1)
    groups[matrix.sum(1) == 0] = matrix.shape[1]
    return groups.tolist()


class BigEarthNetPatches(SceneClassification):
    """``{"image": (C, size, size), "label": (K,) int64, "path": str}`` from BigEarthNet-S2 patch folders: the
    ``bands`` (names, e.g. ``("B04", "B03", "B02")``) read from their GeoTIFFs, all on the 10 m grid (120 × 120),
    then normalised and resized as in :class:`SceneClassification`. ``samples`` are ``(patch folder name, multi-hot)``.
    """

    def __init__(self, root: str | Path, samples: Sequence[tuple[str, MultiHot]], band_names: Sequence[str], **kwargs):
        unknown = [b for b in band_names if b not in BIGEARTHNET_S2_BANDS]
        if unknown:
            raise ValueError(f"BigEarthNet-S2 band {unknown[0]!r} unknown: bands are {list(BIGEARTHNET_S2_BANDS)}")
        super().__init__(root, samples, len(band_names), bands=None, **kwargs)
        self.band_names = list(band_names)

    def read_raw(self, index: int) -> np.ndarray:
        """``(C, 120, 120)`` float32 of patch ``index``, un-normalised."""
        patch = self.root / self.samples[index][0]
        grid = (BIGEARTHNET_PATCH_SIZE, BIGEARTHNET_PATCH_SIZE)
        return np.concatenate(
            [read_image(patch / f"{patch.name}_{band}.tif", None, 1, out_shape=grid) for band in self.band_names]
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        return {**super().__getitem__(index), "path": str(self.root / self.samples[index][0])}
