"""Downstream task data: the on-disk layouts (class folders, image/mask folders incl. ISPRS colours and SAR, VOC XML,
COCO JSON, LEVIR-CD) and every failure the issue lists."""

import json
import warnings

import numpy as np
import pytest
import torch

from rsvheat.apps.samples import write_voc
from rsvheat.data.classification import scan_class_folders, stratified_split
from rsvheat.data.io import ImageReadError
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


def split_path(tmp_path):
    return str(tmp_path / "split.json")


def test_stratified_split_is_per_class_seeded_and_complete():
    labels = [0] * 10 + [1] * 50 + [2] * 7
    split = stratified_split(labels, 0.2, 0.1, seed=3)
    assert split == stratified_split(labels, 0.2, 0.1, seed=3) != stratified_split(labels, 0.2, 0.1, seed=4)
    assert sorted(sum(split.values(), [])) == list(range(len(labels)))
    train = np.bincount(np.asarray(labels)[split["train"]], minlength=3)
    val = np.bincount(np.asarray(labels)[split["val"]], minlength=3)
    # training shares round(0.2 n_c) = 2, 10, 1 (at least one per class); 10 % of each share validates, half up,
    # leaving at least one training sample
    assert train.tolist() == [2, 9, 1] and val.tolist() == [0, 1, 0]
    # validation comes out of the training share: the test split is the one drawn without validation
    no_val = stratified_split(labels, 0.2, 0.0, seed=3)
    assert split["test"] == no_val["test"] and sorted(split["train"] + split["val"]) == no_val["train"]


