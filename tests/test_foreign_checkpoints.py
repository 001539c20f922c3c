"""Checkpoints of TorchGeo's Lightning tasks on an RS-vHeat backbone, served by rsvheat's tools: rebuilt without
TorchGeo from the file's plain data, normalised with the statistics the user gives (TorchGeo stores none)."""

import numpy as np
import pytest
import rasterio
import torch

from rsvheat.cli import main
from rsvheat.models.checkpoint import CheckpointError
from rsvheat.models.contract import load_task
from tests.rasters import ramp, write

trainers = pytest.importorskip("torchgeo.trainers")
lightning = pytest.importorskip("lightning")


def _saved(task, path, batch):
    """``task`` after one training step, saved as TorchGeo's users save it: Lightning's own checkpoint."""
    trainer = lightning.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(task, train_dataloaders=loader, val_dataloaders=loader)  # its LR scheduler watches val_loss
    trainer.save_checkpoint(path)
    return task.model.eval()


@pytest.mark.slow
def test_torchgeo_segmentation_checkpoint_maps_a_scene(tmp_path, capsys):
    torch.manual_seed(0)
    task = trainers.SemanticSegmentationTask(
        model="upernet", backbone="tu-rsvheat_tiny", weights=None, in_channels=3, num_classes=3
    )
    batch = {"image": torch.rand(2, 3, 64, 64), "mask": torch.randint(0, 3, (2, 64, 64))}
    network = _saved(task, tmp_path / "seg.ckpt", batch)
    image = ramp(3, 64, 64, scale=3.0)
    scene = write(tmp_path / "scene.tif", image)
    out = tmp_path / "classes.tif"
    with pytest.raises(SystemExit):
        main(["predict-scene", "--checkpoint", str(tmp_path / "seg.ckpt"), str(scene), "-o", str(out), "--tile", "64"])
    assert "stores no input normalisation" in capsys.readouterr().err
    assert not out.exists()
    args = ["--checkpoint", str(tmp_path / "seg.ckpt"), str(scene), "-o", str(out), "--probabilities"]
    main(["predict-scene", *args, "--tile", "64", "--mean", "0", "--std", "255"])
    with torch.no_grad():  # the TorchGeo network on the image, normalised as its data module did
        expected = network(torch.from_numpy(image[None].astype(np.float32)) / 255).softmax(1)[0].numpy()
    with rasterio.open(out.with_name("classes.probabilities.tif")) as src:
        np.testing.assert_allclose(src.read(), expected, atol=1e-4)
    with rasterio.open(out) as src:
        agree = (src.read(1) == expected.argmax(0)).mean()
        assert agree > 0.999 and src.crs is not None


