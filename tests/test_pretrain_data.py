"""Pre-training data: every on-disk layout (unpaired folders, SEN1-2-like pairs, BigEarthNet) and every failure."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from rsvheat.data.io import ImageReadError, open_raster, read_image
from rsvheat.data.pretrain import (
    BigEarthNetPretrain,
    ImageFolderPretrain,
    PairedFolderPretrain,
    random_crop,
    skipped_count,
)
from rsvheat.datamodules.pretrain import PretrainDataModule, warn_if_memorised
from tests.rasters import ramp, write

IDENTITY = {"optical": {"mean": [0, 0, 0], "std": [1, 1, 1]}, "sar": {"mean": [0], "std": [1]}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVHEAT_CACHE", str(tmp_path / "cache"))


def test_formats_bands_and_normalisation(tmp_path):
    write(tmp_path / "opt/a.png", ramp(3, 40, 48))
    write(tmp_path / "opt/sub/b.jpg", ramp(3, 40, 40))
    write(tmp_path / "opt/c.tif", ramp(5, 40, 40, np.uint16, 50.0))
    ds = ImageFolderPretrain(tmp_path / "opt", channels=3, bands=[3, 2, 1], crop_size=32)
    assert len(ds) == 3
    item = ds[0]
    assert set(item) == {"optical"} and item["optical"].shape == (3, 32, 32) and item["optical"].dtype == torch.float32
    # statistics were computed from the data: normalised whole images have mean 0, std 1 per band over the set
    raw = [ds.read_raw(i)["optical"] for i in range(3)]
    pixels = np.concatenate([r.reshape(3, -1) for r in raw], axis=1)
    np.testing.assert_allclose(ds.stats["optical"]["mean"], pixels.mean(1), rtol=1e-6)
    np.testing.assert_allclose(ds.stats["optical"]["std"], pixels.std(1), rtol=1e-5)
    # band selection is 1-based and ordered as given
    np.testing.assert_array_equal(read_image(tmp_path / "opt/c.tif", [3, 2, 1])[0], ramp(5, 40, 40, np.uint16, 50.0)[2])


def test_stats_are_cached(tmp_path):
    write(tmp_path / "opt/a.tif", ramp(3, 40, 40))
    first = ImageFolderPretrain(tmp_path / "opt", crop_size=32)
    cached = list((tmp_path / "cache" / "stats").glob("*.json"))
    assert len(cached) == 1
    json.dump({"optical": {"mean": [1, 2, 3], "std": [4, 5, 6]}}, cached[0].open("w"))
    second = ImageFolderPretrain(tmp_path / "opt", crop_size=32)  # reads the cache, does not recompute
    assert second.stats["optical"]["mean"] == [1, 2, 3] and first.stats != second.stats
    write(tmp_path / "opt/a.tif", 2 * ramp(3, 40, 40))  # the file is replaced: its statistics are recomputed
    third = ImageFolderPretrain(tmp_path / "opt", crop_size=32)
    assert third.stats["optical"]["mean"] != [1, 2, 3] and len(list((tmp_path / "cache/stats").glob("*.json"))) == 2


def test_small_images_are_upsampled_and_crops_are_random():
    x = {"optical": torch.arange(3 * 20 * 30, dtype=torch.float32).view(3, 20, 30)}
    crop = random_crop(x, 24)["optical"]
    assert crop.shape == (3, 24, 24)
    torch.manual_seed(1)
    big = {"optical": torch.randn(3, 100, 100)}
    assert not torch.equal(random_crop(big, 32)["optical"], random_crop(big, 32)["optical"])


def test_zoom_out_covers_a_wider_window_on_the_same_grid_for_every_modality():
    cols = torch.arange(128, dtype=torch.float64).expand(128, 128)
    pair = {"optical": cols.expand(3, 128, 128).clone(), "sar": cols[None].clone()}
    for zoom, step in (((1.0, 1.0), 1.0), ((2.0, 2.0), 2.0), ((8.0, 8.0), 4.0)):  # 8 is capped by the 128-px side
        crop = random_crop(pair, 32, zoom)
        assert crop["optical"].shape == (3, 32, 32) and crop["sar"].shape == (1, 32, 32)
        expected = torch.full((3, 32, 29), step, dtype=torch.float64)
        torch.testing.assert_close(crop["optical"][:, :, 1:-1].diff(dim=-1), expected)
        torch.testing.assert_close(crop["sar"][0], crop["optical"][0])
    torch.manual_seed(0)
    widths = {round(float(random_crop(pair, 16, (1.0, 8.0))["sar"].diff(dim=-1)[0, 5, 5])) for _ in range(40)}
    assert min(widths) <= 2 and max(widths) >= 6  # drawn over the range, not pinned to an end
    with pytest.raises(ValueError, match="zoom_out"):
        ImageFolderPretrain(".", crop_size=32, zoom_out=(0.5, 2.0))


def test_sar_linear_to_db(tmp_path):
    write(tmp_path / "sar/a.tif", np.full((1, 32, 32), 0.01, np.float32))
    ds = ImageFolderPretrain(tmp_path / "sar", "sar", channels=1, sar_scale="linear", crop_size=32)
    np.testing.assert_allclose(ds.read_raw(0)["sar"], -20.0, rtol=1e-6)


def test_paired_sen12_layout_aligns_crops(tmp_path):
    optical = ramp(3, 64, 64, np.float32) + np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32)
    for p in (1, 2):
        write(tmp_path / f"pairs/s2/ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p{p}.tif", optical)
        write(tmp_path / f"pairs/s1/ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p{p}.tif", optical[:1])
    ds = PairedFolderPretrain(tmp_path / "pairs", crop_size=32, stats=IDENTITY)
    assert len(ds) == 2
    item = ds[1]
    assert item["optical"].shape == (3, 32, 32) and item["sar"].shape == (1, 32, 32)
    torch.testing.assert_close(item["sar"][0], item["optical"][0])  # the same window in both images


def test_paired_same_names(tmp_path):
    write(tmp_path / "pairs/s2/x.png", ramp(3, 32, 32))
    write(tmp_path / "pairs/s1/x.tif", ramp(1, 32, 32, np.float32))
    assert len(PairedFolderPretrain(tmp_path / "pairs", crop_size=32)) == 1
    write(tmp_path / "pairs/s2/x.tif", ramp(3, 32, 32))  # two optical files of one name: one would be dropped
    with pytest.raises(ImageReadError, match=r"x\.png and .*x\.tif have the same name"):
        PairedFolderPretrain(tmp_path / "pairs", crop_size=32)


def write_bigearthnet(root, n=2, size=24):
    s1, s2 = root / "S1", root / "S2"
    for i in range(n):
        s2_name, s1_name = f"S2A_MSIL2A_2017_{i}_1", f"S1A_IW_GRDH_2017_{i}_1"
        for band, res in (("B02", size), ("B03", size), ("B04", size), ("B05", size // 2)):
            write(s2 / s2_name / f"{s2_name}_{band}.tif", ramp(1, res, res, np.uint16, 30.0))
        for pol in ("VV", "VH"):
            write(s1 / s1_name / f"{s1_name}_{pol}.tif", -ramp(1, size, size, np.float32, 0.3))
        meta = {"labels": ["Coniferous forest"], "corresponding_s2_patch": s2_name}
        (s1 / s1_name / f"{s1_name}_labels_metadata.json").write_text(json.dumps(meta))
    return s1, s2


def test_bigearthnet_layout_resamples_bands(tmp_path):
    s1, s2 = write_bigearthnet(tmp_path)
    ds = BigEarthNetPretrain(s1, s2, s2_bands=("B04", "B05"), s1_bands=("VV", "VH"), crop_size=16)
    raw = ds.read_raw(0)
    assert raw["optical"].shape == (2, 24, 24) and raw["sar"].shape == (2, 24, 24)  # 20 m band on the 10 m grid
    item = ds[0]
    assert item["optical"].shape == (2, 16, 16) and item["sar"].shape == (2, 16, 16)


def test_datamodule_combines_sources(tmp_path):
    write(tmp_path / "opt/a.tif", ramp(3, 40, 40))
    write(tmp_path / "opt/b.tif", ramp(3, 40, 40))
    write(tmp_path / "sar/a.tif", ramp(1, 40, 40, np.float32))
    s1, s2 = write_bigearthnet(tmp_path)
    dm = PretrainDataModule(
        optical_dirs=[str(tmp_path / "opt")],
        sar_dirs=[str(tmp_path / "sar")],
        bigearthnet_s1=str(s1),
        bigearthnet_s2=str(s2),
        crop_size=16,
        batch_size=2,
        num_workers=0,
        repeat=2,
    )
    dm.setup("fit")
    batch, *_ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"optical", "sar", "bigearthnet"}
    assert batch["optical"]["optical"].shape == (2, 3, 16, 16)
    assert batch["sar"]["sar"].shape == (2, 1, 16, 16)
    assert set(batch["bigearthnet"]) == {"optical", "sar"}


def test_a_source_far_smaller_than_another_is_flagged():
    sizes = {"optical": torch.zeros(400), "bigearthnet": torch.zeros(6), "sar": torch.zeros(40)}
    with pytest.warns(UserWarning, match=r"source 'bigearthnet' has 6 images against 400 in 'optical'.* ~66 times"):
        warn_if_memorised(sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_memorised({"optical": torch.zeros(400), "sar": torch.zeros(40)})  # 10x: cycled, not memorised


# --- bad input ----------------------------------------------------------------------------------------------------


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no usable images in .*empty"):
        ImageFolderPretrain(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderPretrain(tmp_path / "nope")
    with pytest.raises(ValueError, match="no pre-training data"):
        PretrainDataModule()


def test_corrupt_file_is_named(tmp_path):
    write(tmp_path / "opt/good.tif", ramp(3, 32, 32))
    (tmp_path / "opt/bad.tif").write_bytes(b"II*\x00 definitely not a tiff")
    with pytest.raises(ImageReadError, match="bad.tif"):
        ImageFolderPretrain(tmp_path / "opt", crop_size=32)
    with pytest.warns(UserWarning, match="bad.tif"):
        ds = ImageFolderPretrain(tmp_path / "opt", crop_size=32, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 1


def test_open_raster_names_the_file_and_keeps_quiet_about_georeferencing(tmp_path):
    path = write(tmp_path / "plain.png", ramp(3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PNG has no CRS: no NotGeoreferencedWarning for it
        with open_raster(path) as src:
            assert src.read().shape == (3, 32, 32)
    with pytest.raises(ImageReadError, match=r"^SAR raster not found: .*missing\.tif$"):
        open_raster(tmp_path / "missing.tif", "SAR raster").__enter__()
    (tmp_path / "bad.tif").write_bytes(b"II*\x00 definitely not a tiff")
    with pytest.raises(ImageReadError, match=r"^cannot read image .*bad\.tif: "):
        open_raster(tmp_path / "bad.tif").__enter__()


def test_truncated_file_is_named_when_read(tmp_path):
    write(tmp_path / "opt/a.tif", ramp(3, 32, 32))
    path = write(tmp_path / "opt/b.tif", np.random.default_rng(0).integers(0, 255, (3, 256, 256), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = ImageFolderPretrain(tmp_path / "opt", crop_size=32, stats=IDENTITY)  # headers are fine
    with pytest.raises(ImageReadError, match="b.tif"):
        ds[1]
    lenient = ImageFolderPretrain(tmp_path / "opt", crop_size=32, stats=IDENTITY, skip_bad=True)
    with pytest.warns(UserWarning, match="b.tif"):
        assert lenient[1]["optical"].shape == (3, 32, 32)  # another image instead
    assert skipped_count(ConcatDataset([lenient, lenient])) == 2  # remembered, counted per dataset
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not read (nor warned about) again
        for _ in range(3):
            assert lenient[1]["optical"].shape == (3, 32, 32)
    # workers mark it in shared memory: a DataLoader worker's skip is counted in the main process
    fresh = ImageFolderPretrain(tmp_path / "opt", crop_size=32, stats=IDENTITY, skip_bad=True)
    next(iter(DataLoader(fresh, batch_size=2, num_workers=1)))  # (the worker's warning stays in the worker)
    assert skipped_count(fresh) == 1


def test_wrong_band_count_is_named(tmp_path):
    write(tmp_path / "opt/a.tif", ramp(3, 32, 32))
    write(tmp_path / "opt/four.tif", ramp(4, 32, 32))
    with pytest.raises(ImageReadError, match=r"four.tif: expected 3 optical band\(s\), got 4"):
        ImageFolderPretrain(tmp_path / "opt", crop_size=32)
    with pytest.raises(ImageReadError, match=r"bands \[5\] requested, the file has 3"):
        ImageFolderPretrain(tmp_path / "opt", channels=1, bands=[5], crop_size=32)


def test_nan_pixels_are_named(tmp_path):
    data = np.ones((1, 32, 32), np.float32)
    data[0, 3, 4] = np.nan
    write(tmp_path / "sar/nan.tif", data)
    with pytest.raises(ImageReadError, match=r"nan.tif: 1 NaN/Inf"):
        ImageFolderPretrain(tmp_path / "sar", "sar", channels=1, crop_size=32)


def test_missing_partner_and_mismatched_pair(tmp_path):
    write(tmp_path / "pairs/s2/a.tif", ramp(3, 32, 32))
    write(tmp_path / "pairs/s1/a.tif", ramp(1, 32, 32))
    write(tmp_path / "pairs/s1/lonely.tif", ramp(1, 32, 32))
    with pytest.raises(ImageReadError, match="lonely.tif: no optical partner"):
        PairedFolderPretrain(tmp_path / "pairs", crop_size=32)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        assert len(PairedFolderPretrain(tmp_path / "pairs", crop_size=32, skip_bad=True)) == 1
    (tmp_path / "pairs/s1/lonely.tif").unlink()
    write(tmp_path / "pairs/s2/b.tif", ramp(3, 32, 32))
    write(tmp_path / "pairs/s1/b.tif", ramp(1, 40, 40))
    with pytest.raises(ImageReadError, match="mismatched image pair: .*b.tif is 32x32, .*b.tif is 40x40"):
        PairedFolderPretrain(tmp_path / "pairs", crop_size=32)


def test_optical_without_sar_partner_is_named(tmp_path):
    write(tmp_path / "pairs/s2/a.tif", ramp(3, 32, 32))
    write(tmp_path / "pairs/s1/a.tif", ramp(1, 32, 32))
    write(tmp_path / "pairs/s2/sub/alone.tif", ramp(3, 32, 32))
    with pytest.raises(ImageReadError, match=r"sub/alone.tif: no SAR partner in .*pairs/s1"):
        PairedFolderPretrain(tmp_path / "pairs", crop_size=32)
    with pytest.warns(UserWarning, match="skipped 1 bad file"):
        ds = PairedFolderPretrain(tmp_path / "pairs", crop_size=32, skip_bad=True)
    assert len(ds) == 1 and skipped_count(ds) == 1


def test_bigearthnet_missing_partner(tmp_path):
    s1, s2 = write_bigearthnet(tmp_path)
    for f in (s2 / "S2A_MSIL2A_2017_1_1").iterdir():
        f.unlink()
    (s2 / "S2A_MSIL2A_2017_1_1").rmdir()
    with pytest.raises(ImageReadError, match="S1A_IW_GRDH_2017_1_1: its S2 partner .* is missing"):
        BigEarthNetPretrain(s1, s2, crop_size=16)


def test_bigearthnet_sar_is_always_decibels(tmp_path):
    s1, s2 = write_bigearthnet(tmp_path)
    with pytest.raises(ValueError, match="stored in dB: sar_scale must be 'db'"):
        BigEarthNetPretrain(s1, s2, crop_size=16, sar_scale="linear")
    # a linear-power SAR folder next to BigEarthNet converts that folder only
    write(tmp_path / "sar/a.tif", np.full((1, 32, 32), 0.01, np.float32))
    dm = PretrainDataModule(
        sar_dirs=[str(tmp_path / "sar")],
        bigearthnet_s1=str(s1),
        bigearthnet_s2=str(s2),
        sar_scale="linear",
        crop_size=16,
        num_workers=0,
    )
    datasets = dm.build_datasets()
    assert datasets["sar"].read_raw(0)["sar"].max() == pytest.approx(-20.0)
    ben = datasets["bigearthnet"]
    vv = read_image(s1 / "S1A_IW_GRDH_2017_0_1/S1A_IW_GRDH_2017_0_1_VV.tif")
    assert ben.sar_scale == "db" and np.array_equal(ben.read_raw(0)["sar"], vv)  # as stored, not "converted"


def test_channel_mismatch_between_data_and_model(tmp_path):
    s1, s2 = write_bigearthnet(tmp_path)
    dm = PretrainDataModule(
        bigearthnet_s1=str(s1),
        bigearthnet_s2=str(s2),
        bigearthnet_s1_bands=("VV", "VH"),
        modalities={"optical": 3, "sar": 1},
        crop_size=16,
    )
    with pytest.raises(ValueError, match=r"BigEarthNet gives 2 sar band\(s\), the model's stem takes 1"):
        dm.setup("fit")