def test_classification_layout_split_file_and_descend(tmp_path):
    class_folders(tmp_path / "UCMerced_LandUse" / "Images")  # UC Merced nests its class folders
    dm = ClassificationDataModule(
        str(tmp_path / "UCMerced_LandUse"),
        train_ratio=0.5,
        split_file=split_path(tmp_path),
        img_size=32,
        num_workers=0,
        batch_size=4,
    )
    assert dm.classes == ["beach", "forest", "harbor"] and dm.num_classes == 3
    split = json.loads((tmp_path / "split.json").read_text())
    assert (split["train_ratio"], split["val_ratio"], split["seed"]) == (0.5, 0.1, 0)
    # shares 3, 5, 2 of 5, 10, 4; the default val_ratio 0.1 holds out round(0.5) = 1 forest image
    assert len(split["train"]) == 9 and len(split["val"]) == 1 and len(split["test"]) == 9
    assert split["classes"] == dm.classes and not set(split["val"]) & set(split["test"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # TorchGeo's keys
    images, labels = batch["image"], batch["label"]
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long
    assert [p for p, _ in dm.datasets["val"].samples] == split["val"] and dm.has_validation
    # the same settings read the written split back
    again = ClassificationDataModule(
        str(tmp_path / "UCMerced_LandUse"), train_ratio=0.5, split_file=split_path(tmp_path)
    )
    assert again.split["train"] == split["train"]


def test_classification_split_file_settings_mismatch_and_corrupt(tmp_path):
    root = str(class_folders(tmp_path / "aid"))
    ClassificationDataModule(root, train_ratio=0.5, seed=1, split_file=split_path(tmp_path))
    for changed, shown in (
        ({"train_ratio": 0.9, "seed": 1}, "'train_ratio': 0.9"),
        ({"train_ratio": 0.5}, "'seed': 0"),
    ):
        with pytest.raises(
            ValueError, match=r"split\.json: the split was drawn with \{'train_ratio': 0\.5, .*'seed': 1\}"
        ) as err:
            ClassificationDataModule(root, split_file=split_path(tmp_path), **changed)
        assert shown in str(err.value) and "delete the file" in str(err.value)
    (tmp_path / "split.json").write_text('{"train": [1, 2')
    with pytest.raises(ValueError, match=r"split\.json: not a readable split file"):
        ClassificationDataModule(root, train_ratio=0.5, seed=1, split_file=split_path(tmp_path))
    (tmp_path / "split.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"split\.json: not a split file"):
        ClassificationDataModule(root, train_ratio=0.5, seed=1, split_file=split_path(tmp_path))


def test_classification_without_validation_share_never_validates_on_test(tmp_path):
    dm = ClassificationDataModule(
        str(class_folders(tmp_path / "aid")),
        train_ratio=0.5,
        val_ratio=0.0,
        split_file=split_path(tmp_path),
        stats={"optical": {"mean": [0] * 3, "std": [1] * 3}},
        num_workers=0,
    )
    dm.setup("fit")
    assert not dm.has_validation and "val" not in dm.datasets and dm.val_dataloader() == []
    assert len(dm.split["train"]) == 10 and len(dm.split["test"]) == 9


def test_classification_class_list_mismatch_and_empty(tmp_path):
    class_folders(tmp_path / "aid")
    with pytest.raises(ValueError, match=r"not on disk: \['desert'\].*not in the config: \['harbor'\]"):
        scan_class_folders(tmp_path / "aid", ["beach", "desert", "forest"])
    (tmp_path / "empty" / "beach").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders with images"):
        scan_class_folders(tmp_path / "empty")
    # a class folder without images is named, never dropped (it would shift every later label)
    (tmp_path / "aid" / "airport").mkdir()
    with pytest.raises(ValueError, match=r"without images: airport \(.*the folder is empty"):
        scan_class_folders(tmp_path / "aid")
    (tmp_path / "aid" / "airport" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"without images: airport .*found \.gif"):
        scan_class_folders(tmp_path / "aid")
    # BMP is an image format like the others (GDAL reads it through rasterio)
    from PIL import Image

    from rsvheat.data.io import read_image

    (tmp_path / "aid" / "airport" / "a.gif").unlink()
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "aid" / "airport" / "a.bmp")
    classes, samples = scan_class_folders(tmp_path / "aid")
    assert classes[0] == "airport" and ("airport/a.bmp", 0) in samples
    assert read_image(tmp_path / "aid" / "airport" / "a.bmp").shape == (3, 16, 16)


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
    assert batch["image"].shape == (2, 3, 32, 32) and batch["sar"].shape == (2, 1, 32, 32)  # TorchGeo's keys
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.long
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 3, 48, 48)  # evaluation sees whole images
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


def one_tile(root, mask, name="t0"):
    write(root / "images" / f"{name}.tif", ramp(3, *mask.shape))
    write(root / "masks" / f"{name}.tif", mask[None].astype(np.uint8))
    return str(root)


def test_segmentation_reduce_zero_label_loveda(tmp_path):
    # LoveDA: 0 = no data, classes 1..7 stored as 1..7
    stored = np.arange(9 * 4).reshape(9, 4) % 8
    stored[0, 0] = 255
    root = one_tile(tmp_path / "loveda", stored)
    stats = {"optical": {"mean": [0] * 3, "std": [1] * 3}}
    dm = SegmentationDataModule(root, root, num_classes=7, reduce_zero_label=True, stats=stats, num_workers=0)
    dm.setup("validate")
    mask = dm.datasets["val"][0]["mask"].numpy()
    expected = np.where(stored == 0, 255, stored - 1)
    expected[0, 0] = 255  # the ignore index stays ignored, it does not become 254
    np.testing.assert_array_equal(mask, expected)
    assert set(np.unique(mask).tolist()) == {0, 1, 2, 3, 4, 5, 6, 255}
    # without the option, 7 is out of range for 7 classes; with it, a stored 8 is: the error names the stored value
    write(tmp_path / "loveda" / "masks" / "t0.tif", np.full((1, 9, 4), 8, np.uint8))
    with pytest.raises(ImageReadError, match=r"t0\.tif: label values \[8\] \(with reduce_zero_label"):
        dm.datasets["val"][0]


def test_segmentation_label_map_whu_opt_sar(tmp_path):
    # WHU-OPT-SAR: classes stored as 10..70, 0 unlabelled
    stored = np.array([[10, 20, 30, 40], [50, 60, 70, 0], [15, 70, 10, 255]])
    root = one_tile(tmp_path / "whu", stored)
    label_map = {10 * (k + 1): k for k in range(7)}
    stats = {"optical": {"mean": [0] * 3, "std": [1] * 3}}
    dm = SegmentationDataModule(root, root, num_classes=7, label_map=label_map, stats=stats, num_workers=0)
    dm.setup("validate")
    mask = dm.datasets["val"][0]["mask"]
    assert mask.tolist() == [[0, 1, 2, 3], [4, 5, 6, 255], [255, 6, 0, 255]]  # unmapped values are ignored
    assert mask.dtype == torch.long
    with pytest.raises(ValueError, match=r"label_map \{70: 7\}: class ids must lie in \[0, 7\)"):
        SegmentationDataModule(root, root, num_classes=7, label_map={**label_map, 70: 7})
    with pytest.raises(ValueError, match="label_map or reduce_zero_label, not both"):
        SegmentationDataModule(root, root, num_classes=7, label_map=label_map, reduce_zero_label=True)
    with pytest.raises(ValueError, match="apply to index masks"):
        SegmentationDataModule(root, root, num_classes=6, palette="isprs", reduce_zero_label=True)


def predict_run(task, dm, out):
    """``rsvheat predict`` without the CLI: the data module's predict split through the task's ``write_batch``."""
    import lightning.pytorch as pl

    from rsvheat.trainers.base import PredictionWriter

    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PredictionWriter(str(out))],
    )
    trainer.predict(task, dm, return_predictions=False)
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_segmentation_nested_folders_same_file_name_are_distinct_samples_and_predictions(tmp_path):
    # the reliability issue's case: images/a/tile.tif and images/b/tile.tif were grouped by stem, 3 outputs for 4 inputs
    root = tmp_path / "scene"
    for sub, i in (("a", 0), ("b", 1), ("", 2)):
        labels = np.full((32, 32), i, np.uint8)
        write(root / "images" / sub / "tile.tif", ramp(3, 32, 32) + 40 * i)
        write(root / "masks" / sub / "tile.png", labels[None])  # partners sit at the same relative path, any format
    write(root / "images" / "other.tif", ramp(3, 32, 32))
    write(root / "masks" / "other.png", np.zeros((1, 32, 32), np.uint8))
    stats = {"optical": {"mean": [0] * 3, "std": [1] * 3}}
    dm = SegmentationDataModule(str(root), str(root), num_classes=3, predict_root=str(root), stats=stats, num_workers=0)
    dm.setup("validate")
    val = dm.datasets["val"]
    names = [val[i]["name"] for i in range(len(val))]
    assert names == ["a/tile", "b/tile", "other", "tile"]  # top-level files keep their bare stem
    # each image got its own mask: a/tile's mask is all 0, b/tile's all 1
    assert [int(val[i]["mask"].unique().item()) for i in range(2)] == [0, 1]
    # the predictions mirror the sub-folders: no output overwrites another
    from rsvheat.trainers import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(num_classes=3, img_size=32, decoder_width=16, eval_tile=32, eval_overlap=0, **MICRO)
    written = predict_run(task, dm, tmp_path / "predictions")
    assert written == ["a/tile.tif", "b/tile.tif", "other.tif", "tile.tif"]


