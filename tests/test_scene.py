"""Whole-scene inference: exact tiling, nodata, georeference round trip, COG output, atomic writes, bad input, and
``rsvheat predict-scene`` with fine-tuned checkpoints of each dense task and of detection."""

import json
import warnings

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from rsvheat.data.io import ImageReadError
from rsvheat.inference.scene import Input, Scene, dense_strips, detect_scene, write_dense
from tests.rasters import ramp, write

UNIT = {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}}


def scene_of(*paths, roles=("optical",), stats=UNIT):
    return Scene({r: Input(p, "optical") for r, p in zip(roles, paths, strict=True)}, {"optical": 3}, stats)


def identity(batch):
    return next(iter(batch.values()))


def assemble(strips, height):
    rows, masks, tops = [], [], []
    for top, values, valid in strips:
        tops.append(top)
        rows.append(values.copy())
        masks.append(valid.copy())
    values, valid = np.concatenate(rows, 1), np.concatenate(masks, 0)
    assert values.shape[1] == height
    return tops, values, valid


@pytest.mark.parametrize("tile, overlap, batch", [(64, 16, 3), (48, 0, 1), (512, 128, 4)])
def test_identity_model_reproduces_the_scene_exactly(tmp_path, tile, overlap, batch):
    data = ramp(3, 157, 211, np.float32, 0.37)
    with scene_of(write(tmp_path / "s.tif", data)) as scene:
        reads = []
        read = scene.read
        scene.read = lambda *a: reads.append(a) or read(*a)
        tops, values, valid = assemble(dense_strips(scene, identity, 3, tile, overlap, batch, progress=False), 157)
    np.testing.assert_allclose(values, data, rtol=1e-6, atol=1e-4)
    assert valid.all() and tops == sorted(tops)
    assert max(h for _, _, h, _ in reads) <= tile  # memory: strips of at most `tile` rows, whatever the height


