"""TorchGeo's and TerraTorch's own command lines and registries with rsvheat's models: ``rsvheat torchgeo ...`` and
``rsvheat terratorch ...`` run those tools' CLIs with the models registered (neither tool loads plugins through entry
points), and TerraTorch builds an rsvheat backbone from its registry (``timm_rsvheat_*``) under a UPerNet decoder.

TorchGeo and TerraTorch are part of the tested environment (``rsvheat[integrations]``: TerraTorch 1.2.11, the newest
that installs beside TorchGeo 0.8.1 on Python 3.11)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rsvheat.cli import main


@pytest.fixture(autouse=True)
def _keep_matmul_precision():
    """Importing TerraTorch's backbones sets ``torch.set_float32_matmul_precision("medium")`` for the whole process
    (its Clay v1.5 module does it at import), which lets CPU float32 GEMMs run in bfloat16: every later exactness test
    would fail. Each test here restores the setting it found."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def _uc_merced(root: Path, size: int = 32) -> None:
    """A tiny UC Merced in its on-disk layout: UCMerced_LandUse/Images/<class>/<class>NN.tif + split lists."""
    rng = np.random.default_rng(0)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name in ("agricultural", "airplane"):
        for i, split in enumerate(("train", "train", "val", "test")):
            fn = f"{name}{i:02d}.tif"
            path = root / "UCMerced_LandUse" / "Images" / name / fn
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(path)
            splits[split].append(fn)
    for split, names in splits.items():
        (root / f"uc_merced-{split}.txt").write_text("\n".join(names) + "\n")


def _one_step_trainer(root: Path) -> dict:
    """One training step and one validation batch, logged as CSV so that the step can be checked afterwards."""
    return {
        "max_steps": 1,
        "limit_train_batches": 1,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
    }