def test_prediction_path_mirrors_sub_folders_and_stays_inside():
    from pathlib import Path

    from rsvheat.datamodules.base import prediction_path

    out = Path("/out")
    assert prediction_path(out, "tile", "/in/tile.TIF") == out / "tile.tif"  # flat: unchanged
    assert prediction_path(out, "a/tile", "/in/a/tile.jpg") == out / "a" / "tile.png"
    assert prediction_path(out, "b/tile.v2", "/in/b/tile.v2.tif") == out / "b" / "tile.v2.tif"  # dots kept
    for bad in ("../tile", "/abs/tile", ""):
        with pytest.raises(ValueError, match="not a path inside the output folder"):
            prediction_path(out, bad, "/in/tile.tif")


def test_same_name_with_two_extensions_is_refused_naming_both(tmp_path):
    root = tmp_path / "seg"
    one_tile(root, np.zeros((8, 8)), name="x")
    write(root / "images" / "x.png", ramp(3, 8, 8))  # x.png beside x.tif: one of them used to be dropped
    with pytest.raises(ImageReadError, match=r"images/x\.png and .*images/x\.tif both give the sample name 'x'"):
        SegmentationDataModule(str(root), str(root), num_classes=3, num_workers=0).setup("fit")
    # the predict split (images only) and the change-detection pairs are matched the same way
    with pytest.raises(ValueError, match=r"x\.png and .*x\.tif both give the sample name 'x'"):
        stats = {"optical": {"mean": [0] * 3, "std": [1] * 3}}
        SegmentationDataModule(
            str(root), str(root), num_classes=3, predict_root=str(root), stats=stats, num_workers=0
        ).setup("predict")
    levir(tmp_path / "cd", n=1)
    write(tmp_path / "cd" / "B" / "p0.tif", ramp(3, 48, 48))
    with pytest.raises(ImageReadError, match=r"B/p0\.png and .*B/p0\.tif both give the sample name 'p0'"):
        ChangeDetectionDataModule(str(tmp_path / "cd"), str(tmp_path / "cd"), num_workers=0).setup("fit")


