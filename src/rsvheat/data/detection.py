"""Object detection data (horizontal boxes): Pascal VOC XML, as DIOR is distributed, and COCO JSON.

* VOC: ``images/<name>.<ext>`` and ``annotations/<name>.xml`` (DIOR: ``JPEGImages-trainval`` and
  ``Annotations/Horizontal Bounding Boxes``), ``<name>`` being the image's path relative to the image folder without
  the extension (``images/a/x.jpg`` ↔ ``annotations/a/x.xml``; two images of one name, ``x.jpg`` beside ``x.png``, are
  refused); an optional ``ids`` file (VOC ``ImageSets/Main/train.txt``: one name per line) restricts the images. An
  XML without objects is a valid negative; an image without an XML is one too, as long as the annotation folder holds
  XMLs for other images (a missing or XML-less folder is an error: a mistyped path would otherwise train on negatives
  only), and their number is reported in a warning.
* COCO: one JSON with ``images``, ``annotations`` (``bbox`` = x, y, w, h in pixels) and ``categories``.

Boxes are returned as ``(x1, y1, x2, y2)`` in torchvision's convention: 0-based, continuous pixel coordinates, the box
covering ``[x1, x2) × [y1, y2)``, so that ``0 <= x1 < x2 <= W``. VOC's 1-based inclusive pixel indices are converted
(``xmin - 1, ymin - 1, xmax, ymax``: a box written ``xmin=11 .. xmax=20`` covers pixel columns 10..19 and becomes
``x1=10, x2=20``); COCO's ``x, y, w, h`` already is continuous (``x1=x, x2=x+w``). Labels are ``1..K`` (0 is the
background in torchvision's detectors), the order of ``classes``. Every annotation is checked at construction: unknown
class names, empty boxes, boxes outside the image, unreadable or empty annotation files raise an error naming the file
and the box. Oriented boxes (DOTA, FAIR1M) would add a ``"obb"`` entry per target; the loaders keep the parsing
separate from the dataset so that a DOTA reader can be added the same way.
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from rsvheat.data.io import IMAGE_SUFFIXES, ImageReadError, image_header, images_by_key, read_image
from rsvheat.data.transforms import normalise

# One image's annotation: class names and (N, 4) boxes (x1, y1, x2, y2), 0-based continuous pixel coordinates.
Annotation = tuple[list[str], np.ndarray]
# How the boxes are written in the annotation file: error messages quote them that way.
BoxFormat = Literal["voc", "coco", "xyxy"]


def parse_voc(path: Path) -> Annotation:
    """Class names and ``(N, 4)`` boxes of one VOC XML file, converted from VOC's 1-based inclusive pixel indices
    (DIOR's convention too) to 0-based continuous coordinates: ``(xmin - 1, ymin - 1, xmax, ymax)``."""
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
            # a missing coordinate reads as "", which float() refuses like a non-numeric one
            xmin, ymin, xmax, ymax = (float(box.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as err:
            raise ImageReadError(f"{path}: a <bndbox> without numeric xmin/ymin/xmax/ymax") from err
        # pixel i (1-based) spans [i - 1, i) in continuous 0-based coordinates
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        names.append(name.strip())
    return names, np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


# (image file, its annotation, where the annotation comes from: for error messages)
Item = tuple[Path, Annotation, str]


def voc_filename(path: Path) -> str | None:
    """The image file name an XML's ``<filename>`` names (its last path component: labelling tools write a bare
    name, some a path), or ``None`` when the XML has no ``<filename>`` or cannot be parsed (parse errors are reported
    by :func:`parse_voc`)."""
    try:
        text = ET.parse(path).getroot().findtext("filename")
    except ET.ParseError:
        return None
    if text is None or not text.strip():
        return None
    return text.strip().replace("\\", "/").rsplit("/", 1)[-1]


def load_voc(images: Path, annotations: Path, ids: Path | None = None) -> list[Item]:
    """One item per image of ``images`` (restricted to the names listed in ``ids``), annotated by
    ``annotations/<name>.xml``. Images without an XML are negatives, but only when the folder annotates other
    images: a missing or XML-less folder, or one with no XML for any of these images raises.

    ``<name>`` is the image's path relative to ``images`` without extension (its stem at the top level), so nested
    image folders need the same sub-folders of XMLs; ``ids`` lists these names.

    The XML's ``<filename>``, when present, is checked against that pairing: naming the paired image, or the same
    name with another extension (images converted after labelling), is fine; naming another image of the folder is
    refused (two candidates for one annotation); naming a file that does not exist is kept with a warning. An image
    without an XML of its name is annotated by an unpaired XML whose ``<filename>`` names it (``img_1.xml`` with
    ``<filename>scene_1.png</filename>``)."""
    # keyed by relative path: a/x.jpg and b/x.jpg are two images with two XMLs, x.jpg beside x.png is refused
    named = images_by_key(images)
    every_image = dict(named)  # before the ids filter: a <filename> may name an image outside the split
    if ids is not None:
        wanted = {line.strip() for line in Path(ids).read_text().splitlines() if line.strip()}
        named = {name: f for name, f in named.items() if name in wanted}
    files = list(named.values())
    if not files:
        raise ValueError(f"no images in {images}" + (f" listed in {ids}" if ids else ""))
    if not annotations.is_dir():
        raise FileNotFoundError(f"annotation folder not found: {annotations}")
    if next(annotations.rglob("*.xml"), None) is None:
        raise ValueError(f"{annotations}: no VOC XML files in the annotation folder (expected <image name>.xml)")
    by_file = {f.relative_to(images).as_posix(): f for f in every_image.values()}

    def named_image(xml: Path, filename: str) -> Path | None:
        """The image of the folder that ``<filename>`` names, looked for beside the XML's relative place."""
        folder = xml.parent.relative_to(annotations)
        return by_file.get((folder / filename).as_posix())

    items, unannotated, stale = [], [], []
    for name, f in named.items():
        xml = annotations / f"{name}.xml"
        if xml.is_file():
            filename = voc_filename(xml)
            if filename is not None and filename != f.name and Path(filename).stem != f.stem:
                other = named_image(xml, filename)
                if other is not None:
                    raise ImageReadError(
                        f"{xml}: its name pairs it with {f} but its <filename> names {other}: which image does it "
                        "annotate? Rename the XML or correct its <filename>"
                    )
                stale.append(f"{xml.name} (<filename>{filename}</filename>, paired with {f.name})")
            items.append((f, parse_voc(xml), str(xml)))
        elif name != f.stem and (annotations / f"{f.stem}.xml").is_file():
            # the layout the stem matching used to accept (nested images, flat XMLs): taking the flat XML could give
            # a/x.jpg the boxes of b/x.jpg, and treating the image as a negative would drop its boxes silently
            raise ImageReadError(
                f"{f}: its annotation is looked for at {xml}, but only {annotations / f'{f.stem}.xml'} exists: the "
                "annotation folder must mirror the image sub-folders"
            )
        else:
            unannotated.append(f)
    if unannotated:
        # XMLs whose own name pairs them with no image: their <filename> may name one of the unannotated images
        keys = set(every_image)
        key_of = {f: name for name, f in named.items()}
        claims: dict[Path, list[Path]] = {}
        for xml in annotations.rglob("*.xml"):
            if xml.relative_to(annotations).with_suffix("").as_posix() in keys:
                continue
            filename = voc_filename(xml)
            image = named_image(xml, filename) if filename is not None else None
            if image is not None:
                claims.setdefault(image, []).append(xml)
        for f in unannotated:
            xmls = claims.get(f, [])
            if len(xmls) > 1:
                raise ImageReadError(
                    f"{f}: the <filename> of {len(xmls)} XMLs names it ({xmls[0]}, {xmls[1]}): keep one"
                )
            if xmls:
                items.append((f, parse_voc(xmls[0]), str(xmls[0])))
            else:
                items.append((f, ([], np.zeros((0, 4), np.float32)), str(annotations / f"{key_of[f]}.xml")))
        # keep the images' order, as before
        order = {f: i for i, f in enumerate(files)}
        items.sort(key=lambda item: order[item[0]])
        unannotated = [f for f in unannotated if f not in claims]
    if len(unannotated) == len(files):
        raise ValueError(
            f"{annotations}: no XML for any of the {len(files)} images of {images} (is it the annotation folder of "
            "these images?)"
        )
    if unannotated:
        warnings.warn(
            f"{annotations}: {len(unannotated)} of {len(files)} images of {images} have no XML; they are used as "
            "negatives (images without objects)",
            stacklevel=2,
        )
    if stale:
        warnings.warn(
            f"{annotations}: {len(stale)} XMLs name in <filename> an image that is not in {images}, e.g. {stale[0]}; "
            "they are paired by their own name",
            stacklevel=2,
        )
    return items


def load_coco(images: Path, annotation_file: Path) -> tuple[list[Item], list[str]]:
    """Items of the images listed in ``annotation_file`` and the category names in category-id order."""
    if not Path(annotation_file).is_file():
        raise FileNotFoundError(f"annotation file not found: {annotation_file}")
    try:
        data = json.loads(Path(annotation_file).read_text())
    except (OSError, ValueError) as err:
        raise ImageReadError(f"{annotation_file}: not a valid COCO JSON file ({err})") from err
    if not isinstance(data, dict) or not data.get("images"):
        raise ImageReadError(f"{annotation_file}: no 'images' in the annotation file")
    try:
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
        per_image: dict[int, tuple[list[str], list[list[float]]]] = {im["id"]: ([], []) for im in data["images"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
    except (KeyError, TypeError) as err:
        raise ImageReadError(
            f"{annotation_file}: a category without 'id'/'name' or an image without 'id'/'file_name' ({err!r})"
        ) from err
    for ann in data.get("annotations", []):
        where = f"{annotation_file}: annotation {ann.get('id')}"
        if ann.get("category_id") not in categories:
            raise ImageReadError(f"{where} has unknown category_id {ann.get('category_id')!r}")
        if ann.get("image_id") not in per_image:
            raise ImageReadError(f"{where} has unknown image_id {ann.get('image_id')!r} (not in 'images')")
        bbox = ann.get("bbox")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError) as err:
            raise ImageReadError(f"{where} has no 'bbox' of four numbers [x, y, w, h] (got {bbox!r})") from err
        names, boxes = per_image[ann["image_id"]]
        names.append(categories[ann["category_id"]])
        boxes.append([x, y, x + w, y + h])
    items = [
        (
            images / files[key],
            (names, np.asarray(boxes, np.float32).reshape(-1, 4)),
            f"{annotation_file} (image {files[key]})",
        )
        for key, (names, boxes) in per_image.items()
    ]
    return items, [categories[k] for k in sorted(categories)]


class DetectionDataset(Dataset):
    """``{"image": (C, H, W), "bbox_xyxy": (N, 4) float32, "label": (N,) int64, "name": str}`` samples (TorchGeo 0.8's
    detection keys); boxes are ``(x1, y1, x2, y2)``, 0-based continuous pixel coordinates (torchvision's convention).

    Build with :meth:`from_voc` or :meth:`from_coco`. ``classes``: the class names in label order (``None``: for
    COCO the categories in id order, for VOC the sorted names found in the annotations); a name in the data that is
    not in ``classes`` raises naming the file. ``train``: random horizontal flips (boxes flipped with the image).
    ``box_format`` only says how error messages quote a bad box (as written in the file).
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
        box_format: BoxFormat = "xyxy",
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
            check_boxes(boxes, width, height, origin, box_format)
            labels = np.asarray([self.classes.index(n) + 1 for n in names], dtype=np.int64)
            self.items.append((path, boxes, labels))
        self.channels, self.mean, self.std, self.train, self.bands = channels, mean, std, train, bands

    @classmethod
    def from_voc(
        cls, images: str | Path, annotations: str | Path, ids: str | Path | None = None, **kwargs
    ) -> DetectionDataset:
        """``images``: image folder; ``annotations``: folder of ``<image name>.xml``; ``ids``: optional name list."""
        items = load_voc(Path(images), Path(annotations), None if ids is None else Path(ids))
        return cls(items, box_format="voc", **kwargs)

    @classmethod
    def from_coco(cls, images: str | Path, annotation_file: str | Path, **kwargs) -> DetectionDataset:
        """``classes`` not given (or ``None``): the JSON's categories in category-id order, including categories
        without any box, so that label ``k`` is the ``k``-th category whatever the data holds."""
        items, categories = load_coco(Path(images), Path(annotation_file))
        if kwargs.get("classes") is None:
            kwargs["classes"] = categories
        return cls(items, box_format="coco", **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def read_raw(self, index: int) -> np.ndarray:
        return read_image(self.items[index][0], self.bands, self.channels)

    def __getitem__(self, index: int) -> dict:
        path, box_array, labels = self.items[index]
        image = normalise(self.read_raw(index), self.mean, self.std)
        boxes = torch.from_numpy(box_array.copy())
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = hflip_boxes(boxes, image.shape[-1])
        return {"image": image, "bbox_xyxy": boxes, "label": torch.from_numpy(labels), "name": path.stem}


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, 4)`` 0-based continuous ``(x1, y1, x2, y2)`` boxes of an image flipped left-right: the interval
    ``[x1, x2)`` becomes ``[W - x2, W - x1)`` (pixel column ``i`` goes to ``W - 1 - i``)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _quote(box: np.ndarray, box_format: BoxFormat) -> str:
    """A box as the annotation file writes it, for error messages."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if box_format == "voc":
        return f"xmin={x1 + 1:g} ymin={y1 + 1:g} xmax={x2:g} ymax={y2:g}"
    if box_format == "coco":
        return f"bbox [x, y, w, h] = [{x1:g}, {y1:g}, {x2 - x1:g}, {y2 - y1:g}]"
    return f"({x1:g}, {y1:g}, {x2:g}, {y2:g})"


def check_boxes(boxes: np.ndarray, width: int, height: int, origin: str, box_format: BoxFormat = "xyxy") -> None:
    """Every ``(N, 4)`` 0-based continuous box must be non-empty and inside the ``width × height`` image:
    ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``; an error names ``origin`` (the annotation file) and the box."""
    rule = {
        "voc": "1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height",
        "coco": "x >= 0, y >= 0, w > 0, h > 0, x + w <= width and y + h <= height",
        "xyxy": "0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height",
    }[box_format]
    for box in boxes:
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            raise ImageReadError(f"{origin}: box {_quote(box, box_format)} is empty (boxes need {rule})")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise ImageReadError(
                f"{origin}: box {_quote(box, box_format)} lies outside the {width}×{height} image (boxes need {rule})"
            )


def collate_detection(batch: Sequence[dict]) -> dict[str, list]:
    """``{key: [value of each sample]}``: lists, not stacks, as TorchGeo's ``collate_fn_detection`` for the boxes, and
    for the images too, which keep their own sizes (torchvision's detectors take a list)."""
    return {k: [sample[k] for sample in batch] for k in batch[0]}
