"""Sharing encoders the timm way: rsvheat.save_pretrained writes what timm's local-dir:/hf-hub: loading rebuilds."""

import json

import pytest
import timm
import torch

import rsvheat
from tests.conftest import micro_model

S2 = dict(bands=["B2", "B3", "B4", "B8"], mean=[1200.0, 1100.0, 1000.0, 2500.0], std=[400.0, 380.0, 420.0, 900.0])
SAR = dict(bands=["VV"], mean=[-12.5], std=[4.2], img_size=128)


def _timm_micro(**kwargs):
    """A micro RS-vHeat made through timm (as users make theirs), with a random, non-trivial classifier."""
    arch = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), img_size=64, drop_path_rate=0.0)
    return timm.create_model("rsvheat_tiny", **{**arch, **kwargs}).eval()


@pytest.mark.smoke
def test_config_carries_each_stems_bands_statistics_and_size_and_timm_rebuilds_the_model(tmp_path):
    model = _timm_micro(modalities={"s2": 4, "sar": 1}, num_classes=7)
    folder = rsvheat.save_pretrained(model, tmp_path / "enc", modality_cfg={"s2": S2, "sar": SAR})
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").is_file()
    cfg = config["pretrained_cfg"]
    # the default stem's input, not ImageNet's 3-band mean/std
    assert cfg["input_size"] == [4, 64, 64] and cfg["mean"] == S2["mean"] and cfg["std"] == S2["std"]
    assert config["architecture"] == "rsvheat_tiny" and config["num_classes"] == 7
    stems = config["model_args"]["modality_cfg"]
    assert stems["s2"] == dict(S2, img_size=[64, 64])
    assert stems["sar"] == dict(SAR, img_size=[128, 128])
    assert config["model_args"]["modalities"] == {"s2": 4, "sar": 1}

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()

    def arch(m):  # drop rates are training settings, which timm's config leaves out
        return {k: v for k, v in m.arch_config.items() if k not in ("drop_rate", "drop_path_rate")}

    assert arch(loaded) == arch(model) and loaded.modality_cfg == stems
    with torch.no_grad():
        for name, chans in model.modalities.items():
            x = torch.randn(2, chans, 64, 96)
            torch.testing.assert_close(loaded(x, name), model(x, name), rtol=0, atol=0)
    data = timm.data.resolve_data_config(model=loaded)
    assert tuple(data["mean"]) == tuple(S2["mean"]) and tuple(data["input_size"]) == (4, 64, 64)
    # remote-sensing tiles: resized bilinearly, never centre-cropped (timm's ImageNet defaults are bicubic, 0.875)
    assert (data["interpolation"], data["crop_pct"]) == ("bilinear", 1.0)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\ntags:\n- image-feature-extraction") and "license: other" in card
    assert "# Model card for rsvheat_tiny" in card and "2411.17984" in card
    assert f"{S2['mean']}" in card and "s2: 4 bands" in card  # every stem's bands and statistics

    # saved again without arguments: the model carries its stems' description; a card entry given is used
    again = rsvheat.save_pretrained(loaded, tmp_path / "again", model_card={"license": "cc-by-4.0"})
    assert "license: cc-by-4.0" in (again / "README.md").read_text()
    assert json.loads((again / "config.json").read_text())["model_args"]["modality_cfg"] == stems
    # and as a dense backbone
    features = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True)
    assert [f.shape[1] for f in features(torch.randn(1, 4, 64, 64))] == [16, 32, 64, 128]


def test_statistics_are_never_guessed_for_stems_imagenet_does_not_describe(tmp_path):
    model = _timm_micro(in_chans=4)
    with pytest.raises(ValueError, match=r"the 'optical' stem \(4 bands\) has no mean / std"):
        rsvheat.save_pretrained(model, tmp_path / "x")
    with pytest.raises(ValueError, match=r"\['mean'\] has 3 values, the stem 4 bands"):
        rsvheat.save_pretrained(model, tmp_path / "x", modality_cfg={"optical": dict(mean=[0, 0, 0], std=[1] * 4)})
    with pytest.raises(ValueError, match=r"stems the model lacks: \['s1'\]"):
        rsvheat.save_pretrained(model, tmp_path / "x", modality_cfg={"s1": dict(mean=[0], std=[1])})
    # a 3-band stem takes the statistics of the weights it came with (here the registry's ImageNet ones)
    rgb = _timm_micro()
    folder = rsvheat.save_pretrained(rgb, tmp_path / "rgb")
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN


@pytest.mark.smoke
def test_models_built_outside_timm_and_folded_official_weights_round_trip(tmp_path):
    """A model rebuilt from our weights file has no timm config; one with a stored k·t keeps it."""
    model = micro_model(modalities={"optical": 3}).eval()
    path = rsvheat.save_weights(model, tmp_path / "w.safetensors")
    rebuilt = rsvheat.create_model_from_weights(path).eval()
    with torch.no_grad():
        for block in rebuilt.stages[1].blocks:
            block.hco.kt_override = torch.rand(8, 8, 32)  # as a folded official checkpoint leaves it
    with pytest.raises(ValueError, match="has no mean / std"):  # no timm config to take statistics from
        rsvheat.save_pretrained(rebuilt, tmp_path / "enc")
    stats = dict(bands=["R", "G", "B"], mean=[0.4, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    folder = rsvheat.save_pretrained(rebuilt, tmp_path / "enc", modality_cfg={"optical": stats})
    assert not hasattr(rebuilt, "pretrained_cfg")  # the writer's temporary config is gone again
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert loaded.stages[1].blocks[0].hco.kt_override.shape == (8, 8, 32)
    x = torch.randn(1, 3, 80, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), rebuilt(x), rtol=0, atol=0)