def test_mask_in_a_sub_folder_matches_its_image_and_a_flat_one_does_not(tmp_path):
    root = tmp_path / "seg"
    write(root / "images" / "a" / "tile_RGB.tif", ramp(3, 16, 16))
    write(root / "masks" / "a" / "tile_label.png", np.ones((1, 16, 16), np.uint8))
    kwargs = dict(num_classes=3, image_suffix="_RGB", mask_suffix="_label", num_workers=0)
    stats = {"optical": {"mean": [0] * 3, "std": [1] * 3}}
    dm = SegmentationDataModule(str(root), str(root), stats=stats, **kwargs)
    dm.setup("validate")
    sample = dm.datasets["val"][0]
    assert sample["name"] == "a/tile_RGB" and sample["mask"].unique().tolist() == [1]  # the name keeps the suffix
    # a mask at the top level no longer partners a nested image: the error says where it was looked for
    (root / "masks" / "a" / "tile_label.png").rename(root / "masks" / "tile_label.png")
    with pytest.raises(
        ImageReadError,
        match=r"a/tile_RGB\.tif: no mask file named like it .*looked for 'a/tile'.*"
        r"masks/tile_label\.png has that file name in another sub-folder",
    ):
        SegmentationDataModule(str(root), str(root), stats=stats, **kwargs).setup("validate")


def test_voc_annotations_mirror_nested_image_folders(tmp_path):
    root = tmp_path / "det"
    for sub, box in (("a", ("ship", 5, 5, 20, 20)), ("b", ("ship", 30, 30, 50, 50))):
        write(root / "images" / sub / "x.jpg", ramp(3, 64, 64))
        write_voc(root / "annotations" / sub / "x.xml", "x.jpg", (64, 64), [box])
    spec = {"images": str(root / "images"), "annotations": str(root / "annotations")}
    dm = DetectionDataModule(spec, spec, num_workers=0, stats={"optical": {"mean": [0] * 3, "std": [1] * 3}})
    dm.setup("validate")
    boxes = [dm.datasets["val"][i]["bbox_xyxy"].tolist() for i in range(2)]
    assert boxes == [[[4, 4, 20, 20]], [[29, 29, 50, 50]]]  # each image its own XML, not one XML for both
    # nested images with a flat XML of the same stem: ambiguous, refused rather than read as negatives
    (root / "annotations" / "a" / "x.xml").rename(root / "annotations" / "x.xml")
    with pytest.raises(ImageReadError, match=r"a/x\.jpg: its annotation is looked for at .*annotations/a/x\.xml"):
        DetectionDataModule(spec, spec, num_workers=0)


