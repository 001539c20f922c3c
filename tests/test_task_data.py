"""Downstream task data: the on-disk layouts (class folders, image/mask folders incl. ISPRS colours and SAR, VOC XML,
COCO JSON, LEVIR-CD) and every failure the issue lists."""

import json

import numpy as np
import pytest
import torch

from rsvheat.data.classification import scan_class_folders, stratified_split
from rsvheat.data.io import ImageReadError
from rsvheat.data.samples import write_voc
from rsvheat.data.segmentation import ISPRS_PALETTE
from rsvheat.datamodules import (
    ChangeDetectionDataModule,
    ClassificationDataModule,
    DetectionDataModule,
    SegmentationDataModule,
)
from tests.rasters import ramp, write


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVHEAT_CACHE", str(tmp_path / "cache"))


# -- classification ---------------------------------------------------------------------------------------------------


def class_folders(root, counts=None, size=40):
    for name, n in (counts or {"beach": 5, "forest": 10, "harbor": 4}).items():
        for i in range(n):
            write(root / name / f"{name}{i:02d}.jpg", ramp(3, size, size) + 10 * i)
    return root


def test_stratified_split_is_per_class_seeded_and_complete():
    labels = [0] * 10 + [1] * 50 + [2] * 7
    split = stratified_split(labels, 0.2, 0.1, seed=3)
    assert split == stratified_split(labels, 0.2, 0.1, seed=3) != stratified_split(labels, 0.2, 0.1, seed=4)
    assert sorted(sum(split.values(), [])) == list(range(len(labels)))
    train = np.bincount(np.asarray(labels)[split["train"]])
    assert train.tolist() == [2, 10, 1]  # round(0.2 n_c), at least one per class


def test_classification_layout_split_file_and_descend(tmp_path):
    class_folders(tmp_path / "UCMerced_LandUse" / "Images")  # UC Merced nests its class folders
    dm = ClassificationDataModule(
        str(tmp_path / "UCMerced_LandUse"),
        train_ratio=0.5,
        split_file=str(tmp_path / "split.json"),
        img_size=32,
        num_workers=0,
        batch_size=4,
    )
    assert dm.classes == ["beach", "forest", "harbor"] and dm.num_classes == 3
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["train"]) == 3 + 5 + 2 and split["val"] == [] and split["classes"] == dm.classes
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long
    assert len(dm.datasets["val"]) == 19 - 10  # no val share: validate on the test split
    # a second module reads the written split back, whatever its ratio
    again = ClassificationDataModule(
        str(tmp_path / "UCMerced_LandUse"), train_ratio=0.9, split_file=str(tmp_path / "split.json")
    )
    assert again.split["train"] == split["train"]


def test_classification_class_list_mismatch_and_empty(tmp_path):
    class_folders(tmp_path / "aid")
    with pytest.raises(ValueError, match=r"not on disk: \['desert'\].*not in the config: \['harbor'\]"):
        scan_class_folders(tmp_path / "aid", ["beach", "desert", "forest"])
    (tmp_path / "empty" / "beach").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders with images"):
        scan_class_folders(tmp_path / "empty")


def test_classification_wrong_band_count_names_file(tmp_path):
    class_folders(tmp_path / "eurosat", {"river": 3, "sea": 3})
    write(tmp_path / "eurosat" / "sea" / "ms.tif", ramp(13, 40, 40, np.uint16))  # a 13-band EuroSAT-MS tile
    dm = ClassificationDataModule(
        str(tmp_path / "eurosat"),
        train_ratio=1.0,
        split_file=str(tmp_path / "s.json"),
        stats={"optical": {"mean": [0] * 3, "std": [1] * 3}},
        num_workers=0,
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("ms.tif")][0]
    with pytest.raises(ImageReadError, match=r"ms\.tif: expected 3 band\(s\), got 13"):
        ds[bad]


# -- segmentation -----------------------------------------------------------------------------------------------------


def seg_split(root, n=3, size=48, sar=False, rgb=False, image_suffix="", mask_suffix=""):
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = rng.integers(0, 3, (size, size)).astype(np.uint8)
        write(root / "images" / f"tile{i}{image_suffix}.tif", ramp(3, size, size) + labels * 40)
        if rgb:
            write(
                root / "masks" / f"tile{i}{mask_suffix}.tif",
                np.asarray(ISPRS_PALETTE, np.uint8)[labels].transpose(2, 0, 1),
            )
        else:
            write(root / "masks" / f"tile{i}{mask_suffix}.tif", labels[None])
        if sar:
            write(root / "sar" / f"tile{i}.tif", rng.normal(-12, 2, (1, size, size)).astype(np.float32))
    return root