def test_torchgeo_classification_checkpoint_loads_and_others_are_refused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    task = trainers.ClassificationTask(model="rsvheat_tiny", weights=None, in_channels=4, num_classes=5)
    network = _saved(task, tmp_path / "cls.ckpt", {"image": torch.rand(2, 4, 64, 64), "label": torch.tensor([0, 4])})
    served, meta = load_task(tmp_path / "cls.ckpt", normalisation=([0], [1000]))
    assert served.spec.name == "classification" and served.modalities == {"optical": 4}
    assert meta["stats"] == {"optical": {"mean": [0.0] * 4, "std": [1000.0] * 4}}
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(served.model(x), network(x), atol=1e-4, rtol=1e-4)
    image = write(tmp_path / "four_bands.tif", ramp(4, 64, 64))
    main(
        [
            "explain",
            str(image),
            "--checkpoint",
            str(tmp_path / "cls.ckpt"),
            "--bands",
            "1,2,3,4",
            "-o",
            str(tmp_path / "heat"),
        ]
    )
    assert any((tmp_path / "heat").glob("*.png"))  # heat maps of the TorchGeo-trained backbone
    # export: the network and metadata handed to the exporter (exporting itself is tested on rsvheat's classifier)
    exported = {}

    def export_model(model, out, inputs, kind, **options):
        exported.update(options, model=model, kind=kind)
        return {"path": out, "max_abs_diff": 0.0, "reference_max_abs": 1.0, "relative_diff": 0.0}

    monkeypatch.setattr("rsvheat.export.export_model", export_model)
    main(["export", "-o", str(tmp_path / "cls.onnx"), "--checkpoint", str(tmp_path / "cls.ckpt"), "--size", "64"])
    with torch.no_grad():
        torch.testing.assert_close(exported["model"](x), network(x), atol=1e-4, rtol=1e-4)
    metadata = exported["metadata"]
    assert metadata["bands"] == 4 and "not stored in the torchgeo checkpoint" in metadata["normalisation"]
    with pytest.raises(ValueError, match="takes 4 bands: give one std or 4, not 2"):
        load_task(tmp_path / "cls.ckpt", normalisation=([0], [1, 2]))
    other = trainers.ClassificationTask(model="resnet18", weights=None, in_channels=3, num_classes=2)
    _saved(other, tmp_path / "resnet.ckpt", {"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1])})
    with pytest.raises(CheckpointError, match="model is 'resnet18', not an RS-vHeat/vHeat model"):
        load_task(tmp_path / "resnet.ckpt")


@pytest.fixture
def terratorch_tasks():
    """TerraTorch's tasks; importing them lowers the float32 matmul precision of the process, restored after."""
    before = torch.get_float32_matmul_precision()
    yield pytest.importorskip("terratorch.tasks")
    torch.set_float32_matmul_precision(before)


def _terratorch_args(num_classes: int, in_chans: int, decoder: str) -> dict:
    return dict(
        backbone="timm_rsvheat_tiny",
        backbone_pretrained=False,
        backbone_in_chans=in_chans,
        backbone_img_size=64,
        backbone_depths=[1, 1, 1, 1],
        backbone_dims=[16, 32, 64, 128],
        decoder=decoder,
        num_classes=num_classes,
    )


@pytest.mark.slow
def test_terratorch_checkpoints_map_a_scene_and_classify(tmp_path, terratorch_tasks):
    """TerraTorch's SemanticSegmentationTask (UPerNet) and ClassificationTask on timm_rsvheat_tiny, rebuilt by its
    factory from the checkpoint's plain model_args: predict-scene equals the TerraTorch network on the scene."""
    torch.manual_seed(0)
    args = {**_terratorch_args(3, 3, "UperNetDecoder"), "decoder_channels": 32}
    task = terratorch_tasks.SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory", model_args=args, loss="ce", ignore_index=-1
    )
    batch = {"image": torch.rand(2, 3, 64, 64), "mask": torch.randint(0, 3, (2, 64, 64))}
    network = _saved(task, tmp_path / "seg.ckpt", batch)
    image = ramp(3, 64, 64, scale=3.0)
    scene = write(tmp_path / "scene.tif", image)
    out = tmp_path / "classes.tif"
    args = ["--checkpoint", str(tmp_path / "seg.ckpt"), str(scene), "-o", str(out), "--probabilities"]
    main(["predict-scene", *args, "--tile", "64", "--mean", "0", "--std", "255"])
    with torch.no_grad():
        x = torch.from_numpy(image[None].astype(np.float32)) / 255
        expected = network(x).output.softmax(1)[0].numpy()
    with rasterio.open(out.with_name("classes.probabilities.tif")) as src:
        np.testing.assert_allclose(src.read(), expected, atol=1e-4)

    classifier = terratorch_tasks.ClassificationTask(
        model_factory="EncoderDecoderFactory", model_args=_terratorch_args(5, 4, "IdentityDecoder"), loss="ce"
    )
    batch = {"image": torch.rand(2, 4, 64, 64), "label": torch.tensor([0, 4])}
    network = _saved(classifier, tmp_path / "cls.ckpt", batch)
    served, meta = load_task(tmp_path / "cls.ckpt", normalisation=([0], [1]))
    assert served.spec.name == "classification" and served.modalities == {"optical": 4} and meta["task"] == "terratorch"
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(served.model(x), network(x).output, atol=1e-4, rtol=1e-4)

    checkpoint = torch.load(tmp_path / "cls.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["model_args"]["backbone"] = "timm_resnet18"
    torch.save(checkpoint, tmp_path / "resnet.ckpt")
    with pytest.raises(CheckpointError, match="TerraTorch checkpoint whose backbone is 'timm_resnet18', not an RS"):
        load_task(tmp_path / "resnet.ckpt")
    checkpoint["hyper_parameters"]["task"] = "regression"
    torch.save(checkpoint, tmp_path / "regression.ckpt")
    with pytest.raises(CheckpointError, match="TerraTorch 'regression' checkpoint: rsvheat serves TerraTorch's"):
        load_task(tmp_path / "regression.ckpt")