def test_float_masks_refuse_fractions_and_accept_integer_values(tmp_path):
    stats = {"optical": {"mean": [0] * 3, "std": [1] * 3}}
    root = tmp_path / "seg"
    write(root / "images" / "t0.tif", ramp(3, 6, 5))
    mask = np.array([[0, 1, 2, 1, 0]] * 6, np.float32)
    write(root / "masks" / "t0.tif", mask[None])  # a float32 TIFF of integer values: fine
    dm = SegmentationDataModule(str(root), str(root), num_classes=3, stats=stats, num_workers=0)
    dm.setup("validate")
    loaded = dm.datasets["val"][0]["mask"]
    assert loaded.dtype == torch.long and loaded.tolist() == mask.astype(int).tolist()
    mask[4, 3] = 0.9  # used to become class 0
    write(root / "masks" / "t0.tif", mask[None])
    with pytest.raises(ImageReadError, match=r"masks/t0\.tif: label value 0\.9 at \(row 4, col 3\) is not an integer"):
        dm.datasets["val"][0]
    # change masks: 255.0 in a float TIFF is "changed", 0.9 is refused the same way
    root = tmp_path / "cd"
    for key in ("A", "B"):
        write(root / key / "p0.tif", ramp(3, 6, 5))
    change = np.zeros((1, 6, 5), np.float32)
    change[0, 1:3, 2:4] = 255.0
    write(root / "label" / "p0.tif", change)
    dm = ChangeDetectionDataModule(str(root), str(root), num_workers=0, stats={"optical": stats["optical"]})
    dm.setup("validate")
    assert int(dm.datasets["val"][0]["mask"].sum()) == 4
    change[0, 5, 0] = 0.9
    write(root / "label" / "p0.tif", change)
    with pytest.raises(ImageReadError, match=r"label/p0\.tif: label value 0\.9 at \(row 5, col 0\)"):
        dm.datasets["val"][0]


def test_images_under_a_hidden_parent_folder_are_listed(tmp_path):
    from rsvheat.data.io import list_images

    root = tmp_path / ".datasets" / "seg"  # e.g. a dataset kept in ~/.cache: only hidden parts below root are skipped
    write(root / "tile.tif", ramp(3, 4, 4))
    write(root / ".hidden" / "tile.tif", ramp(3, 4, 4))
    assert list_images(root) == [root / "tile.tif"]


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
    assert batch["image"].shape == (2, 2, 3, 32, 32)  # the two dates stacked, as TorchGeo 0.8's LEVIR-CD
    full = dm.datasets["val"][0]
    assert full["mask"].shape == (48, 48) and full["mask"].sum() == 10 * 25 and full["mask"].max() == 1