def test_segmentation_index_masks_with_sar_fusion(tmp_path):
    seg_split(tmp_path / "train", sar=True)
    seg_split(tmp_path / "val", n=1, sar=True)
    dm = SegmentationDataModule(
        str(tmp_path / "train"),
        str(tmp_path / "val"),
        num_classes=3,
        sar_dir="sar",
        channels={"optical": 3, "sar": 1},
        crop_size=32,
        batch_size=2,
        num_workers=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["optical"].shape == (2, 3, 32, 32) and batch["sar"].shape == (2, 1, 32, 32)
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.long
    val = next(iter(dm.val_dataloader()))
    assert val["optical"].shape == (1, 3, 48, 48)  # evaluation sees whole images
    assert abs(float(torch.cat([b["sar"].flatten() for b in dm.train_dataloader()]).mean())) < 0.3  # normalised


def test_segmentation_isprs_rgb_labels_and_suffixes(tmp_path):
    seg_split(tmp_path / "train", rgb=True, image_suffix="_RGB", mask_suffix="_label")
    dm = SegmentationDataModule(
        str(tmp_path / "train"),
        str(tmp_path / "train"),
        num_classes=6,
        palette="isprs",
        image_suffix="_RGB",
        mask_suffix="_label",
        crop_size=48,
        num_workers=0,
    )
    dm.setup("fit")
    sample = dm.datasets["val"][0]
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2}
    # black (the ISPRS eroded boundary) is ignored; an unknown colour names the file and the colour
    mask = np.asarray(ISPRS_PALETTE, np.uint8)[np.zeros((48, 48), int)].transpose(2, 0, 1).copy()
    mask[:, 0, 0] = 0
    mask[:, 5, 7] = (10, 20, 30)
    write(tmp_path / "train" / "masks" / "tile0_label.tif", mask)
    with pytest.raises(ImageReadError, match=r"tile0_label\.tif: colour \(10, 20, 30\) at \(row 5, col 7\)"):
        dm.datasets["val"][0]


def test_segmentation_failures_name_the_file(tmp_path):
    seg_split(tmp_path / "a")
    write(tmp_path / "a" / "masks" / "tile1.tif", np.full((1, 48, 48), 7, np.uint8))  # label out of range
    dm = SegmentationDataModule(
        str(tmp_path / "a"),
        str(tmp_path / "a"),
        num_classes=3,
        stats={"optical": {"mean": [0] * 3, "std": [1] * 3}},
        num_workers=0,
    )
    dm.setup("validate")
    with pytest.raises(ImageReadError, match=r"tile1\.tif: label values \[7\] are outside \[0, 3\)"):
        dm.datasets["val"][1]
    write(tmp_path / "a" / "masks" / "tile2.tif", np.zeros((1, 40, 48), np.uint8))  # size differs from its image
    with pytest.raises(ImageReadError, match=r"sizes differ.*tile2\.tif: 48×48.*tile2\.tif: 40×48"):
        SegmentationDataModule(str(tmp_path / "a"), str(tmp_path / "a"), num_classes=3, num_workers=0).setup("fit")
    (tmp_path / "a" / "masks" / "tile2.tif").unlink()  # an image without its mask
    with pytest.raises(ImageReadError, match=r"tile2\.tif: no mask file named like it"):
        SegmentationDataModule(str(tmp_path / "a"), str(tmp_path / "a"), num_classes=3, num_workers=0).setup("fit")


# -- change detection -------------------------------------------------------------------------------------------------


def levir(root, n=2, size=48, crs="EPSG:32650"):
    for i in range(n):
        write(root / "A" / f"p{i}.png", ramp(3, size, size))
        write(root / "B" / f"p{i}.png", ramp(3, size, size) + 30)
        label = np.zeros((1, size, size), np.uint8)
        label[:, 10:20, 5:30] = 255
        write(root / "label" / f"p{i}.png", label)
    return root


