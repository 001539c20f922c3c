"""Heat maps: the recorded fields obey the physics (no diffusion at k = 0, only the mean survives at large k), and
``explain_scene`` / ``rsvheat explain`` draw every block for optical and SAR rasters, whole or tiled."""

import numpy as np
import pytest
import rasterio
import torch

from rsvheat.explain import explain_scene, heat_fields
from tests.conftest import micro_model
from tests.rasters import ramp, write


def test_fields_shapes_and_kt_match_the_model():
    model = micro_model().eval()
    x = torch.randn(2, 3, 70, 90)
    fields = heat_fields(model, x)
    assert sorted(fields) == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert fields[(0, 0)]["source"].shape == (2, 18, 23)  # stage 1 at stride 4: ceil(70/4), ceil(90/4)
    assert fields[(3, 0)]["conducted"].shape == (2, 3, 3)
    # the SCE correction is visible: the corrected field differs from what entered the operator
    assert fields[(0, 0)]["entering"].shape == fields[(0, 0)]["corrected"].shape == (2, 18, 23)
    assert not torch.allclose(fields[(0, 0)]["entering"], fields[(0, 0)]["corrected"])
    stage = model.stages[1]
    fve, _ = stage.embeddings((9, 12))
    expected = torch.relu(stage.blocks[0].hco.to_k(fve)).mean(-1)
    torch.testing.assert_close(fields[(1, 0)]["kt"], expected)


def test_no_diffusion_at_zero_k_and_only_the_mean_at_large_k():
    model = micro_model().eval()
    hco = model.stages[0].blocks[0].hco
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hco.to_k.weight.zero_()
        hco.to_k.bias.zero_()
    still = heat_fields(model, x)[(0, 0)]
    torch.testing.assert_close(still["conducted"], still["source"], rtol=1e-5, atol=1e-6)
    assert still["kt"].abs().max() == 0

    with torch.no_grad():
        hco.to_k.bias.fill_(1e4)
    captured = {}
    handle = hco.register_forward_hook(lambda m, a, o: captured.update(u=m.forward(*a, return_states=True)[1]))
    with torch.no_grad():
        model(x)
    handle.remove()
    conducted = captured["u"]["conducted"][0]  # (H, W, C): every channel flattened to its spatial mean
    source = captured["u"]["source"][0]
    torch.testing.assert_close(conducted, source.mean((0, 1), keepdim=True).expand_as(conducted), rtol=0, atol=1e-5)


@pytest.mark.parametrize("modality, channels", [("optical", 3), ("sar", 1)])
def test_explain_scene_optical_and_sar_whole_and_tiled(tmp_path, modality, channels):
    data = ramp(channels, 150, 110, np.float32, 0.1) - 20.0  # SAR-like dB values
    data[:, :20, :20] = -9999
    path = write(tmp_path / "scene.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = -9999
    model = micro_model(modalities={"optical": 3, "sar": 1})
    whole = explain_scene(model, path, tmp_path / "whole", modality, tile=1024)
    tiled = explain_scene(model, path, tmp_path / "tiled", modality, tile=64)
    names = ["summary", "stage1_block1", "stage2_block1", "stage3_block1", "stage3_block2", "stage4_block1"]
    assert list(whole) == names and list(tiled) == names
    for figure in (*whole.values(), *tiled.values()):
        assert figure.stat().st_size > 5000
    with pytest.raises(ValueError, match=r"no 'thermal' stem"):
        explain_scene(model, path, tmp_path / "x", "thermal")


def test_explain_cli_with_random_weights(tmp_path, capsys):
    from rsvheat.cli import main

    path = write(tmp_path / "s.tif", ramp(4, 96, 80, np.uint8))
    out = tmp_path / "out"
    main(["explain", str(path), "--out", str(out), "--bands", "3,2,1", "--tile", "64"])
    assert (out / "summary.png").stat().st_size > 5000
    assert len(list(out.glob("stage*_block*.png"))) == 12  # rsvheat_tiny: 2 + 2 + 6 + 2 blocks
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left

    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["explain", str(path), "--out", str(out), "--bands", "3,2,1", "--tile", "32"])
    assert refused.value.code == 2 and f"{out} is not empty (pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", str(path), "--out", str(tmp_path / "small"), "--bands", "3,2,1", "--tile", "16"])
    assert "error: argument --tile: must be at least 32, got 16" in capsys.readouterr().err


