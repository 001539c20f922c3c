"""Object detection data (horizontal boxes): Pascal VOC XML, as DIOR is distributed, and COCO JSON.

* VOC: ``images/<name>.<ext>`` and ``annotations/<name>.xml`` (DIOR: ``JPEGImages-trainval`` and
  ``Annotations/Horizontal Bounding Boxes``); an optional ``ids`` file (VOC ``ImageSets/Main/train.txt``: one name per
  line) restricts the images. Images without an XML, or with an XML without objects, are valid negatives.
* COCO: one JSON with ``images``, ``annotations`` (``bbox`` = x, y, w, h in pixels) and ``categories``.

Boxes are returned as ``(x1, y1, x2, y2)`` pixel coordinates and labels as ``1..K`` (0 is the background in
torchvision's detectors), the order of ``classes``. Every annotation is checked at construction: unknown class names,
``x2 <= x1`` or ``y2 <= y1``, boxes outside the image, unreadable or empty annotation files raise an error naming the
file. Oriented boxes (DOTA, FAIR1M) would add a ``"obb"`` entry per target; the loaders keep the parsing separate
from the dataset so that a DOTA reader can be added the same way.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rsvheat.data.io import IMAGE_SUFFIXES, ImageReadError, image_header, list_images, read_image
from rsvheat.data.transforms import normalise

# One image's annotation: class names and (x1, y1, x2, y2) boxes.
Annotation = tuple[list[str], np.ndarray]


def parse_voc(path: Path) -> Annotation:
    """Class names and boxes of one VOC XML file. VOC's 1-based pixel indices are kept as given (DIOR's convention)."""
    try:
        text = path.read_text()
        if not text.strip():
            raise ImageReadError(f"{path}: empty annotation file")
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ImageReadError(f"{path}: not a valid VOC XML file ({err})") from err
    names, boxes = [], []
    for obj in root.iter("object"):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if name is None or box is None:
            raise ImageReadError(f"{path}: an <object> without <name> or <bndbox>")
        try:
            boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (TypeError, ValueError) as err:
            raise ImageReadError(f"{path}: a <bndbox> without numeric xmin/ymin/xmax/ymax") from err
        names.append(name.strip())
    return names, np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


# (image file, its annotation, where the annotation comes from: for error messages)
Item = tuple[Path, Annotation, str]


def load_voc(images: Path, annotations: Path, ids: Path | None = None) -> list[Item]:
    files = list_images(images)
    if ids is not None:
        wanted = {line.strip() for line in Path(ids).read_text().splitlines() if line.strip()}
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise ValueError(f"no images in {images}" + (f" listed in {ids}" if ids else ""))
    items = []
    for f in files:
        xml = annotations / f"{f.stem}.xml"
        items.append((f, parse_voc(xml) if xml.exists() else ([], None), str(xml)))
    return items


def load_coco(images: Path, annotation_file: Path) -> tuple[list[Item], list[str]]:
    if not Path(annotation_file).is_file():
        raise FileNotFoundError(f"annotation file not found: {annotation_file}")
    try:
        data = json.loads(Path(annotation_file).read_text())
    except (OSError, ValueError) as err:
        raise ImageReadError(f"{annotation_file}: not a valid COCO JSON file ({err})") from err
    if not isinstance(data, dict) or not data.get("images"):
        raise ImageReadError(f"{annotation_file}: no 'images' in the annotation file")
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    per_image: dict[int, tuple[list[str], list[list[float]]]] = {im["id"]: ([], []) for im in data["images"]}
    for ann in data.get("annotations", []):
        if ann["category_id"] not in categories:
            raise ImageReadError(f"{annotation_file}: annotation {ann.get('id')} has unknown category_id")
        x, y, w, h = ann["bbox"]
        names, boxes = per_image[ann["image_id"]]
        names.append(categories[ann["category_id"]])
        boxes.append([x, y, x + w, y + h])
    items = [
        (
            images / im["file_name"],
            (per_image[im["id"]][0], np.asarray(per_image[im["id"]][1], np.float32)),
            f"{annotation_file} (image {im['file_name']})",
        )
        for im in data["images"]
    ]
    return items, [categories[k] for k in sorted(categories)]


class DetectionDataset(Dataset):
    """``(image (C, H, W), {"boxes": (N, 4) float32, "labels": (N,) int64, "name": str})`` samples.

    Build with :meth:`from_voc` or :meth:`from_coco`. ``classes``: the class names in label order (``None``: sorted
    names found in the annotations); a name in the data that is not in ``classes`` raises naming the file.
    """

    def __init__(
        self,
        items: Sequence[Item],
        classes: Sequence[str] | None,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        bands: Sequence[int] | None = None,
    ) -> None:
        found = sorted({n for _, (names, _), _ in items for n in names})
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            where = next(origin for _, (names, _), origin in items if set(names) & set(unknown))
            raise ValueError(f"{where}: classes {unknown} are not in the class list {self.classes}")
        self.items = []
        for path, (names, boxes), origin in items:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageReadError(f"{path}: not an image file")
            _, height, width = image_header(path)
            boxes = np.zeros((0, 4), np.float32) if boxes is None or not len(names) else boxes
            _check_boxes(boxes, width, height, origin)
            labels = np.asarray([self.classes.index(n) + 1 for n in names], dtype=np.int64)
            self.items.append((path, boxes, labels))
        self.channels, self.mean, self.std, self.train, self.bands = channels, mean, std, train, bands

    @classmethod
    def from_voc(cls, images: str | Path, annotations: str | Path, ids: str | Path | None = None, **kwargs):
        return cls(load_voc(Path(images), Path(annotations), ids and Path(ids)), **kwargs)

    @classmethod
    def from_coco(cls, images: str | Path, annotation_file: str | Path, **kwargs):
        items, categories = load_coco(Path(images), Path(annotation_file))
        kwargs.setdefault("classes", categories)
        return cls(items, **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def read_raw(self, index: int) -> np.ndarray:
        return read_image(self.items[index][0], self.bands, self.channels)

    def __getitem__(self, index: int):
        path, boxes, labels = self.items[index]
        image = normalise(self.read_raw(index), self.mean, self.std)
        boxes = torch.from_numpy(boxes.copy())
        if self.train and torch.rand(()) < 0.5:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": torch.from_numpy(labels), "name": path.stem}


def _check_boxes(boxes: np.ndarray, width: int, height: int, path: str) -> None:
    for x1, y1, x2, y2 in boxes:
        if x2 <= x1 or y2 <= y1:
            raise ImageReadError(f"{path}: box ({x1}, {y1}, {x2}, {y2}) has x2 <= x1 or y2 <= y1")
        if x1 < 0 or y1 < 0 or x2 > width + 1 or y2 > height + 1:  # +1: VOC's 1-based inclusive coordinates
            raise ImageReadError(f"{path}: box ({x1}, {y1}, {x2}, {y2}) lies outside the {width}×{height} image")


def collate_detection(batch):
    """Lists, not stacks: detection images keep their own sizes."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