def test_normalisation_nodata_and_mismatched_stats(tmp_path):
    data = ramp(3, 70, 90, np.float32)
    data[:, 10:20, 30:50] = -9999
    path = write(tmp_path / "s.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = -9999
    stats = {"optical": {"mean": [10.0, 20.0, 30.0], "std": [2.0, 4.0, 8.0]}}
    with scene_of(path, stats=stats) as scene:
        _, values, valid = assemble(dense_strips(scene, identity, 3, 32, 8, 2, progress=False), 70)
    assert not valid[10:20, 30:50].any() and valid.sum() == 70 * 90 - 200
    expected = (data - np.array([10, 20, 30])[:, None, None]) / np.array([2, 4, 8])[:, None, None]
    np.testing.assert_allclose(values[:, valid], expected[:, valid], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(values[:, ~valid], 0.0)  # nodata reads as the mean

    nan_scene = ramp(3, 40, 40, np.float32)
    nan_scene[1, 5, 5] = np.nan
    with scene_of(write(tmp_path / "nan.tif", nan_scene)) as scene:
        _, _, valid = assemble(dense_strips(scene, identity, 3, 32, 8, 2, progress=False), 40)
    assert not valid[5, 5] and valid.sum() == 40 * 40 - 1


def test_map_keeps_georeference_nodata_and_is_a_cog(tmp_path):
    data = ramp(3, 300, 260, np.uint8)
    data[:, :40, :40] = 0
    path = write(tmp_path / "s.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = 0
    out, probs = tmp_path / "out/map.tif", tmp_path / "out/probs.tif"
    with scene_of(path) as scene:
        strips = dense_strips(scene, lambda b: identity(b) / 300, 3, 128, 32, 2, progress=False)
        targets = [
            (out, lambda v: (v[:1] > 0.5).astype(np.uint8), 1, "uint8", 255, None),
            (probs, lambda v: v, 3, "float32", -1.0, ["r", "g", "b"]),
        ]
        write_dense(scene, strips, targets)
    with rasterio.open(path) as src, rasterio.open(out) as pred, rasterio.open(probs) as p:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.nodata == 255 and p.descriptions == ("r", "g", "b")
        assert pred.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        labels = pred.read(1)
        assert (labels[:40, :40] == 255).all()
        expected = (data[0] / 300 > 0.5).astype(np.uint8)
        np.testing.assert_array_equal(labels[40:, 40:], expected[40:, 40:])
        np.testing.assert_allclose(p.read(2, window=Window(50, 60, 10, 10)), data[1, 60:70, 50:60] / 300, atol=1e-5)
    assert sorted(f.name for f in out.parent.iterdir()) == ["map.tif", "probs.tif"]  # no temporary files left


def test_refuses_existing_output_and_leaves_nothing_after_a_crash(tmp_path):
    path = write(tmp_path / "s.tif", ramp(3, 100, 100, np.uint8))
    out = tmp_path / "map.tif"
    out.write_bytes(b"keep me")
    target = [(out, lambda v: v[:1], 1, "uint8", 255, None)]
    with scene_of(path) as scene, pytest.raises(FileExistsError, match=r"map\.tif exists \(pass --overwrite"):
        write_dense(scene, dense_strips(scene, identity, 3, 64, 16, progress=False), target)
    assert out.read_bytes() == b"keep me"

    calls = []

    def dies_midway(batch):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return identity(batch)

    fresh = tmp_path / "fresh.tif"
    with scene_of(path) as scene, pytest.raises(OSError, match="No space left"):
        write_dense(scene, dense_strips(scene, dies_midway, 3, 32, 8, 1, progress=False), [(fresh, *target[0][1:])])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["map.tif", "s.tif"]


def test_bad_scenes_are_named(tmp_path):
    good = write(tmp_path / "a.tif", ramp(3, 64, 64, np.uint8))
    stride = r"tile \(16\) is smaller than the model's output stride \(32"
    with pytest.raises(ValueError, match=stride), scene_of(good) as scene:
        next(dense_strips(scene, identity, 3, 16, 4, progress=False))
    with pytest.raises(ImageReadError, match=r"b\.tif: 1 band\(s\), the model's optical stem takes 3"):
        scene_of(write(tmp_path / "b.tif", ramp(1, 64, 64, np.uint8)))
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=r"corrupt\.tif"), scene_of(corrupt) as scene:
        next(dense_strips(scene, identity, 3, 32, 8, progress=False))
    with pytest.raises(ImageReadError, match=r"optical raster not found: .*missing\.tif"):
        scene_of(tmp_path / "missing.tif")
    roles = ("before", "after")
    other_crs = write(tmp_path / "c.tif", ramp(3, 64, 64, np.uint8), crs="EPSG:32632")
    with pytest.raises(ImageReadError, match=r"different CRS: .*a\.tif is EPSG:32633, .*c\.tif is EPSG:32632"):
        scene_of(good, other_crs, roles=roles)
    smaller = write(tmp_path / "d.tif", ramp(3, 60, 64, np.uint8))
    with pytest.raises(ImageReadError, match=r"differ in size: .*64×64, .*60×64"):
        scene_of(good, smaller, roles=roles)
    shifted = tmp_path / "e.tif"
    with rasterio.open(
        shifted,
        "w",
        driver="GTiff",
        count=3,
        height=64,
        width=64,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(400010, 5300000, 10, 10),
    ) as dst:
        dst.write(ramp(3, 64, 64, np.uint8))
    with pytest.raises(ImageReadError, match="different grids"):
        scene_of(good, shifted, roles=roles)


def test_not_georeferenced_scene_warns_and_writes_without_crs(tmp_path):
    png = write(tmp_path / "s.png", ramp(3, 80, 70, np.uint8))
    with pytest.warns(UserWarning, match="not georeferenced"):
        scene = scene_of(png)
    with scene, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strips = dense_strips(scene, identity, 3, 64, 16, progress=False)
        (out,) = write_dense(scene, strips, [(tmp_path / "m.tif", lambda v: v[:1], 1, "uint8", 255, None)])
        with rasterio.open(out) as pred:
            assert pred.crs is None and pred.shape == (80, 70)


def test_detection_across_tiles_merges_duplicates_and_drops_nodata(tmp_path):
    data = np.clip(ramp(3, 200, 300, np.float32) / 3 + 1, 1, 200).astype(np.uint8)
    data[:, 60:90, 100:130] = 250  # one object, seen whole or cut by several overlapping tiles
    data[:, 150:, 250:] = 0
    path = write(tmp_path / "s.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = 0

    def detect(images):
        """Boxes around the bright pixels (score = visible share of the object) and around nodata (read as 0)."""
        out = []
        for image in images:
            boxes, scores = [], []
            for mask in (image[0] >= 250, (image == 0).all(0)):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                if len(ys):
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    scores.append(len(ys) / 900)
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append(
                {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.long), "scores": torch.tensor(scores)}
            )
        return out

    with scene_of(path) as scene:
        found = detect_scene(scene, detect, tile=128, overlap=48, batch_size=2, progress=False)
    assert found["boxes"].tolist() == [[100.0, 60.0, 130.0, 90.0]]  # duplicates merged, the nodata box dropped


@pytest.mark.slow
def test_predict_scene_cli_with_fine_tuned_checkpoints(tmp_path):
    """``rsvheat fit`` (one epoch, micro model) then ``rsvheat predict-scene`` over the whole Landsat scene."""
    from rsvheat.cli import main
    from rsvheat.data import samples
    from rsvheat.trainers.cli import task_cli
    from tests.test_task_training import COMMON, LIGHT, write_config

    scene = samples.sample_scene_path()
    samples.write_segmentation(tmp_path / "seg", tile=64, stride=160)
    samples.write_change(tmp_path / "cd", tile=64, stride=192)
    classes = samples.write_detection(tmp_path / "det", tile=64, count=4)
    det = {"images": str(tmp_path / "det/JPEGImages"), "annotations": str(tmp_path / "det/Annotations")}
    runs = {
        "seg": (
            {"class_path": "rsvheat.trainers.SegmentationTask", "init_args": {"num_classes": 3, "img_size": 64}},
            {
                "class_path": "rsvheat.datamodules.SegmentationDataModule",
                "init_args": {
                    "train_root": str(tmp_path / "seg/train"),
                    "val_root": str(tmp_path / "seg/val"),
                    "num_classes": 3,
                    "crop_size": 64,
                },
            },
        ),
        "cd": (
            {"class_path": "rsvheat.trainers.ChangeDetectionTask", "init_args": {"img_size": 64}},
            {
                "class_path": "rsvheat.datamodules.ChangeDetectionDataModule",
                "init_args": {
                    "train_root": str(tmp_path / "cd/train"),
                    "val_root": str(tmp_path / "cd/train"),
                    "crop_size": 64,
                },
            },
        ),
        "det": (
            {
                "class_path": "rsvheat.trainers.DetectionTask",
                "init_args": {
                    "num_classes": 2,
                    "img_size": 64,
                    "min_size": 64,
                    "max_size": 64,
                    "detector_kwargs": LIGHT,
                },
            },
            {"class_path": "rsvheat.datamodules.DetectionDataModule", "init_args": {"train": det, "val": det}},
        ),
    }
    for name, (model, data) in runs.items():
        model["init_args"].update(COMMON)
        data["init_args"].update(batch_size=4, num_workers=0)
        task_cli(["fit", "--config", write_config(tmp_path / f"{name}.yaml", model, data, tmp_path / name)])
    ckpt = {name: str(tmp_path / name / "checkpoints/last.ckpt") for name in runs}

    out = tmp_path / "out"
    main(
        [
            "predict-scene",
            ckpt["seg"],
            str(scene),
            "-o",
            str(out / "classes.tif"),
            "--probabilities",
            str(out / "probs.tif"),
            "--tile",
            "128",
            "--overlap",
            "32",
        ]
    )
    with rasterio.open(scene) as src, rasterio.open(out / "classes.tif") as pred, rasterio.open(out / "probs.tif") as p:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        labels, nodata = pred.read(1), src.dataset_mask() == 0
        assert (labels[nodata] == 255).all() and set(np.unique(labels[~nodata])) <= {0, 1, 2}
        np.testing.assert_allclose(p.read()[:, ~nodata].sum(0), 1.0, atol=1e-4)  # probabilities per pixel
        assert p.descriptions == ("0", "1", "2")  # no class names configured: the ids
    with pytest.raises(FileExistsError, match=r"classes\.tif exists"):
        main(["predict-scene", ckpt["seg"], str(scene), "-o", str(out / "classes.tif")])

    main(["predict-scene", ckpt["cd"], str(scene), str(scene), "-o", str(out / "change.tif"), "--tile", "128"])
    with rasterio.open(out / "change.tif") as pred:
        change = pred.read(1)
        assert pred.crs is not None and set(np.unique(change)) <= {0, 1, 255} and (change[nodata] == 255).all()

    main(["predict-scene", ckpt["det"], str(scene), "-o", str(out / "boxes.geojson"), "--tile", "128"])
    boxes = json.loads((out / "boxes.geojson").read_text())
    assert boxes["type"] == "FeatureCollection"
    for feature in boxes["features"]:
        assert feature["properties"]["class"] in classes
        lon, lat = feature["geometry"]["coordinates"][0][0]
        assert -79 < lon < -76 and 23 < lat < 26  # the scene (UTM 18N) covers part of the Bahamas: lon/lat
