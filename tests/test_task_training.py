"""Downstream tasks: optimisation options, each task learning a small real-pixel set (the Landsat samples), and the
``rsvheat fit|test|predict`` CLI writing checkpoints and predictions."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
import yaml

from rsvheat.apps import samples
from rsvheat.datamodules import (
    ChangeDetectionDataModule,
    ClassificationDataModule,
    DetectionDataModule,
    SegmentationDataModule,
)
from rsvheat.models.contract import build_backbone
from rsvheat.models.tasks import faster_rcnn
from rsvheat.trainers import ChangeDetectionTask, ClassificationTask, DetectionTask, SegmentationTask
from rsvheat.trainers.cli import task_cli

MICRO = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TASKS = ("classification", "segmentation", "change", "detection", "multilabel")
# fewer proposals and sampled boxes: RoIAlign's backward dominates a CPU step of torchvision's Faster R-CNN
LIGHT = {"rpn_post_nms_top_n_train": 200, "rpn_post_nms_top_n_test": 200, "box_batch_size_per_image": 64}
COMMON = dict(backbone="rsvheat_tiny", encoder_kwargs=MICRO, drop_path_rate=0.0, layer_decay=1.0, warmup_fraction=0.0)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVHEAT_CACHE", str(tmp_path / "cache"))


def trainer(tmp_path, epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path / "run",
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_layer_decay_freezing_and_linear_probe():
    task = ClassificationTask(num_classes=4, img_size=64, lr=1.0, **{**COMMON, "layer_decay": 0.5})
    task.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    lrs = {}
    names = {id(p): n for n, p in task.named_parameters()}
    for group in task.configure_optimizers()["optimizer"].param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group["initial_lr"]
    # 4 stages of 1 block + stem + head: lr = 0.5 ** (distance from the top)
    assert lrs["backbone.head.fc.weight"] == 1.0
    assert lrs["backbone.stages.3.blocks.0.mlp.fc1.weight"] == 0.5
    assert lrs["backbone.stages.0.blocks.0.mlp.fc1.weight"] == 0.5**4
    assert lrs["backbone.stems.optical.conv1.weight"] == 0.5**5
    assert len(lrs) == sum(1 for p in task.parameters() if p.requires_grad)

    probe = ClassificationTask(num_classes=4, img_size=64, freeze_backbone=True, **COMMON)
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == [
        "backbone.head.norm.weight",
        "backbone.head.norm.bias",
        "backbone.head.fc.weight",
        "backbone.head.fc.bias",
    ]
    probe.train()
    assert not probe.backbone.stages[0].training  # fixed features: no drop path in a linear probe

    partial = SegmentationTask(num_classes=3, img_size=64, freeze_stages=2, **COMMON)
    frozen = {".".join(n.split(".")[:2]) for n, p in partial.backbone.named_parameters() if not p.requires_grad}
    assert {"stems.optical", "stages.0", "stages.1"} <= frozen and "stages.2" not in frozen


def test_backbone_loads_pretrained_encoder_at_task_resolution(tmp_path):
    from rsvheat.models.checkpoint import save_weights

    encoder = build_backbone("rsvheat_tiny", {"optical": 3, "sar": 1}, 96, encoder_kwargs=MICRO)
    save_weights(encoder, tmp_path / "encoder.safetensors")
    task = SegmentationTask(num_classes=3, img_size=160, weights=str(tmp_path / "encoder.safetensors"), **COMMON)
    resized = task.backbone.stages[0].freq_embed
    assert resized.shape[:2] == (40, 40) and encoder.stages[0].freq_embed.shape[:2] == (24, 24)
    torch.testing.assert_close(task.backbone.stems.optical.conv1.weight, encoder.stems.optical.conv1.weight)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fit_and_score(tmp_path, task, dm, epochs, key):
    trainer(tmp_path, epochs, check_val_every_n_epoch=epochs).fit(task, dm)
    # enable_checkpointing=False: the task's own checkpoint callback stays away too
    assert not (tmp_path / "run/checkpoints").exists()
    dm.datasets["val"] = dm.datasets["train"]
    dm.datasets["train"].train = False  # score the training set as seen, without augmentation
    if hasattr(dm.datasets["train"], "crop_size"):
        dm.datasets["train"].crop_size = None
    return trainer(tmp_path, 1).validate(task, dm.val_dataloader(), verbose=False)[0][key]


@pytest.mark.slow
def test_classification_learns_landsat_tiles(tmp_path):
    torch.manual_seed(0)
    classes = samples.write_classification(tmp_path / "cls", per_class=4)
    dm = ClassificationDataModule(
        str(tmp_path / "cls"),
        train_ratio=1.0,
        split_file=str(tmp_path / "s.json"),
        img_size=32,
        batch_size=6,
        num_workers=0,
    )
    task = ClassificationTask(num_classes=len(classes), img_size=32, lr=2e-3, label_smoothing=0.0, **COMMON)
    assert fit_and_score(tmp_path, task, dm, 25, "val/OA") > 0.95


@pytest.mark.slow
def test_segmentation_learns_landsat_land_cover(tmp_path):
    torch.manual_seed(0)
    samples.write_segmentation(tmp_path / "seg", tile=64, stride=240)
    root = tmp_path / "seg" / "train"
    dm = SegmentationDataModule(str(root), str(root), num_classes=3, crop_size=64, batch_size=4, num_workers=0)
    task = SegmentationTask(
        num_classes=3, img_size=64, lr=3e-3, decoder_width=32, eval_tile=64, eval_overlap=16, **COMMON
    )
    assert fit_and_score(tmp_path, task, dm, 30, "val/OA") > 0.9


@pytest.mark.slow
def test_change_detection_learns_pasted_changes(tmp_path):
    torch.manual_seed(0)
    samples.write_change(tmp_path / "cd", tile=64, stride=192)
    root = tmp_path / "cd" / "train"
    dm = ChangeDetectionDataModule(str(root), str(root), crop_size=64, batch_size=4, num_workers=0)
    # eval_tile < image: the score goes through several blended sliding windows, as on 1024² LEVIR tiles
    task = ChangeDetectionTask(img_size=64, lr=2e-3, decoder_width=32, eval_tile=48, eval_overlap=16, **COMMON)
    assert fit_and_score(tmp_path, task, dm, 200, "val/F1") > 0.9


@pytest.mark.slow
def test_detection_learns_pasted_objects(tmp_path):
    torch.manual_seed(0)
    classes = samples.write_detection(tmp_path / "det", tile=96, count=6)
    spec = {"images": str(tmp_path / "det/JPEGImages"), "annotations": str(tmp_path / "det/Annotations")}
    dm = DetectionDataModule(spec, spec, classes=classes, batch_size=3, eval_batch_size=6, num_workers=0)
    task = DetectionTask(
        num_classes=2, classes=classes, img_size=96, min_size=96, max_size=96, lr=5e-4, detector_kwargs=LIGHT, **COMMON
    )
    assert fit_and_score(tmp_path, task, dm, 30, "val/mAP50") > 0.8


def test_a_linear_probe_checkpoint_starts_fine_tuning_with_its_head(tmp_path):
    """Head first (LP-FT): a classifier trained with ``freeze_backbone`` hands backbone and head to the fine-tuning
    run through ``weights`` (its checkpoint's ``backbone.*`` keys), so the whole model starts from the trained head."""
    probe = ClassificationTask(num_classes=5, img_size=32, freeze_backbone=True, **COMMON)
    assert not any(p.requires_grad for n, p in probe.backbone.named_parameters() if not n.startswith("head."))
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(torch.randn_like(p))  # stands for training: weights no initialisation gives
    torch.save({"state_dict": probe.state_dict(), "hyper_parameters": dict(probe.hparams)}, tmp_path / "probe.ckpt")
    tuned = ClassificationTask(num_classes=5, img_size=32, weights=str(tmp_path / "probe.ckpt"), **COMMON)
    for name, value in probe.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert all(p.requires_grad for p in tuned.parameters())


def test_detection_on_sar_and_empty_images():
    backbone = build_backbone("rsvheat_tiny", {"sar": 1}, 64, encoder_kwargs=MICRO)
    model = faster_rcnn(backbone, 2, min_size=64, max_size=96).train()
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([2])},
    ]
    losses = model([torch.randn(1, 70, 90), torch.randn(1, 64, 64)], targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert backbone.stems.sar.conv1.weight.grad is not None


def test_detection_map_scores_every_box_the_detector_may_output():
    # a dense scene: 150 objects, all found; torchmetrics' default limit of 100 detections would give a recall of 2/3
    task = DetectionTask(num_classes=1, img_size=64, min_size=64, max_size=64, box_detections_per_img=300, **COMMON)
    xy = torch.arange(150, dtype=torch.float32)[:, None] * 10
    boxes = torch.cat([xy, xy, xy + 8, xy + 8], dim=1)
    labels = torch.ones(150, dtype=torch.long)
    task.val_metrics.update(
        [{"boxes": boxes, "scores": torch.rand(150), "labels": labels}], [{"boxes": boxes, "labels": labels}]
    )
    scores = task.val_metrics.compute()
    assert scores["val/map_50"] == pytest.approx(1.0)
    assert scores["val/map"] == pytest.approx(1.0)


def write_config(path, task, data, root, **trainer_args):
    config = {
        "trainer": {
            "default_root_dir": str(root),
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "max_epochs": 1,
            "log_every_n_steps": 1,
            **trainer_args,
        },
        "model": task,
        "data": data,
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_cli_segmentation_fit_test_predict_georeferenced(tmp_path):
    samples.write_segmentation(tmp_path / "seg", tile=64, stride=160)
    seg = tmp_path / "seg"
    config = write_config(
        tmp_path / "seg.yaml",
        {
            "class_path": "rsvheat.trainers.SegmentationTask",
            "init_args": {
                "num_classes": 3,
                "img_size": 64,
                "decoder_width": 16,
                "eval_tile": 48,
                "eval_overlap": 16,
                **COMMON,
            },
        },
        {
            "class_path": "rsvheat.datamodules.SegmentationDataModule",
            "init_args": {
                "train_root": str(seg / "train"),
                "val_root": str(seg / "val"),
                "test_root": str(seg / "val"),
                "predict_root": str(seg / "val"),
                "num_classes": 3,
                "crop_size": 64,
                "batch_size": 4,
                "num_workers": 0,
            },
        },
        tmp_path / "run",
    )
    task_cli(["fit", "--config", config])
    assert {p.name for p in (tmp_path / "run/checkpoints").iterdir()} >= {"best.ckpt", "last.ckpt"}
    logged = read_csv(tmp_path / "run/logs/version_0/metrics.csv")
    speeds = [float(r["train/images_per_s"]) for r in logged if r.get("train/images_per_s")]
    assert len(speeds) == yaml.safe_load(Path(config).read_text())["trainer"]["max_epochs"] and min(speeds) > 0
    task_cli(["test", "--config", config, "--ckpt_path", str(tmp_path / "run/checkpoints/best.ckpt")])
    scores = read_csv(next((tmp_path / "run/logs").glob("version_*/per_class_scores.csv")))
    assert [r["class"] for r in scores] == ["0", "1", "2"]
    task_cli(["predict", "--config", config, "--ckpt_path", str(tmp_path / "run/checkpoints/last.ckpt")])
    image = next((seg / "val/images").iterdir())
    out = tmp_path / "run/predictions" / image.name
    with rasterio.open(image) as src, rasterio.open(out) as pred:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert set(np.unique(pred.read(1))) <= {0, 1, 2}


@pytest.mark.slow
def test_cli_classification_and_detection_predictions(tmp_path):
    samples.write_classification(tmp_path / "cls", per_class=3)
    config = write_config(
        tmp_path / "cls.yaml",
        {
            "class_path": "rsvheat.trainers.ClassificationTask",
            "init_args": {"num_classes": 3, "img_size": 32, **COMMON},
        },
        {
            "class_path": "rsvheat.datamodules.ClassificationDataModule",
            "init_args": {
                "root": str(tmp_path / "cls"),
                "train_ratio": 0.5,
                "split_file": str(tmp_path / "split.json"),
                "img_size": 32,
                "batch_size": 4,
                "num_workers": 0,
                "predict_dir": str(tmp_path / "cls/dark"),
            },
        },
        tmp_path / "cls_run",
    )
    task_cli(["fit", "--config", config])
    task_cli(["test", "--config", config, "--ckpt_path", "best"])
    log = max((tmp_path / "cls_run/logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))  # the test run
    assert (log / "confusion_matrix.png").stat().st_size > 0
    rows = read_csv(log / "per_class_accuracy.csv")
    assert [r["class"] for r in rows] == ["cloud", "dark", "shallow_water"]
    task_cli(["predict", "--config", config, "--ckpt_path", "last"])
    table = read_csv(tmp_path / "cls_run/predictions/classification.csv")
    assert len(table) == 3 and {r["class"] for r in table} <= {"cloud", "dark", "shallow_water"}

    classes = samples.write_detection(tmp_path / "det", tile=64, count=4)
    det = tmp_path / "det"
    spec = {"images": str(det / "JPEGImages"), "annotations": str(det / "Annotations")}
    config = write_config(
        tmp_path / "det.yaml",
        {
            "class_path": "rsvheat.trainers.DetectionTask",
            "init_args": {
                "num_classes": 2,
                "img_size": 64,
                "min_size": 64,
                "max_size": 64,
                "detector_kwargs": LIGHT,
                **COMMON,
            },
        },
        {
            "class_path": "rsvheat.datamodules.DetectionDataModule",
            "init_args": {
                "train": spec,
                "val": spec,
                "classes": classes,
                "predict_dir": spec["images"],
                "batch_size": 2,
                "num_workers": 0,
            },
        },
        tmp_path / "det_run",
    )
    task_cli(["fit", "--config", config])
    task_cli(["predict", "--config", config, "--ckpt_path", "last"])
    detections = json.loads((tmp_path / "det_run/predictions/detections.json").read_text())
    assert isinstance(detections, list)
    assert all(d["class"] in classes and len(d["bbox_xyxy"]) == 4 for d in detections)


@pytest.mark.parametrize("config", sorted(str(p) for t in TASKS for p in (CONFIGS / t).glob("*.yaml")))
def test_shipped_task_configs_parse(config, capsys):
    """Every option in the shipped configs exists and has the right type (checked without any data present)."""
    with pytest.raises(SystemExit) as exit_:
        task_cli(["fit", "--config", config, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("rsvheat.trainers.")


# checkpoints: last.ckpt follows training; resume after SIGKILL; missing, foreign and untrusted checkpoints ------------
def classification_config(tmp_path: Path, epochs: int = 3, **init_args) -> str:
    """A 3-class fit on 24 Landsat tiles (12 train, 3 batches an epoch; 12 validation): about a second an epoch.
    ``lr=0`` by default: the validation loss never improves after epoch 0, so best.ckpt stays there."""
    samples.write_classification(tmp_path / "cls", per_class=8)
    return write_config(
        tmp_path / "cls.yaml",
        {
            "class_path": "rsvheat.trainers.ClassificationTask",
            "init_args": {"num_classes": 3, "img_size": 32, **{**COMMON, "lr": 0.0, **init_args}},
        },
        {
            "class_path": "rsvheat.datamodules.ClassificationDataModule",
            "init_args": {
                "root": str(tmp_path / "cls"),
                "train_ratio": 1.0,
                "val_ratio": 0.5,
                "split_file": str(tmp_path / "split.json"),
                "img_size": 32,
                "batch_size": 4,
                "num_workers": 0,
            },
        },
        tmp_path / "run",
        max_epochs=epochs,
    )


def test_cli_passes_the_data_facts_to_the_model(tmp_path):
    """The model's class count, class names and stems are the data module's (LightningCLI ``link_arguments``, applied
    when the data module is built): a config needs none of them, and a stale one is overridden."""
    config = classification_config(tmp_path, epochs=1, num_classes=5, classes=list("abcde"))
    task_cli(["fit", "--config", config])
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    folders = sorted(p.name for p in (tmp_path / "cls").iterdir() if p.is_dir())
    hparams = ckpt["hyper_parameters"]
    assert (hparams["num_classes"], hparams["classes"], hparams["modalities"]) == (3, folders, {"optical": 3})
    assert ckpt["rsvheat"]["classes"] == folders  # the checkpoint metadata is unchanged


def saved(path: Path) -> tuple[int, int]:
    """(epoch, global_step) of a checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["epoch"], ckpt["global_step"]


def logged_epochs(log_dir: Path) -> list[int]:
    return sorted({int(r["epoch"]) for r in read_csv(log_dir / "metrics.csv") if r.get("train/loss")})


def test_last_checkpoint_follows_training_while_best_follows_the_metric(tmp_path):
    config = classification_config(tmp_path, epochs=3)
    task_cli(["fit", "--config", config])
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert saved(ckpts / "best.ckpt") == (0, 3)  # val/loss never improves after epoch 0 (lr 0)
    assert saved(ckpts / "last.ckpt") == (2, 9)  # Lightning 2.6 alone left it at (0, 3) too
    # --ckpt_path last names that file: a longer run goes on from epoch 3, without repeating 1 and 2
    task_cli(["fit", "--config", config, "--trainer.max_epochs", "4", "--ckpt_path", "last"])
    assert logged_epochs(tmp_path / "run/logs/version_1") == [3]
    assert saved(ckpts / "last.ckpt") == (3, 12) and saved(ckpts / "best.ckpt") == (0, 3)


def test_missing_checkpoints_are_errors_that_name_the_file(tmp_path):
    config = classification_config(tmp_path)
    last = tmp_path / "run/checkpoints/last.ckpt"
    for command in ("validate", "test", "predict"):  # Lightning warns and goes on with an untrained model
        with pytest.raises(FileNotFoundError, match=f"--ckpt_path last: no checkpoint {re.escape(str(last))}$"):
            task_cli([command, "--config", config, "--ckpt_path", "last"])
    with pytest.raises(
        FileNotFoundError, match=f"no checkpoint {re.escape(str(last))} \\(leave out --ckpt_path to start a new run\\)"
    ):
        task_cli(["fit", "--config", config, "--ckpt_path", "last"])
    missing = tmp_path / "elsewhere/best.ckpt"
    with pytest.raises(FileNotFoundError, match=f"--ckpt_path: no checkpoint {re.escape(str(missing))}"):
        task_cli(["test", "--config", config, "--ckpt_path", str(missing)])
    assert not (tmp_path / "run").exists()  # refused before anything ran


class _Marker:
    """Unpickling it creates a file: what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_untrusted_checkpoint_is_not_unpickled(tmp_path, monkeypatch):
    config = classification_config(tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Marker(marker)}, evil)
    # torch's default (weights_only=None) now unpickles anything: only an explicit weights_only=True refuses it
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    last = tmp_path / "run/checkpoints/last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(evil.read_bytes())
    for command, ckpt, name in (("test", str(evil), evil), ("fit", str(evil), evil), ("test", "last", last)):
        with pytest.raises(ValueError, match=f"cannot read checkpoint {re.escape(str(name))}: it holds Python objects"):
            task_cli([command, "--config", config, "--ckpt_path", ckpt])
    assert not marker.exists()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ValueError, match=f"cannot read checkpoint {re.escape(str(broken))}: truncated"):
        task_cli(["test", "--config", config, "--ckpt_path", str(broken)])


def test_checkpoint_of_another_task_or_shape_is_refused(tmp_path):
    samples.write_change(tmp_path / "cd", tile=64, stride=192)
    samples.write_segmentation(tmp_path / "seg", tile=64, stride=160)
    small = {**COMMON, "img_size": 64, "decoder_width": 16, "eval_tile": 64, "eval_overlap": 16}
    quick = {"max_steps": 1, "limit_val_batches": 1}
    change = write_config(
        tmp_path / "cd.yaml",
        {"class_path": "rsvheat.trainers.ChangeDetectionTask", "init_args": small},
        {
            "class_path": "rsvheat.datamodules.ChangeDetectionDataModule",
            "init_args": {
                "train_root": str(tmp_path / "cd/train"),
                "val_root": str(tmp_path / "cd/train"),
                "crop_size": 64,
                "batch_size": 2,
                "num_workers": 0,
            },
        },
        tmp_path / "cd_run",
        **quick,
    )
    task_cli(["fit", "--config", change])
    cd_ckpt = tmp_path / "cd_run/checkpoints/last.ckpt"
    seg_data = {
        "class_path": "rsvheat.datamodules.SegmentationDataModule",
        "init_args": {
            "train_root": str(tmp_path / "seg/train"),
            "val_root": str(tmp_path / "seg/val"),
            "test_root": str(tmp_path / "seg/val"),
            "num_classes": 3,
            "crop_size": 64,
            "batch_size": 2,
            "num_workers": 0,
        },
    }
    seg_task = {"class_path": "rsvheat.trainers.SegmentationTask", "init_args": {"num_classes": 3, **small}}
    seg = write_config(tmp_path / "seg.yaml", seg_task, seg_data, tmp_path / "seg_run", **quick)
    foreign = r"is a rsvheat\.trainers\.change\.ChangeDetectionTask checkpoint, not one of .*\.SegmentationTask"
    # an explicit path: refused before Lightning turns the config into the checkpoint's task (was: KeyError 'before')
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(cd_ckpt))} {foreign}"):
        task_cli(["test", "--config", seg, "--ckpt_path", str(cd_ckpt)])
    # found as "last" in the config's own folder: refused by the task when Lightning loads it
    seg_last = tmp_path / "seg_run/checkpoints/last.ckpt"
    seg_last.parent.mkdir(parents=True)
    shutil.copy(cd_ckpt, seg_last)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(seg_last))} {foreign}"):
        task_cli(["test", "--config", seg, "--ckpt_path", "last"])
    # the right task with a decoder of another width: the tensors that do not fit are named
    seg_last.unlink()
    task_cli(["fit", "--config", seg])
    wider = {**seg_task, "init_args": {**seg_task["init_args"], "decoder_width": 32}}
    wider = write_config(tmp_path / "wider.yaml", wider, seg_data, tmp_path / "seg_run")
    with pytest.raises(
        ValueError, match=f"checkpoint {re.escape(str(seg_last))} does not fit .*SegmentationTask.* of another shape"
    ):
        task_cli(["test", "--config", wider, "--ckpt_path", "last"])


