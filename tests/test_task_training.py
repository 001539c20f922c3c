"""Downstream tasks: optimisation options, each task learning a small real-pixel set (the Landsat samples), and the
``rsvheat fit|test|predict`` CLI writing checkpoints and predictions."""

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
import yaml

from rsvheat.data import samples
from rsvheat.datamodules import (
    ChangeDetectionDataModule,
    ClassificationDataModule,
    DetectionDataModule,
    SegmentationDataModule,
)
from rsvheat.models.tasks import faster_rcnn
from rsvheat.trainers import ChangeDetectionTask, ClassificationTask, DetectionTask, SegmentationTask
from rsvheat.trainers.base import build_backbone
from rsvheat.trainers.cli import task_cli

MICRO = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}
CONFIGS = Path(__file__).parents[1] / "configs"
TASKS = ("classification", "segmentation", "change", "detection")
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
    assert fit_and_score(tmp_path, task, dm, 60, "val/mAP50") > 0.5


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


def test_class_list_mismatch_between_config_and_data(tmp_path):
    samples.write_classification(tmp_path / "cls", per_class=2)
    dm = ClassificationDataModule(
        str(tmp_path / "cls"), train_ratio=1.0, split_file=str(tmp_path / "s.json"), num_workers=0
    )
    task = ClassificationTask(num_classes=5, img_size=32, **COMMON)
    with pytest.raises(ValueError, match=r"class list mismatch: the model has num_classes=5, the data .* 3 classes"):
        trainer(tmp_path, 1).fit(task, dm)
    named = ClassificationTask(num_classes=3, classes=["a", "b", "c"], img_size=32, **COMMON)
    with pytest.raises(ValueError, match=r"class list mismatch: the model has \['a', 'b', 'c'\], the data"):
        trainer(tmp_path, 1).fit(named, dm)


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
