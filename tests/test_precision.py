"""The bf16 path: autocast with the spectral transforms in float32 agrees with float32 (issue 14, "Reduced
precision"), in the model and where users run it (``predict-scene``, ``explain``)."""

import numpy as np
import pytest
import rasterio
import torch

import rsvheat
from rsvheat.cli import build_parser, main
from rsvheat.models.precision import PRECISIONS, autocast, low_precision_weights
from tests.rasters import write
from tests.test_task_training import MICRO


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach()).norm() / b.detach().norm())


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_logits_and_pooled_features_are_within_1e_2_of_fp32(grad):
    torch.manual_seed(0)
    model = rsvheat.create_model("rsvheat_tiny", num_classes=5, img_size=64, **MICRO).eval()
    x = torch.randn(2, 3, 97, 83)  # odd sizes: padding in the stem and downsamplings
    with torch.set_grad_enabled(grad):  # the folded inference path, and the autograd path of training
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.forward_head(model.forward_features(x))
        with autocast("bf16", x.device):
            features16 = model.forward_head(model.forward_features(x), pre_logits=True)
            logits16 = model.forward_head(model.forward_features(x))
    assert logits16.dtype == torch.bfloat16  # autocast did run the GEMMs in bf16
    assert rel_err(logits16, logits) <= 1e-2
    assert rel_err(features16, features) <= 1e-2


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="fp16.*fp32, bf16"):
        autocast("fp16", "cpu")


def test_cli_precision_choices_are_the_package_s():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("predict-scene", "explain"):
        action = next(a for a in sub[command]._actions if a.dest == "precision")
        assert tuple(action.choices) == PRECISIONS and action.default == "fp32"


def test_predict_scene_bf16_map_agrees_with_fp32(tmp_path):
    from rsvheat.trainers import SegmentationTask
    from tests.test_reliability import task_checkpoint

    torch.manual_seed(0)
    ckpt = task_checkpoint(tmp_path / "seg.ckpt", SegmentationTask, num_classes=3)
    rng = np.random.default_rng(0)
    scene = write(tmp_path / "scene.tif", rng.normal(100, 50, (3, 97, 131)).clip(0, 255).astype(np.uint8))
    maps = {}
    for precision in PRECISIONS:
        out = tmp_path / f"{precision}.tif"
        main(["predict-scene", str(ckpt), str(scene), "-o", str(out), "--tile", "64", "--precision", precision])
        with rasterio.open(out) as src:
            maps[precision] = src.read(1)
    assert len(np.unique(maps["fp32"])) > 1  # a map with a single class would agree trivially
    # random weights: near ties between classes are common, so a few pixels may flip (0.958 when written)
    assert (maps["bf16"] == maps["fp32"]).mean() >= 0.9


def test_explain_runs_in_bf16(tmp_path):
    from rsvheat.explain import explain_scene

    rng = np.random.default_rng(0)
    image = write(tmp_path / "image.tif", rng.integers(0, 255, (3, 67, 45), dtype=np.uint8))
    model = rsvheat.create_model("rsvheat_tiny", img_size=64, **MICRO)
    written = explain_scene(model, image, tmp_path / "maps", tile=64, progress=False, precision="bf16")
    assert written["summary"].is_file()


def test_trainer_bf16_mixed_fits_a_task(tmp_path):
    """``rsvheat fit --trainer.precision bf16-mixed`` trains our model on CPU (Lightning's bfloat16 autocast)."""
    from rsvheat.apps import samples
    from rsvheat.trainers.cli import task_cli
    from tests.test_task_training import COMMON, write_config

    samples.write_segmentation(tmp_path / "seg", tile=64, stride=160)
    model = {
        "class_path": "rsvheat.trainers.SegmentationTask",
        "init_args": {"num_classes": 3, "img_size": 64, **COMMON},
    }
    data = {
        "class_path": "rsvheat.datamodules.SegmentationDataModule",
        "init_args": {
            "train_root": str(tmp_path / "seg/train"),
            "val_root": str(tmp_path / "seg/val"),
            "num_classes": 3,
            "crop_size": 64,
            "batch_size": 2,
            "num_workers": 0,
        },
    }
    config = write_config(
        tmp_path / "seg.yaml", model, data, tmp_path / "run", limit_train_batches=2, limit_val_batches=1
    )
    task_cli(["fit", "--config", config, "--trainer.precision", "bf16-mixed"])
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_low_precision_weights_give_autocasts_results_and_restore_the_weights():
    from rsvheat.trainers import DetectionTask

    torch.manual_seed(0)
    classifier = rsvheat.create_model("rsvheat_tiny", num_classes=5, img_size=64, **MICRO).eval()
    detector = DetectionTask(  # at the image's size: torchvision's default resizes to 800 px
        num_classes=2, backbone="rsvheat_tiny", img_size=64, encoder_kwargs=MICRO, min_size=97, max_size=97
    ).model.eval()
    x = torch.rand(1, 3, 97, 83)
    for model in (classifier, detector):  # the detector: torchvision's heads run with them too
        before = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
        with torch.inference_mode(), autocast("bf16", x.device):
            expected = model(x)
        with low_precision_weights(model, "bf16"):
            linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
            assert linear.weight.dtype == torch.bfloat16
            with torch.inference_mode(), autocast("bf16", x.device):
                got = model(x)
        # autocast rounds the same weights to bf16 on every call: the results are identical
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32 and p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])