@pytest.mark.slow
def test_sigkill_during_fit_then_resume_from_last(tmp_path):
    """A task run killed (-9) after its second epoch resumes from the last epoch saved, does not redo finished epochs,
    and ends with last.ckpt at its final epoch."""
    config = classification_config(tmp_path, epochs=1000)
    last = tmp_path / "run/checkpoints/last.ckpt"

    def saved_epoch() -> int:
        try:
            return saved(last)[0] if last.exists() else -1
        except (OSError, RuntimeError, EOFError):  # replaced while being read
            return -1

    proc = subprocess.Popen(
        [sys.executable, "-m", "rsvheat.cli", "fit", "--config", config],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and saved_epoch() < 1 and proc.poll() is None:
            time.sleep(0.05)
        assert saved_epoch() >= 1, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no epoch 1"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    epoch, step = saved(last)
    assert step == 3 * (epoch + 1)  # a whole number of epochs: 3 steps each
    task_cli(["fit", "--config", config, "--trainer.max_epochs", str(epoch + 3), "--ckpt_path", "last"])
    assert logged_epochs(tmp_path / "run/logs/version_1") == [epoch + 1, epoch + 2]
    assert saved(last) == (epoch + 2, step + 6)
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporaries left


@pytest.mark.slow
def test_a_fit_run_prints_no_warning_a_user_cannot_act_on(tmp_path):
    """``rsvheat fit`` as a user runs it: none of the notes Lightning prints that no setting of ours can answer."""
    config = classification_config(tmp_path, epochs=1)
    done = subprocess.run(
        [sys.executable, "-m", "rsvheat.cli", "fit", "--config", config], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in ("args parameter", "litlogger", "LeafSpec", "will override existing callbacks", "logging interval"):
        assert noise not in output, output[-3000:]
    # the learning rate is logged every step (the schedule is something users check), in the one log folder
    rows = read_csv(tmp_path / "run/logs/version_0/metrics.csv")
    lrs = [float(v) for r in rows for k, v in r.items() if k.startswith("lr-AdamW/pg") and v]  # one per group
    assert lrs, rows[:2]  # (this config trains at lr 0)
    assert sorted(p.name for p in (tmp_path / "run/logs").iterdir()) == ["version_0"]


@pytest.mark.parametrize(("option", "expected"), [("true", [2, 2, 6, 2]), ("3", [2, 1, 0, 0]), ("false", [0, 0, 0, 0])])
def test_grad_checkpointing_option_from_the_command_line(option, expected, capsys):
    """``--model.grad_checkpointing``: true (every block) or N (the first N blocks), as the CLI parses it."""
    config = str(CONFIGS / "segmentation/landsat_tiny_cpu.yaml")
    with pytest.raises(SystemExit):
        task_cli(["fit", "--config", config, "--model.grad_checkpointing", option, "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    task = SegmentationTask(num_classes=2, backbone="rsvheat_tiny", grad_checkpointing=init_args["grad_checkpointing"])
    assert [stage.recomputed_blocks for stage in task.backbone.stages] == expected