def test_change_detection_predicts_pairs_in_the_training_layout(tmp_path):
    # the predict split gives pairs as the labelled splits do, image (2, C, H, W), and one 0/255 map per pair
    from rsvheat.trainers import ChangeDetectionTask

    root = levir(tmp_path / "cd")
    stats = {"optical": {"mean": [0] * 3, "std": [1] * 3}}
    dm = ChangeDetectionDataModule(str(root), str(root), predict_root=str(root), stats=stats, num_workers=0)
    dm.setup("predict")
    assert dm.datasets["predict"][0]["image"].shape == (2, 3, 48, 48)
    task = ChangeDetectionTask(img_size=32, eval_tile=32, eval_overlap=8, **MICRO)
    assert predict_run(task, dm, tmp_path / "out") == ["p0.png", "p1.png"]


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
    with pytest.warns(UserWarning, match=r"Annotations: 1 of 3 images of .*JPEGImages have no XML; .* negatives"):
        dm = DetectionDataModule(spec, spec, num_workers=0, batch_size=3, eval_batch_size=3)
        dm.setup("fit")
    assert dm.classes == ["airplane", "ship"]
    batch = next(iter(dm.val_dataloader()))  # TorchGeo's detection keys, one list entry per image
    images, boxes, labels = batch["image"], batch["bbox_xyxy"], batch["label"]
    assert len(images) == 3 and images[0].shape == (3, 64, 64)
    assert labels[0].tolist() == [2, 1]
    assert boxes[0].tolist() == [[4, 5, 20, 30], [29, 29, 60, 50]]  # VOC's 1-based corners moved by -1
    assert boxes[1].shape == (0, 4) and labels[2].numel() == 0  # negatives are valid

    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 6, 15, 24]}],
        "categories": [{"id": 7, "name": "ship"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    cspec = {"images": spec["images"], "annotation_file": str(tmp_path / "coco.json")}
    dm = DetectionDataModule(cspec, cspec, format="coco", num_workers=0)
    dm.setup("validate")
    assert dm.classes == ["ship"] and dm.datasets["val"][0]["bbox_xyxy"].tolist() == [[5, 6, 20, 30]]


def pasted_square(root, left, top, side, size=(48, 64)):
    """A PNG (exact pixels, unlike JPEG) with a bright ``side``² square at 0-based column ``left``, row ``top``, and
    its VOC annotation as a labelling tool writes it (1-based inclusive pixel indices)."""
    image = np.full((3, *size), 20, np.uint8)
    image[:, top : top + side, left : left + side] = 200
    write(root / "images" / "sq.png", image)
    box = ("ship", left + 1, top + 1, left + side, top + side)
    write_voc(root / "Annotations" / "sq.xml", "sq.png", size, [box])
    return {"images": str(root / "images"), "annotations": str(root / "Annotations")}


def test_detection_voc_box_is_exactly_the_pasted_pixels_also_flipped(tmp_path):
    spec = pasted_square(tmp_path, left=10, top=30, side=10)  # written xmin=11 .. xmax=20, ymin=31 .. ymax=40
    assert "<xmin>11</xmin>" in (tmp_path / "Annotations" / "sq.xml").read_text()
    dm = DetectionDataModule(spec, spec, stats={"optical": {"mean": [0] * 3, "std": [1] * 3}}, num_workers=0)
    dm.setup("fit")

    def covered(image, box):
        x1, y1, x2, y2 = (int(v) for v in box)
        inside = torch.zeros(image.shape[-2:], dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        return inside, image[0] > 100

    sample = dm.datasets["val"][0]
    image, box = sample["image"], sample["bbox_xyxy"]
    assert box.tolist() == [[10, 30, 20, 40]]  # pixels 10..19 × 30..39 = [10, 20) × [30, 40)
    inside, bright = covered(image, box[0])
    assert torch.equal(inside, bright)
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):  # the training set flips half of the time; each draw must still box the square exactly
        sample = dm.datasets["train"][0]
        image, box = sample["image"], sample["bbox_xyxy"]
        inside, bright = covered(image, box[0])
        assert torch.equal(inside, bright)
        seen.add(tuple(box[0].tolist()))
    assert seen == {(10.0, 30.0, 20.0, 40.0), (64 - 20.0, 30.0, 64 - 10.0, 40.0)}  # W - x2, W - x1


def test_detection_voc_box_touching_the_image_border_is_valid(tmp_path):
    spec = voc(tmp_path, {"a": [("ship", 1, 1, 64, 64)]})
    dm = DetectionDataModule(spec, spec, num_workers=0, stats={"optical": {"mean": [0] * 3, "std": [1] * 3}})
    dm.setup("validate")
    assert dm.datasets["val"][0]["bbox_xyxy"].tolist() == [[0, 0, 64, 64]]  # the whole 64×64 image


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([("ship", 20, 5, 10, 30)], r"a\.xml: box xmin=20 ymin=5 xmax=10 ymax=30 is empty"),
        ([("ship", 5, 5, 90, 30)], r"a\.xml: box xmin=5 ymin=5 xmax=90 ymax=30 lies outside the 64×64 image"),
        ([("ship", 5, 5, 65, 30)], r"a\.xml: box .*xmax=65 .* outside the 64×64 image \(boxes need 1 <= xmin"),
        ([("ship", 0, 5, 10, 30)], r"a\.xml: box xmin=0 .* outside the 64×64 image"),  # VOC is 1-based
    ],
)
def test_detection_bad_boxes_name_the_file(tmp_path, objects, message):
    spec = voc(tmp_path, {"a": objects})
    with pytest.raises(ImageReadError, match=message):
        DetectionDataModule(spec, spec, num_workers=0)


