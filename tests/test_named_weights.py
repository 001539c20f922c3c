"""Weights by name on the command lines (``--model.weights vheat_tiny``, ``--weights vheat_tiny``): the name goes
through timm's pretrained machinery (the ``vheat_*.in1k`` pretrained_cfg, torch's hub cache, our converter), tested
offline with an official-format file placed where timm's download would put it."""

import numpy as np
import pytest
import torch

import rsvheat
from rsvheat.cli import main
from rsvheat.models.checkpoint import CheckpointError
from rsvheat.models.contract import build_backbone
from rsvheat.trainers import ClassificationTask
from tests.rasters import ramp, write
from tests.test_checkpoint import _official_file


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds an official-format vHeat_tiny.pth (the release file's name): timm finds it
    there and downloads nothing."""
    home = tmp_path_factory.mktemp("torch_home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    ref, path = _official_file(folder, "vheat_tiny")
    path.rename(folder / "vHeat_tiny.pth")
    return home, folder / "vHeat_tiny.pth", ref


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    home, path, ref = hub_cache
    monkeypatch.setenv("TORCH_HOME", str(home))
    return path, ref


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sb = b.state_dict()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, sb[key], rtol=0, atol=0, msg=key)


def test_a_name_loads_the_official_file_through_timm_with_the_documented_rs_vheat_start(offline_hub):
    path, ref = offline_hub
    modalities = {"optical": 3, "sar": 1}
    torch.manual_seed(0)
    named = build_backbone("rsvheat_tiny", modalities, 64, weights="vheat_tiny")
    torch.manual_seed(0)
    from_file = build_backbone("rsvheat_tiny", modalities, 64, weights=str(path))
    _assert_same_weights(named, from_file)  # the same as giving the file: converter, SCE at init, SAR stem adapted
    torch.manual_seed(0)
    untouched = build_backbone("rsvheat_tiny", modalities, 64)
    for stage, fresh in zip(named.stages, untouched.stages, strict=True):
        torch.testing.assert_close(stage.heat_capacity, fresh.heat_capacity, rtol=0, atol=0)  # SCE: initialisation
    torch.testing.assert_close(named.stems.optical.conv1.weight, ref.patch_embed.conv1.weight)
    torch.testing.assert_close(named.stems.sar.conv1.weight, ref.patch_embed.conv1.weight.sum(1, keepdim=True))


def test_lightning_task_takes_the_name_as_model_weights(offline_hub):
    path, _ = offline_hub
    task = ClassificationTask(backbone="rsvheat_tiny", weights="vheat_tiny", num_classes=3, img_size=64)
    reference = rsvheat.create_model("rsvheat_tiny", num_classes=3, img_size=64)
    rsvheat.load_checkpoint(reference, path)
    for name in ("stems.optical.conv1.weight", "stages.2.blocks.5.hco.in_proj.weight", "stages.3.freq_embed"):
        torch.testing.assert_close(task.backbone.state_dict()[name], reference.state_dict()[name], rtol=0, atol=0)


def test_unknown_names_list_the_accepted_ones_and_say_a_path_works():
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("rsvheat_tiny", {"optical": 3}, 64, weights="vheat_bse")
    message = str(info.value)
    assert "'vheat_bse': no such file, and not a known name" in message and "Give a path" in message
    assert "vheat_tiny, vheat_small, vheat_base" in message


def test_a_name_of_another_size_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: a download would be attempted
    with pytest.raises(CheckpointError, match=r"weights vheat_base are for depths .* use them with vheat_base or rs"):
        build_backbone("rsvheat_tiny", {"optical": 3}, 64, weights="vheat_base")
    assert not list(tmp_path.rglob("*.pth"))


def test_export_refuses_an_unknown_name_with_the_accepted_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "-o", str(tmp_path / "m.onnx"), "--size", "64", "--weights", "vheat_huge"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "rsvheat export: error: weights 'vheat_huge'" in err and "vheat_base" in err


@pytest.mark.slow
def test_explain_with_weights_by_name(tmp_path, offline_hub, capsys):
    image = write(tmp_path / "s.tif", ramp(3, 64, 64, np.uint8))
    main(["explain", str(image), "--out", str(tmp_path / "out"), "--weights", "vheat_tiny", "--model", "rsvheat_tiny"])
    assert (tmp_path / "out" / "summary.png").stat().st_size > 5000
