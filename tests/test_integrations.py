"""rsvheat inside the libraries people already use: timm, segmentation-models-pytorch, TorchGeo."""

import pytest
import segmentation_models_pytorch as smp
import timm
import torch


@pytest.mark.smoke
def test_timm_features_only_gives_normalised_nchw_stages():
    model = timm.create_model("rsvheat_tiny", features_only=True, img_size=64, out_indices=(1, 2, 3))
    assert model.feature_info.channels() == [192, 384, 768]
    assert model.feature_info.reduction() == [8, 16, 32]
    feats = model(torch.randn(2, 3, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 192, 12, 8), (2, 384, 6, 4), (2, 768, 3, 2)]
    # per-stage output LayerNorm: zero mean over channels at every pixel
    torch.testing.assert_close(feats[0].mean(1), torch.zeros(2, 12, 8), atol=1e-4, rtol=0)
    assert not hasattr(model.model.head, "fc") or isinstance(model.model.head.fc, torch.nn.Identity)


def test_timm_features_only_with_sar_and_multispectral_inputs():
    for in_chans in (1, 2, 13):
        model = timm.create_model("rsvheat_tiny", features_only=True, in_chans=in_chans, img_size=64)
        assert model(torch.randn(1, in_chans, 64, 64))[-1].shape == (1, 768, 2, 2)


@pytest.mark.smoke
@pytest.mark.parametrize("arch", ["UPerNet", "Unet", "FPN", "Segformer"])
def test_smp_decoders_on_the_timm_universal_encoder(arch):
    model = getattr(smp, arch)("tu-rsvheat_tiny", encoder_weights=None, in_channels=4, classes=3, img_size=64)
    model.train()
    out = model(torch.randn(2, 4, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.mean().backward()
    assert model.encoder.model.model.stages[0].freq_embed.grad is not None


def test_smp_imagenet_weights_say_what_exists_instead_of_timms_generic_message():
    with pytest.raises(RuntimeError, match=r"no pretrained weights are published for rsvheat_tiny.*vheat_in1k"):
        smp.UPerNet("tu-rsvheat_tiny", encoder_weights="imagenet", classes=3)


def test_smp_deeplab_fails_loudly_instead_of_silently_wrong():
    with pytest.raises(ValueError, match="output_stride"):
        smp.DeepLabV3Plus("tu-rsvheat_tiny", encoder_weights=None, classes=2)


def test_torchgeo_classification_task_trains_a_step():
    from torchgeo import trainers

    task = trainers.ClassificationTask(model="rsvheat_tiny", weights=None, in_channels=5, num_classes=4)
    batch = {"image": torch.randn(2, 5, 64, 64), "label": torch.tensor([0, 3])}
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert task.model.stems.optical.conv1.weight.grad is not None


def test_torchgeo_segmentation_and_change_detection_tasks():
    from torchgeo import trainers

    seg = trainers.SemanticSegmentationTask(
        model="upernet", backbone="tu-rsvheat_tiny", weights=None, in_channels=3, num_classes=3
    )
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 3, (2, 64, 64))}
    assert torch.isfinite(seg.training_step(batch, 0))
    cd = trainers.ChangeDetectionTask(model="unet", backbone="tu-rsvheat_tiny", weights=None, in_channels=3)
    pair = {"image": torch.randn(2, 2, 3, 64, 64), "mask": torch.randint(0, 2, (2, 1, 64, 64)).float()}
    assert torch.isfinite(cd.training_step(pair, 0))


def _run(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_import_is_light_and_registers_with_timm_in_either_order():
    """``import rsvheat`` and ``rsvheat --help`` load no torch; the variants reach timm however timm is imported."""
    assert (
        _run("import sys, rsvheat; from rsvheat.cli import build_parser; build_parser(); print('torch' in sys.modules)")
        == "False\n"
    )
    for code in ("import rsvheat, timm", "import timm, rsvheat", "import rsvheat, segmentation_models_pytorch, timm"):
        assert _run(code + "; print(sorted(timm.list_models('*vheat_tiny')))") == "['rsvheat_tiny', 'vheat_tiny']\n"
