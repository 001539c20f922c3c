"""Whole-scene inference: exact tiling, nodata, georeference round trip, COG output, atomic writes, bad input, and
``rsvheat predict-scene`` with fine-tuned checkpoints of each dense task and of detection."""

import errno
import json
import os
import warnings

import numpy as np
import pytest
import rasterio
import rasterio.io
import rasterio.shutil
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin
from rasterio.warp import transform as reproject_points
from rasterio.windows import Window

from rsvheat.data.io import ImageReadError
from rsvheat.inference import sliding_window
from rsvheat.inference.scene import (
    CLASS_COLOURS,
    Input,
    Scene,
    class_legend,
    dense_strips,
    detect_scene,
    write_box_json,
    write_dense,
    write_geojson,
)
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


def tapered_blend(image, predict, tile, overlap, taper=True):
    """The documented blend, written independently: windows of ``tile`` (clipped to the image) every
    ``tile - overlap`` pixels plus one ending at the border; each weighted by a separable ramp ``k / (r + 1)``,
    ``k = 1..r``, ``r = min(overlap, window // 2)``, on the sides shared with a neighbour (flat at the image border);
    the weighted sum divided by the summed weights. ``taper=False``: plain averaging (all weights 1)."""
    _, height, width = image.shape
    th, tw = min(tile, height), min(tile, width)
    overlap = min(overlap, th - 1, tw - 1)

    def starts(length, size):
        return [0] if length <= size else [*range(0, length - size, size - overlap), length - size]

    def weights(size, start, length):
        w = np.ones(size)
        r = min(overlap, size // 2) if taper else 0
        ramp_up = np.arange(1, r + 1) / (r + 1)
        if r and start > 0:
            w[:r] = ramp_up
        if r and start + size < length:
            w[-r:] = ramp_up[::-1]
        return w

    total, norm = None, np.zeros((height, width))
    for top in starts(height, th):
        for left in starts(width, tw):
            pred = predict(image[:, top : top + th, left : left + tw])
            if total is None:
                total = np.zeros((pred.shape[0], height, width))
            w = np.outer(weights(th, top, height), weights(tw, left, width))
            total[:, top : top + th, left : left + tw] += pred * w
            norm[top : top + th, left : left + tw] += w
    return total / norm


@pytest.mark.parametrize("tile, overlap, batch", [(64, 16, 3), (48, 0, 2), (100, 37, 1), (96, 60, 4)])
def test_blending_weights_match_the_documented_taper(tmp_path, tile, overlap, batch):
    """A fixed random convolution with zero padding: each tile's output near its edges depends on where the tile
    was cut, so the blended scene depends on the weights (unlike an identity model, which any weights reproduce)."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 157, 203)).astype(np.float32)
    kernel = torch.from_numpy(rng.normal(size=(2, 3, 5, 5)).astype(np.float32))

    def conv(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, padding=2)

    def conv_np(tile_data):
        return conv(torch.from_numpy(np.ascontiguousarray(tile_data))[None])[0].double().numpy()

    expected = tapered_blend(data, conv_np, tile, overlap)
    with scene_of(write(tmp_path / "s.tif", data)) as scene:
        _, values, valid = assemble(
            dense_strips(scene, lambda b: conv(identity(b)), 2, tile, overlap, batch, progress=False), 157
        )
    assert valid.all()
    np.testing.assert_allclose(values, expected, rtol=0, atol=2e-4)
    reference = sliding_window(conv, torch.from_numpy(data)[None], tile=tile, overlap=overlap)[0].numpy()
    np.testing.assert_allclose(values, reference, rtol=0, atol=2e-4)
    # the setting can tell weights apart: plain averaging of the same tile outputs gives another scene
    if overlap > 0:
        averaged = tapered_blend(data, conv_np, tile, overlap, taper=False)
        assert np.abs(averaged - expected).max() > 0.1


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
            (out, lambda v: (v[:1] > 0.5).astype(np.uint8), 1, "uint8", 255, None, class_legend(["sea", "land"])),
            (probs, lambda v: v, 3, "float32", -1.0, ["r", "g", "b"], None),
        ]
        write_dense(scene, strips, targets)
    with rasterio.open(path) as src, rasterio.open(out) as pred, rasterio.open(probs) as p:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.nodata == 255 and p.descriptions == ("r", "g", "b")
        assert pred.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        # a paletted class map that names its classes, also after the COG conversion
        colours = pred.colormap(1)
        assert colours[0] == (*CLASS_COLOURS[0], 255) and colours[1] == (*CLASS_COLOURS[1], 255)
        assert colours[255][3] == 0  # nodata: transparent
        tags = pred.tags(1)
        assert json.loads(tags["CLASS_NAMES"]) == ["sea", "land"] and tags["CLASS_1"] == "land"
        with pytest.raises(ValueError):
            p.colormap(1)  # probabilities are not a class map
        labels = pred.read(1)
        assert (labels[:40, :40] == 255).all()
        expected = (data[0] / 300 > 0.5).astype(np.uint8)
        np.testing.assert_array_equal(labels[40:, 40:], expected[40:, 40:])
        np.testing.assert_allclose(p.read(2, window=Window(50, 60, 10, 10)), data[1, 60:70, 50:60] / 300, atol=1e-5)
    assert sorted(f.name for f in out.parent.iterdir()) == ["map.tif", "probs.tif"]  # no temporary files left


def test_refuses_existing_output_and_leaves_nothing_after_a_full_disk(tmp_path, monkeypatch):
    path = write(tmp_path / "s.tif", ramp(3, 100, 100, np.uint8))
    out = tmp_path / "map.tif"
    out.write_bytes(b"keep me")
    target = [(out, lambda v: v[:1], 1, "uint8", 255, None, None)]
    with scene_of(path) as scene, pytest.raises(FileExistsError, match=r"map\.tif exists \(pass --overwrite"):
        write_dense(scene, dense_strips(scene, identity, 3, 64, 16, progress=False), target)
    assert out.read_bytes() == b"keep me"

    writes = []
    real_write = rasterio.io.DatasetWriter.write

    def disk_fills_up(self, *args, **kwargs):
        writes.append(1)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", disk_fills_up)
    fresh = tmp_path / "fresh.tif"
    with scene_of(path) as scene, pytest.raises(OSError, match="No space left"):
        write_dense(scene, dense_strips(scene, identity, 3, 32, 8, 1, progress=False), [(fresh, *target[0][1:])])
    assert len(writes) == 3  # it failed in the raster write, midway
    assert sorted(f.name for f in tmp_path.iterdir()) == ["map.tif", "s.tif"]


def test_outputs_appear_together_and_replace_old_ones_together(tmp_path, monkeypatch):
    """A class map and its probabilities never mix runs: no output appears before all are complete (COG included),
    and with ``overwrite`` a failure while renaming leaves the old pair."""
    path = write(tmp_path / "s.tif", ramp(3, 90, 100, np.uint8))
    out = tmp_path / "out"
    classes, probs = out / "classes.tif", out / "probs.tif"

    def run(**kwargs):
        targets = [
            (classes, lambda v: (v[:1] > 100).astype(np.uint8), 1, "uint8", 255, None, None),
            (probs, lambda v: v / 255, 3, "float32", -1.0, None, None),
        ]
        with scene_of(path) as scene:
            return write_dense(scene, dense_strips(scene, identity, 3, 64, 16, progress=False), targets, **kwargs)

    real_copy = rasterio.shutil.copy
    copies = []

    def copy_fills_the_disk(src, dst, **kwargs):
        copies.append(dst)
        if len(copies) == 2:  # the class map is complete (COG and all), the probabilities are not
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(rasterio.shutil, "copy", copy_fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        run()
    assert len(copies) == 2 and not out.exists()  # no output, no temporary, not even the folder made for them
    monkeypatch.setattr(rasterio.shutil, "copy", real_copy)

    out.mkdir()
    classes.write_bytes(b"old classes")
    probs.write_bytes(b"old probabilities")
    real_replace = os.replace

    def rename_fails_for_probs(src, dst):
        if os.fspath(dst) == os.fspath(probs) and os.path.basename(src) == "probs.tif":
            raise OSError(errno.EIO, "Input/output error", os.fspath(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", rename_fails_for_probs)
    with pytest.raises(OSError, match="Input/output error"):
        run(overwrite=True)
    # the new class map was already in place: it is taken back, and the old pair restored
    assert classes.read_bytes() == b"old classes" and probs.read_bytes() == b"old probabilities"
    assert sorted(f.name for f in out.iterdir()) == ["classes.tif", "probs.tif"]
    monkeypatch.setattr(os, "replace", real_replace)

    run(overwrite=True)
    with rasterio.open(classes) as c, rasterio.open(probs) as p:
        assert c.count == 1 and p.count == 3
        np.testing.assert_allclose(p.read(1), ramp(3, 90, 100, np.uint8)[0] / 255, atol=1e-6)
    assert sorted(f.name for f in out.iterdir()) == ["classes.tif", "probs.tif"]


def test_bad_scenes_are_named(tmp_path):
    good = write(tmp_path / "a.tif", ramp(3, 64, 64, np.uint8))
    stride = r"a\.tif: tile \(16\) is smaller than the model's output stride \(32"
    with pytest.raises(ValueError, match=stride), scene_of(good) as scene:
        next(dense_strips(scene, identity, 3, 16, 4, progress=False))
    with pytest.raises(ImageReadError, match=r"thin\.tif is 20×64 px: the model needs at least 32 px on each side"):
        scene_of(write(tmp_path / "thin.tif", ramp(3, 20, 64, np.uint8)))
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
    opened = []
    real_open = rasterio.open

    def tracking_open(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rasterio, "open", tracking_open)
        with pytest.raises(ImageReadError, match=r"different CRS: .*a\.tif is EPSG:32633, .*c\.tif is EPSG:32632"):
            scene_of(good, other_crs, roles=roles)
    assert len(opened) == 2 and all(src.closed for src in opened)  # nothing left open by the refusal
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
        (out,) = write_dense(scene, strips, [(tmp_path / "m.tif", lambda v: v[:1], 1, "uint8", 255, None, None)])
        with rasterio.open(out) as pred:
            assert pred.crs is None and pred.shape == (80, 70) and pred.transform.is_identity


def test_scene_without_crs_keeps_its_transform(tmp_path):
    """A grid without CRS (e.g. a local engineering grid) is still a grid: outputs keep the transform."""
    path = write(tmp_path / "local.tif", ramp(3, 80, 70, np.uint8), crs=None)
    with pytest.warns(UserWarning, match=r"local\.tif has a transform but no CRS"):
        scene = scene_of(path)
    boxes = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 50.0]]), "labels": torch.tensor([1]), "scores": torch.ones(1)}
    with scene, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strips = dense_strips(scene, identity, 3, 64, 16, progress=False)
        (out,) = write_dense(scene, strips, [(tmp_path / "m.tif", lambda v: v[:1], 1, "uint8", 255, None, None)])
        # GeoJSON holds longitude/latitude, which a grid without CRS cannot give: refused, plain JSON instead
        with pytest.raises(ValueError, match=r"local\.tif has no CRS.*name the output \.json"):
            write_geojson(scene, boxes, ["thing"], tmp_path / "b.geojson")
        listed = json.loads(write_box_json(scene, boxes, ["thing"], tmp_path / "b.json").read_text())
    with rasterio.open(path) as src, rasterio.open(out) as pred:
        assert pred.crs is None and not pred.transform.is_identity and pred.transform == src.transform
    assert listed["crs"] is None and not (tmp_path / "b.geojson").exists()
    (box,) = listed["boxes"]
    assert box["bbox_xyxy"] == [10.0, 20.0, 30.0, 50.0] and box["class"] == "thing"
    assert box["bbox_map"] == [400100.0, 5299500.0, 400300.0, 5299800.0]  # through the transform


def shoelace(ring):
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True)) / 2


def test_geojson_boxes_in_lon_lat_and_in_the_scene_crs(tmp_path):
    """Known boxes on a known UTM 18N grid (origin 400 000 E, 5 300 000 N, 10 m pixels)."""
    path = write(tmp_path / "utm.tif", ramp(3, 64, 80, np.uint8), crs="EPSG:32618")
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0], [0.5, 0.0, 80.0, 64.0]])
    detections = {"boxes": boxes, "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.1234567])}
    out = tmp_path / "boxes.geojson"
    with scene_of(path) as scene:
        transform = scene.transform
        write_geojson(scene, detections, ["car", "ship"], out)
        with pytest.raises(FileExistsError, match=r"boxes\.geojson exists"):
            write_geojson(scene, detections, ["car", "ship"], out)
    collection = json.loads(out.read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 2
    first, second = collection["features"]
    assert first["properties"] == {
        "class": "ship",
        "label": 1,  # the index in the class list
        "score": 0.9,
        "bbox_xyxy": [10.0, 20.0, 30.0, 50.0],
        "bbox_map": [400100.0, 5299500.0, 400300.0, 5299800.0],
        "crs": "EPSG:32618",
    }
    assert second["properties"]["class"] == "car" and second["properties"]["score"] == 0.1235
    for feature, box in zip(collection["features"], boxes.tolist(), strict=True):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert shoelace(ring) > 0  # counter-clockwise exterior ring (RFC 7946 §3.1.6)
        x1, y1, x2, y2 = box
        corners = [transform @ c for c in [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]]
        lons, lats = reproject_points("EPSG:32618", "EPSG:4326", *map(list, zip(*corners, strict=True)))
        np.testing.assert_allclose(sorted(map(tuple, ring[:-1])), sorted(zip(lons, lats, strict=True)), atol=1e-12)
        assert all(-77 < lon < -75 and 47 < lat < 48 for lon, lat in ring)  # west of 75° W, ~47.8° N: lon/lat
        # round trips: the map box and the lon/lat ring both lead back to the pixel box
        xmin, ymin, xmax, ymax = feature["properties"]["bbox_map"]
        np.testing.assert_allclose([*(~transform @ (xmin, ymax)), *(~transform @ (xmax, ymin))], box, atol=1e-9)
        xs, ys = reproject_points("EPSG:4326", "EPSG:32618", *map(list, zip(*ring[:-1], strict=True)))
        cols, rows = zip(*(~transform @ p for p in zip(xs, ys, strict=True)), strict=True)
        np.testing.assert_allclose([min(cols), min(rows), max(cols), max(rows)], box, atol=1e-6)


def test_detection_across_tiles_merges_duplicates_and_drops_nodata(tmp_path):
    data = np.clip(ramp(3, 200, 300, np.float32) / 3 + 1, 1, 200).astype(np.uint8)
    data[:, 60:90, 100:130] = 250  # one object, seen whole or cut by several overlapping tiles
    data[:, 10:40, 115:145] = 230  # another: the tile ending at x = 128 sees 13 of its 30 columns (IoU 0.43)
    data[:, 150:, 250:] = 0
    path = write(tmp_path / "s.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = 0

    def detect(images):
        """Boxes around the bright pixels (score = visible share of the object) and around nodata (read as 0)."""
        out = []
        for image in images:
            boxes, scores = [], []
            for mask in (image[0] >= 250, image[0] == 230, (image == 0).all(0)):
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
    # duplicates merged (the second object's partial view too, which NMS alone keeps), the nodata box dropped
    assert sorted(found["boxes"].tolist()) == [[100.0, 60.0, 130.0, 90.0], [115.0, 10.0, 145.0, 40.0]]


@pytest.mark.smoke
@pytest.mark.slow
def test_predict_scene_cli_with_fine_tuned_checkpoints(tmp_path, capsys):
    """``rsvheat fit`` (one epoch, micro model) then ``rsvheat predict-scene`` over the whole Landsat scene; the
    segmentation model trained and served through ``torch.compile`` too (the ``eager`` backend: dynamo's capture
    without code generation), with the eager model's checkpoint and outputs."""
    from torch._dynamo.utils import counters

    from rsvheat.apps import samples
    from rsvheat.cli import main
    from rsvheat.trainers.cli import task_cli
    from tests.test_task_training import COMMON, LIGHT, write_config

    scene = samples.sample_scene_path()
    samples.write_segmentation(tmp_path / "seg", tile=64, stride=160)
    samples.write_change(tmp_path / "cd", tile=64, stride=192)
    classes = samples.write_detection(tmp_path / "det", tile=64, count=4)
    det = {"images": str(tmp_path / "det/JPEGImages"), "annotations": str(tmp_path / "det/Annotations")}
    runs = {
        "seg": (
            {
                "class_path": "rsvheat.trainers.SegmentationTask",
                "init_args": {"num_classes": 3, "img_size": 64, "compile": "eager"},
            },
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
                    "box_score_thresh": 0.0,  # keep every box of the one-epoch model: the GeoJSON gets detections
                    "detector_kwargs": LIGHT,
                },
            },
            {"class_path": "rsvheat.datamodules.DetectionDataModule", "init_args": {"train": det, "val": det}},
        ),
    }
    counters.clear()
    for name, (model, data) in runs.items():
        model["init_args"].update(COMMON)
        data["init_args"].update(batch_size=4, num_workers=0)
        task_cli(["fit", "--config", write_config(tmp_path / f"{name}.yaml", model, data, tmp_path / name)])
        if name == "seg":
            assert counters["stats"]["unique_graphs"] > 0  # the network ran compiled
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
        assert json.loads(pred.tags(1)["CLASS_NAMES"]) == ["0", "1", "2"] and len(pred.colormap(1)) >= 3
    counters.clear()
    main(
        ["predict-scene", ckpt["seg"], str(scene), "-o", str(out / "compiled.tif"), "--tile", "128", "--overlap", "32"]
        + ["--compile", "eager"]
    )
    assert counters["stats"]["unique_graphs"] > 0
    with rasterio.open(out / "classes.tif") as eager, rasterio.open(out / "compiled.tif") as compiled:
        np.testing.assert_array_equal(compiled.read(), eager.read())
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["predict-scene", ckpt["seg"], str(scene), "-o", str(out / "classes.tif")])
    assert refused.value.code == 2
    assert capsys.readouterr().err.startswith(f"rsvheat predict-scene: error: {out / 'classes.tif'} exists")

    main(["predict-scene", ckpt["cd"], str(scene), str(scene), "-o", str(out / "change.tif"), "--tile", "128"])
    with rasterio.open(out / "change.tif") as pred:
        change = pred.read(1)
        assert pred.crs is not None and set(np.unique(change)) <= {0, 1, 255} and (change[nodata] == 255).all()
        assert pred.tags(1)["CLASS_1"] == "changed" and pred.colormap(1)[1] == (255, 255, 255, 255)

    main(["predict-scene", ckpt["det"], str(scene), "-o", str(out / "boxes.geojson"), "--tile", "128"])
    boxes = json.loads((out / "boxes.geojson").read_text())
    assert boxes["type"] == "FeatureCollection" and len(boxes["features"]) > 0
    height, width = nodata.shape
    for feature in boxes["features"]:
        properties = feature["properties"]
        assert properties["class"] in classes and properties["crs"] == "EPSG:32618"
        x1, y1, x2, y2 = properties["bbox_xyxy"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        for lon, lat in feature["geometry"]["coordinates"][0]:
            assert -79 < lon < -76 and 23 < lat < 26  # the scene (UTM 18N) covers part of the Bahamas: lon/lat


def test_scene_far_outside_the_training_statistics_is_reported_once(tmp_path):
    """A uint16 scene under a model trained on uint8 images: one warning naming the raster, the band and both
    statistics; a scene like the training data: none."""
    rng = np.random.default_rng(0)
    uint8_stats = {"optical": {"mean": [100.0, 110.0, 90.0], "std": [40.0, 40.0, 40.0]}}
    like = rng.normal(100, 40, (3, 300, 200)).clip(0, 255).astype(np.uint8)
    with scene_of(write(tmp_path / "like.tif", like), stats=uint8_stats) as scene, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scene.check_statistics() is None
    far = rng.normal(1500, 800, (3, 300, 200)).clip(0, 10000).astype(np.uint16)
    far[:, :50] = 0
    path = write(tmp_path / "uint16.tif", far)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = 0  # nodata is left out of the statistics
    with scene_of(path, stats=uint8_stats) as scene, pytest.warns(UserWarning) as caught:
        scene.check_statistics()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{path}: band ") and "(2 other band(s) too)" in message
    mean = float(message.split("has mean ")[1].split(",")[0])
    assert 1400 < mean < 1600 and "training statistics the model normalises it with (mean " in message
    # a selected band is named by its number in the file
    data = np.stack([like[0], like[1], far[2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write(tmp_path / "mixed.tif", data.astype(np.uint16))
    stats = {"optical": {"mean": [90.0, 100.0, 110.0], "std": [40.0] * 3}}
    scene = Scene({"optical": Input(path, "optical", (3, 1, 2))}, {"optical": 3}, stats)
    with scene, pytest.warns(UserWarning, match=r"mixed\.tif: band 3 has mean") as caught:
        scene.check_statistics()
    assert "other band" not in str(caught[0].message)
    # uint8 data read as int8: mean and spread near the training's, but the bright half wraps to negative values
    wrapped = like.astype(np.int16)
    wrapped = np.where(wrapped > 127, wrapped - 256, wrapped).astype(np.int8)
    assert np.all(np.abs(wrapped.mean((1, 2)) - np.array([100, 110, 90])) < 3 * 40)  # the mean test alone: silent
    expected = r"int8\.tif: band \d has mean .* 1-99 % range -1\d\d"
    with scene_of(write(tmp_path / "int8.tif", wrapped), stats=uint8_stats) as scene, pytest.warns(match=expected):
        scene.check_statistics()
