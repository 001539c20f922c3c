"""rsvheat and official vHeat weights through TorchGeo's ``weights=`` (a ``WeightsEnum`` member, or its name as a
string in a config), offline: the official file sits in torch's hub cache where the download would put it."""

import pytest
import timm
import torch

import rsvheat
from tests.test_checkpoint import _official_file

trainers = pytest.importorskip("torchgeo.trainers")


@pytest.fixture(scope="module")
def official_in_hub_cache(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    _, path = _official_file(folder, "vheat_tiny")
    return home, path.rename(folder / "vHeat_tiny.pth")  # the release file's name


def _same_backbone(task_model: torch.nn.Module, reference: torch.nn.Module, fresh: tuple[str, ...]) -> None:
    """Every tensor equal to ``reference``'s but those under ``fresh`` (the task's own initialisation)."""
    ref = reference.state_dict()
    for key, value in task_model.state_dict().items():
        if not key.startswith(fresh):
            torch.testing.assert_close(value, ref[key], rtol=0, atol=0, msg=key)


def test_official_weights_as_an_enum_member_and_by_name(official_in_hub_cache, monkeypatch):
    from rsvheat.models.torchgeo_weights import RSVHeatWeights

    home, path = official_in_hub_cache
    monkeypatch.setenv("TORCH_HOME", str(home))
    reference = timm.create_model("vheat_tiny", num_classes=7)
    rsvheat.load_checkpoint(reference, path)
    member = RSVHeatWeights.VHEAT_TINY_IN1K
    assert member.url.endswith("/vHeat_tiny.pth") and member.meta["bands"] == ("red", "green", "blue")
    for weights in (member, "RSVHeatWeights.VHEAT_TINY_IN1K"):  # the string: a config's spelling
        task = trainers.ClassificationTask(model="vheat_tiny", weights=weights, num_classes=7)
        _same_backbone(task.model, reference, fresh=("head.fc.",))
        assert task.model.head.fc.out_features == 7
    from torchgeo.models import get_model_weights

    assert get_model_weights("rsvheat_base") is RSVHeatWeights


def test_a_file_retargeted_to_other_bands_and_size_loads_as_rsvheat_would(tmp_path):
    from rsvheat.models.torchgeo_weights import torchgeo_weights

    encoder = rsvheat.create_model("rsvheat_tiny", num_classes=0, img_size=64)
    path = rsvheat.save_weights(encoder, tmp_path / "enc.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        torchgeo_weights(tmp_path / "missing.safetensors", "rsvheat_tiny")
    member = torchgeo_weights(path, "rsvheat_tiny", in_chans=5)
    torch.manual_seed(0)
    task = trainers.ClassificationTask(model="rsvheat_tiny", weights=member, in_channels=5, num_classes=3)
    reference = timm.create_model("rsvheat_tiny", in_chans=5, num_classes=3)
    rsvheat.load_checkpoint(reference, path)  # FVE/SCE resized 64 -> 224, stem adapted from RGB to 5 bands
    _same_backbone(task.model, reference, fresh=("head.fc.",))
    loss = task.training_step({"image": torch.randn(2, 5, 64, 64), "label": torch.tensor([0, 2])}, 0)
    assert torch.isfinite(loss)
    with pytest.raises(rsvheat.CheckpointError, match="depths"):  # a file for another size says so
        torchgeo_weights(path, "rsvheat_small").get_state_dict(progress=False)
