import numpy as np
import pytest

from rsvheat.cli import main
from rsvheat.data import read_raster, sample_scene_path


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


def test_info_prints_both_conventions(capsys):
    main(["info", "--model", "vheat_tiny", "--img-size", "224", "--num-classes", "1000"])
    out = capsys.readouterr().out
    assert "29.56 M" in out and "4.59" in out and "30.85 M" in out


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    """The README's main job, shortened: pre-train, fine-tune, whole-scene map, heat maps, efficiency, report."""
    import rasterio

    main(["demo", "--out", str(tmp_path), "--pretrain-steps", "4", "--epochs", "2", "--bench-size", "128"])
    report = (tmp_path / "report.md").read_text()
    for section in ("Pre-training", "Fine-tuning", "Whole-scene inference", "Heat maps", "Efficiency"):
        assert f". {section}" in report
    assert "max |difference| = 0.0e+00" in report
    assert "| rsvheat_base | 1024² | 148.40 | 148.4 |" in report
    with rasterio.open(sample_scene_path()) as src, rasterio.open(tmp_path / "scene/land_cover.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        assert set(np.unique(out.read(1))) <= {0, 1, 2, 255}
    assert (tmp_path / "heat_maps/summary.png").stat().st_size > 20_000
    assert (tmp_path / "configs/segmentation.yaml").is_file() and (tmp_path / "pretrain").is_dir()