def test_detection_voc_annotation_folder_missing_or_without_xml(tmp_path):
    spec = voc(tmp_path, {"a": None, "b": None})
    with pytest.raises(FileNotFoundError, match=r"annotation folder not found: .*Annotations"):
        DetectionDataModule(spec, spec, num_workers=0)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "readme.txt").write_text("not an annotation")
    with pytest.raises(ValueError, match=r"Annotations: no VOC XML files in the annotation folder"):
        DetectionDataModule(spec, spec, num_workers=0)
    write_voc(tmp_path / "Annotations" / "other.xml", "other.jpg", (64, 64), [("ship", 5, 5, 20, 20)])
    with pytest.raises(ValueError, match=r"Annotations: no XML for any of the 2 images of .*JPEGImages"):
        DetectionDataModule(spec, spec, num_workers=0)


def test_detection_voc_pairs_by_the_xml_filename(tmp_path):
    # a LabelImg-style set: img_1.xml annotates scene_1.png through its <filename>; a.xml names a.tif, the image was
    # converted to a.jpg after labelling (same name, other extension): both paired, no warning
    spec = voc(tmp_path, {"a": [("ship", 5, 5, 20, 20)], "scene_1": None})
    (tmp_path / "Annotations" / "a.xml").unlink()
    write_voc(tmp_path / "Annotations" / "a.xml", "a.tif", (64, 64), [("ship", 5, 5, 20, 20)])
    write_voc(tmp_path / "Annotations" / "img_1.xml", "scene_1.jpg", (64, 64), [("ship", 30, 30, 40, 40)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = DetectionDataModule(spec, spec, num_workers=0, stats={"optical": {"mean": [0] * 3, "std": [1] * 3}})
    dm.setup("validate")
    boxes = {s["name"]: s["bbox_xyxy"].tolist() for s in dm.datasets["val"]}
    assert boxes == {"a": [[4, 4, 20, 20]], "scene_1": [[29, 29, 40, 40]]}
    # two XMLs naming one image: refused
    write_voc(tmp_path / "Annotations" / "img_2.xml", "scene_1.jpg", (64, 64), [])
    with pytest.raises(ImageReadError, match=r"scene_1\.jpg: the <filename> of 2 XMLs names it"):
        DetectionDataModule(spec, spec, num_workers=0)
    (tmp_path / "Annotations" / "img_2.xml").unlink()
    # a.xml names another image of the folder: which one it annotates is ambiguous
    write_voc(tmp_path / "Annotations" / "a.xml", "scene_1.jpg", (64, 64), [("ship", 5, 5, 20, 20)])
    with pytest.raises(ImageReadError, match=r"a\.xml: its name pairs it with .*a\.jpg but its <filename> names"):
        DetectionDataModule(spec, spec, num_workers=0)
    # a.xml names a file that is not there (renamed since): paired by name, with a warning
    write_voc(tmp_path / "Annotations" / "a.xml", "IMG_0042.JPG", (64, 64), [("ship", 5, 5, 20, 20)])
    with pytest.warns(UserWarning, match=r"1 XMLs name in <filename> an image that is not in .*a\.xml"):
        DetectionDataModule(spec, spec, num_workers=0)


def coco_file(tmp_path, annotations, categories=({"id": 1, "name": "ship"},)):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": annotations,
        "categories": list(categories),
    }
    (tmp_path / "coco.json").write_text(json.dumps(data))
    return {"images": str(tmp_path / "JPEGImages"), "annotation_file": str(tmp_path / "coco.json")}


def test_detection_coco_classes_follow_category_ids(tmp_path):
    voc(tmp_path, {"a": None, "b": None})
    # ids out of alphabetical order, one category ("airplane") without any box
    categories = [{"id": 3, "name": "vehicle"}, {"id": 1, "name": "ship"}, {"id": 2, "name": "airplane"}]
    boxes = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 10]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [3.5, 4, 10, 20]},
    ]
    spec = coco_file(tmp_path, boxes, categories)
    dm = DetectionDataModule(spec, spec, format="coco", num_workers=0)
    assert dm.classes == ["ship", "airplane", "vehicle"]  # category-id order, airplane kept
    dm.setup("validate")
    a, b = dm.datasets["val"][0], dm.datasets["val"][1]
    assert a["label"].tolist() == [3] and a["bbox_xyxy"].tolist() == [[0, 0, 64, 10]]  # x + w = W is inside
    assert b["label"].tolist() == [1] and b["bbox_xyxy"].tolist() == [[3.5, 4, 13.5, 24]]


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"id": 5, "image_id": 1, "category_id": 1}, r"coco\.json: annotation 5 has no 'bbox' of four numbers"),
        ({"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}, r"coco\.json: annotation 5 has no 'bbox'"),
        ({"id": 5, "image_id": 9, "category_id": 1, "bbox": [1, 2, 3, 4]}, r"coco\.json: annotation 5 .* image_id 9"),
        ({"id": 5, "image_id": 1, "category_id": 4, "bbox": [1, 2, 3, 4]}, r"coco\.json: .* unknown category_id 4"),
        (
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [60, 2, 4.5, 4]},
            r"coco\.json \(image a\.jpg\): box bbox \[x, y, w, h\] = \[60, 2, 4\.5, 4\] lies outside the 64×64",
        ),
    ],
)
def test_detection_coco_bad_annotations_name_the_file(tmp_path, annotation, message):
    voc(tmp_path, {"a": None, "b": None})
    spec = coco_file(tmp_path, [annotation])
    with pytest.raises(ImageReadError, match=message):
        DetectionDataModule(spec, spec, format="coco", num_workers=0)


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


