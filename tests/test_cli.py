import numpy as np
import pytest

from rsvheat.cli import main
from rsvheat.data import read_raster, sample_scene_path
from rsvheat.demo import normalise_bands


def test_sample_scene_is_the_georeferenced_cc0_landsat_tile():
    image, profile = read_raster(sample_scene_path())
    assert image.shape == (3, 718, 791) and image.dtype == np.uint8
    assert profile["crs"].to_epsg() == 32618 and profile["nodata"] == 0


def test_bad_rasters_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        read_raster(tmp_path / "missing.tif")
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="cannot read raster .*corrupt.tif"):
        read_raster(tmp_path / "corrupt.tif")


def test_band_normalisation_ignores_nodata():
    image = np.zeros((2, 4, 4), np.uint8)
    image[:, 1:3, 1:3] = [[[10, 20], [30, 40]], [[1, 1], [3, 3]]]
    x, valid = normalise_bands(image, nodata=0)
    assert valid.sum() == 4
    np.testing.assert_allclose(x[:, valid].mean(1).numpy(), 0, atol=1e-6)
    np.testing.assert_allclose(x[:, valid].std(1, unbiased=False).numpy(), 1, atol=1e-4)
    assert x[:, ~valid].eq(0).all()


def test_info_prints_both_conventions(capsys):
    main(["info", "--model", "vheat_tiny", "--img-size", "224", "--num-classes", "1000"])
    out = capsys.readouterr().out
    assert "29.56 M" in out and "4.59" in out and "30.85 M" in out


@pytest.mark.slow
def test_demo_writes_a_report(tmp_path):
    main(["demo", "--out", str(tmp_path), "--bench-size", "128"])
    report = (tmp_path / "report.md").read_text()
    assert "max |difference| = 0.0e+00" in report
    assert "| rsvheat_base | 1024² | 148.40 | 148.4 |" in report
    assert (tmp_path / "feature_fields.png").stat().st_size > 10_000