def test_change_detection_levir_layout(tmp_path):
    levir(tmp_path / "train")
    dm = ChangeDetectionDataModule(
        str(tmp_path / "train"), str(tmp_path / "train"), crop_size=32, batch_size=2, num_workers=0
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["before"].shape == batch["after"].shape == (2, 3, 32, 32)
    full = dm.datasets["val"][0]
    assert full["mask"].shape == (48, 48) and full["mask"].sum() == 10 * 25 and full["mask"].max() == 1


def test_change_detection_mismatched_pairs_and_masks(tmp_path):
    levir(tmp_path / "size")
    write(tmp_path / "size" / "B" / "p1.png", ramp(3, 40, 48))
    with pytest.raises(ImageReadError, match=r"different sizes: .*A/p1\.png is \(48, 48\), .*B/p1\.png is \(40, 48\)"):
        ChangeDetectionDataModule(str(tmp_path / "size"), str(tmp_path / "size"), num_workers=0).setup("fit")
    root = tmp_path / "crs"
    for key, crs in (("A", "EPSG:32650"), ("B", "EPSG:32651"), ("label", "EPSG:32650")):
        write(root / key / "p0.tif", ramp(3 if key != "label" else 1, 48, 48), crs=crs)
    with pytest.raises(ImageReadError, match=r"different CRS: .*A/p0\.tif is EPSG:32650, .*B/p0\.tif is EPSG:32651"):
        ChangeDetectionDataModule(str(root), str(root), num_workers=0).setup("fit")
    levir(tmp_path / "values", n=1)
    write(tmp_path / "values" / "label" / "p0.png", np.full((1, 48, 48), 3, np.uint8))
    dm = ChangeDetectionDataModule(
        str(tmp_path / "values"),
        str(tmp_path / "values"),
        num_workers=0,
        stats={"optical": {"mean": [0] * 3, "std": [1] * 3}},
    )
    dm.setup("validate")
    with pytest.raises(ImageReadError, match=r"p0\.png: a change mask holds 0/255"):
        dm.datasets["val"][0]


# -- detection --------------------------------------------------------------------------------------------------------


def voc(root, boxes_by_image, size=64):
    for name, objects in boxes_by_image.items():
        write(root / "JPEGImages" / f"{name}.jpg", ramp(3, size, size))
        if objects is not None:
            write_voc(root / "Annotations" / f"{name}.xml", f"{name}.jpg", (size, size), objects)
    return {"images": str(root / "JPEGImages"), "annotations": str(root / "Annotations")}


def test_detection_voc_with_negatives_and_coco(tmp_path):
    spec = voc(tmp_path / "dior", {"a": [("ship", 5, 6, 20, 30), ("airplane", 30, 30, 60, 50)], "b": [], "c": None})
    dm = DetectionDataModule(spec, spec, num_workers=0, batch_size=3, eval_batch_size=3)
    assert dm.classes == ["airplane", "ship"]
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == 3 and images[0].shape == (3, 64, 64)
    assert targets[0]["labels"].tolist() == [2, 1] and targets[0]["boxes"].shape == (2, 4)
    assert targets[1]["boxes"].shape == (0, 4) and targets[2]["labels"].numel() == 0  # negatives are valid

    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 6, 15, 24]}],
        "categories": [{"id": 7, "name": "ship"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    cspec = {"images": spec["images"], "annotation_file": str(tmp_path / "coco.json")}
    dm = DetectionDataModule(cspec, cspec, format="coco", num_workers=0)
    dm.setup("validate")
    assert dm.classes == ["ship"] and dm.datasets["val"][0][1]["boxes"].tolist() == [[5, 6, 20, 30]]


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([("ship", 20, 5, 10, 30)], r"a\.xml: box \(20\.0, 5\.0, 10\.0, 30\.0\) has x2 <= x1"),
        ([("ship", 5, 5, 90, 30)], r"a\.xml: box .* lies outside the 64×64 image"),
    ],
)
def test_detection_bad_boxes_name_the_file(tmp_path, objects, message):
    spec = voc(tmp_path, {"a": objects})
    with pytest.raises(ImageReadError, match=message):
        DetectionDataModule(spec, spec, num_workers=0)


def test_detection_empty_annotation_file_and_class_mismatch(tmp_path):
    spec = voc(tmp_path, {"a": [("ship", 5, 5, 20, 20)]})
    with pytest.raises(ValueError, match=r"a\.xml: classes \['ship'\] are not in the class list \['airplane'\]"):
        DetectionDataModule(spec, spec, classes=["airplane"], num_workers=0)
    (tmp_path / "Annotations" / "a.xml").write_text("")
    with pytest.raises(ImageReadError, match=r"a\.xml: empty annotation file"):
        DetectionDataModule(spec, spec, num_workers=0)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ImageReadError, match=r"empty\.json: no 'images'"):
        DetectionDataModule(
            {"images": spec["images"], "annotation_file": str(tmp_path / "empty.json")},
            {},
            format="coco",
            num_workers=0,
        )