# -- checkpoints and task setup ---------------------------------------------------------------------------------------

MICRO = dict(
    backbone="rsvheat_tiny",
    encoder_kwargs={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
    drop_path_rate=0.0,
    layer_decay=1.0,
    warmup_fraction=0.0,
)


def fit_once(tmp_path, dm, lr):
    import lightning.pytorch as pl

    from rsvheat.trainers import ClassificationTask

    task = ClassificationTask(num_classes=3, img_size=32, lr=lr, **MICRO)
    trainer = pl.Trainer(
        default_root_dir=tmp_path / "run",
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, dm)
    load = lambda name: torch.load(tmp_path / "run/checkpoints" / name, weights_only=False)  # noqa: E731
    return load("best.ckpt"), load("last.ckpt")


def test_best_checkpoint_is_overwritten_and_is_last_without_validation(tmp_path):
    root = str(class_folders(tmp_path / "cls", {"a": 4, "b": 4, "c": 4}, size=32))
    kwargs = dict(train_ratio=1.0, img_size=32, batch_size=4, num_workers=0)
    dm = ClassificationDataModule(root, val_ratio=0.25, split_file=str(tmp_path / "val.json"), **kwargs)
    fit_once(tmp_path, dm, lr=1e-3)
    best, _ = fit_once(tmp_path, dm, lr=2e-3)  # a second fit in the same folder
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no -v1
    assert best["hyper_parameters"]["lr"] == 2e-3  # best.ckpt is this run's, not the stale one
    # no validation share: nothing to rank on, best.ckpt is the latest model
    dm = ClassificationDataModule(root, val_ratio=0.0, split_file=str(tmp_path / "none.json"), **kwargs)
    (tmp_path / "run/checkpoints/best.ckpt").unlink()
    best, last = fit_once(tmp_path, dm, lr=3e-3)
    assert best["hyper_parameters"]["lr"] == 3e-3 and best["global_step"] == last["global_step"] > 0


def test_single_stem_data_modules_take_channels_as_a_dict(tmp_path):
    # channels is {stem: bands} in every data module (segmentation fuses several stems, the others read one)
    spec = voc(tmp_path / "det", {"a": [("ship", 5, 5, 20, 20)]})
    assert DetectionDataModule(spec, spec, channels={"optical": 3}, num_workers=0).channels == {"optical": 3}
    with pytest.raises(ValueError, match=r"detection reads one stem: channels must have one entry"):
        DetectionDataModule(spec, spec, channels={"optical": 3, "sar": 1}, num_workers=0)