def _fit_one_step(tmp_path: Path, command: list[str], model: dict, data: dict) -> list[str]:
    """``rsvheat <command> --config`` with ``model``, ``data`` and :func:`_one_step_trainer` (under ``run/``); the
    metric names the run logged (its metrics.csv header)."""
    config = {"model": model, "data": data, "trainer": _one_step_trainer(tmp_path / "run")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    main([*command, "--config", str(tmp_path / "config.yaml")])
    (metrics,) = (tmp_path / "run").glob("lightning_logs/version_*/metrics.csv")
    return metrics.read_text().splitlines()[0].split(",")


@pytest.mark.slow
def test_torchgeo_fit_with_an_rsvheat_model_through_rsvheat_torchgeo(tmp_path):
    _uc_merced(tmp_path / "data")
    model = {
        "class_path": "torchgeo.trainers.ClassificationTask",
        "init_args": {"model": "rsvheat_tiny", "weights": None, "in_channels": 3, "num_classes": 2},
    }
    data = {
        "class_path": "torchgeo.datamodules.UCMercedDataModule",
        "init_args": {"batch_size": 2},
        # the dataset's own arguments, passed on through the data module's **kwargs
        "dict_kwargs": {"root": str(tmp_path / "data"), "download": False, "checksum": False},
    }
    header = _fit_one_step(tmp_path, ["torchgeo", "fit"], model, data)
    # TorchGeo's task built rsvheat_tiny through timm, trained one step and scored the validation batch
    assert "train_loss" in header and "val_loss" in header
    assert list((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/epoch=0-step=1.ckpt"))


def test_rsvheat_torchgeo_help_is_torchgeos_own(capsys):
    with pytest.raises(SystemExit) as info:
        main(["torchgeo", "fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    # an example of rsvheat's model names first, then TorchGeo's own help under the command as typed
    assert out.startswith("rsvheat torchgeo: torchgeo's own command line") and "model: rsvheat_tiny" in out
    assert "usage: rsvheat torchgeo [options] fit" in out and "--model CONFIG" in out


MICRO_BACKBONE = {"backbone_depths": [1, 1, 1, 1], "backbone_dims": [16, 32, 64, 128]}


def _uperNet_args(num_classes: int, in_chans: int) -> dict:
    """TerraTorch's EncoderDecoderFactory arguments: the backbone from its registry (timm source), UPerNet decoder."""
    return dict(
        backbone="timm_rsvheat_tiny",
        backbone_pretrained=False,
        backbone_in_chans=in_chans,
        backbone_img_size=64,
        **MICRO_BACKBONE,
        decoder="UperNetDecoder",
        decoder_channels=32,
        num_classes=num_classes,
    )


@pytest.mark.slow
def test_terratorch_registry_builds_rsvheat_under_upernet_and_trains_a_step():
    import lightning.pytorch as pl
    from terratorch.registry import BACKBONE_REGISTRY
    from terratorch.tasks import SemanticSegmentationTask
    from torch.utils.data import DataLoader

    assert "timm_rsvheat_tiny" in BACKBONE_REGISTRY and "timm_rsvheat_base" in BACKBONE_REGISTRY
    backbone = BACKBONE_REGISTRY.build("timm_rsvheat_tiny", in_chans=4, depths=[1, 1, 1, 1], dims=[16, 32, 64, 128])
    assert backbone.out_channels == [16, 32, 64, 128]

    task = SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory", model_args=_uperNet_args(3, 4), loss="ce", ignore_index=-1
    )
    assert type(task.model.decoder).__name__ == "UperNetDecoder"
    # batch of 2: UPerNet's pooling module has BatchNorm over 1x1 maps
    data = [{"image": torch.randn(4, 64, 64), "mask": torch.randint(0, 3, (64, 64))} for _ in range(2)]
    before = {n: p.detach().clone() for n, p in task.model.encoder.named_parameters()}
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, DataLoader(data, batch_size=2))
    assert trainer.global_step == 1
    changed = [n for n, p in task.model.encoder.named_parameters() if not torch.equal(p, before[n])]
    assert any("stems.optical" in n for n in changed)  # the step reached the rsvheat encoder's first layer


def _love_da(root: Path) -> dict:
    """A tiny LoveDA in its on-disk layout (<Train|Val>/<Urban|Rural>/{images_png,masks_png}/N.png, 8 classes) and
    the config section of TorchGeo's data module reading it."""
    rng = np.random.default_rng(0)
    for split in ("Train", "Val"):
        for scene in ("Urban", "Rural"):
            for i in range(2):
                for folder, array in (
                    ("images_png", rng.integers(0, 256, (64, 64, 3))),
                    ("masks_png", rng.integers(0, 8, (64, 64))),
                ):
                    path = root / split / scene / folder / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array.astype(np.uint8)).save(path)
    return {
        "class_path": "torchgeo.datamodules.LoveDADataModule",
        "init_args": {"batch_size": 2},
        "dict_kwargs": {"root": str(root), "download": False, "checksum": False},
    }


@pytest.mark.slow
def test_terratorch_fit_through_rsvheat_terratorch(tmp_path):
    model = {
        "class_path": "terratorch.tasks.SemanticSegmentationTask",
        "init_args": {
            "model_factory": "EncoderDecoderFactory",
            "model_args": _uperNet_args(8, 3),
            "loss": "ce",
            "ignore_index": 0,
        },
    }
    header = _fit_one_step(tmp_path, ["terratorch", "fit"], model, _love_da(tmp_path / "loveda"))
    assert "train/loss" in header


@pytest.mark.slow
def test_rsvheat_fit_with_a_torchgeo_data_module(tmp_path):
    """An rsvheat task on TorchGeo's LoveDA data module through ``rsvheat fit``: TorchGeo's samples are the same dicts
    (``image``, ``mask``), its ``aug`` normalises them after the transfer; the class count comes from the config."""
    from rsvheat.trainers.checkpoints import read_checkpoint

    model = {
        "class_path": "rsvheat.trainers.SegmentationTask",
        "init_args": {"backbone": "rsvheat_tiny", "num_classes": 8, "img_size": 64, "ignore_index": 0},
    }
    header = _fit_one_step(tmp_path, ["fit"], model, _love_da(tmp_path / "loveda"))
    assert "train/loss" in header and "val/mIoU" in header
    checkpoint = read_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert checkpoint["rsvheat"]["stats"] is None  # TorchGeo keeps its normalisation in `aug`: none to record
    assert checkpoint["hyper_parameters"]["num_classes"] == 8


@pytest.mark.slow
def test_rsvheat_data_module_under_rsvheat_torchgeo_fit(tmp_path):
    """TorchGeo's ClassificationTask on rsvheat's ClassificationDataModule through ``rsvheat torchgeo fit`` (TorchGeo's
    own command line only takes its BaseDataModule subclasses; the wrapper takes any Lightning data module)."""
    from tests.test_evaluation import make_classes

    make_classes(tmp_path / "data", n=6, size=32)
    model = {
        "class_path": "torchgeo.trainers.ClassificationTask",
        "init_args": {"model": "rsvheat_tiny", "weights": None, "in_channels": 3, "num_classes": 3},
    }
    data = {
        "class_path": "rsvheat.datamodules.ClassificationDataModule",
        "init_args": {
            "root": str(tmp_path / "data"),
            "train_ratio": 0.5,
            "val_ratio": 0.2,
            "img_size": 32,
            "batch_size": 2,
            "num_workers": 0,
        },
    }
    header = _fit_one_step(tmp_path, ["torchgeo", "fit"], model, data)
    assert "train_loss" in header and "val_loss" in header
    import torchgeo.main
    from torchgeo.datamodules import BaseDataModule

    assert torchgeo.main.BaseDataModule is BaseDataModule  # TorchGeo's own module is left as it was