def test_explain_overwrite_replaces_the_figures_of_an_earlier_run(tmp_path):
    path = write(tmp_path / "s.tif", ramp(3, 64, 64, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stage3_block9.png").write_bytes(b"from a deeper model")
    (out / "summary.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out is not empty \(pass --overwrite"):
        explain_scene(micro_model(), path, out)
    assert (out / "summary.png").read_bytes() == b"old"
    written = explain_scene(micro_model(), path, out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*(p.name for p in written.values()), "notes.txt"])  # no stale block, no temporary file
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_on_a_png_says_nothing_about_crs(tmp_path, recwarn):
    """Heat maps are figures: an image without georeference loses nothing, so no CRS warning."""
    from rsvheat.cli import main

    path = write(tmp_path / "s.png", ramp(3, 64, 64, np.uint8))
    main(["explain", str(path), "--out", str(tmp_path / "out"), "--model", "vheat_tiny"])
    assert not [w for w in recwarn if "CRS" in str(w.message)]


def test_explain_rgba_reads_alpha_as_the_mask_and_figures_name_the_weights(tmp_path, monkeypatch, capsys):
    """An RGBA PNG without a checkpoint: a 3-band stem, transparent pixels invalid; every heat panel has a colour bar
    and the figures say the weights are a random initialisation."""
    import rsvheat.explain
    from rsvheat.cli import main

    data = ramp(4, 96, 96, np.uint8)
    data[3] = 255
    data[3, :32, :32] = 0  # transparent corner
    path = write(tmp_path / "rgba.png", data)
    seen, figures = {}, []
    real_explain, real_draw, real_save = rsvheat.explain.explain_scene, rsvheat.explain._draw, rsvheat.explain._save_png

    def explain(model, *args, **kwargs):
        seen["modalities"] = dict(model.modalities)
        return real_explain(model, *args, **kwargs)

    def draw(canvases, spectra, rgb, valid, *args):
        seen["valid"] = valid
        return real_draw(canvases, spectra, rgb, valid, *args)

    def save(fig, out, dpi):
        bars = sum(ax.get_label() == "<colorbar>" for ax in fig.axes)
        panels = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
        figures.append((out.name, fig.get_suptitle(), bars, panels))
        return real_save(fig, out, dpi)

    monkeypatch.setattr(rsvheat.explain, "explain_scene", explain)
    monkeypatch.setattr(rsvheat.explain, "_draw", draw)
    monkeypatch.setattr(rsvheat.explain, "_save_png", save)
    main(["explain", str(path), "--out", str(tmp_path / "out")])
    assert seen["modalities"] == {"optical": 3}  # the alpha band is not fed to the stem
    valid = seen["valid"]
    corner = round(32 * valid.shape[0] / 96)
    assert not valid[: corner - 1, : corner - 1].any() and valid[corner + 1 :, :].all()
    assert "alpha band is read as the valid-pixel mask" in capsys.readouterr().out
    name, title, bars, panels = figures[0]
    assert name == "summary.png" and "random initialisation: not learned" in title
    assert bars == 4 * 6  # four stages, six heat panels each
    assert "k·t (random init, not learned)" in panels and "learned k·t" not in panels
    assert all("random initialisation" in t and b == 6 for _, t, b, _ in figures[1:])
    # the user's band selection wins: the alpha band is then an ordinary band
    main(["explain", str(path), "--out", str(tmp_path / "all"), "--bands", "1,2,3,4"])
    assert seen["modalities"] == {"optical": 4}


def test_a_failed_figure_leaves_no_figure_open(tmp_path, monkeypatch):
    """pyplot keeps every open figure for the life of the process: a run that fails while writing closes its own."""
    import matplotlib.pyplot as plt

    import rsvheat.explain

    path = write(tmp_path / "scene.tif", ramp(3, 64, 64, np.float32, 0.1))
    real_save, saved = rsvheat.explain._save_png, []

    def save_twice(fig, out, dpi):
        if len(saved) == 2:
            raise OSError("disk full")
        saved.append(out)
        return real_save(fig, out, dpi)

    monkeypatch.setattr(rsvheat.explain, "_save_png", save_twice)
    plt.close("all")
    with pytest.raises(OSError, match="disk full"):
        explain_scene(micro_model(), path, tmp_path / "heat")
    assert plt.get_fignums() == [] and [p.name for p in saved] == ["summary.png", "stage1_block1.png"]
