"""rsvheat's tasks train on TorchGeo 0.8's datasets and data modules as they are: the samples share TorchGeo's keys
(``image``, ``mask``, ``label``, ``bbox_xyxy``; a change pair as ``image`` of shape (2, C, H, W)).

Each dataset is written tiny, in its real on-disk layout (as TorchGeo's own ``tests/data`` generators do), and read
with ``download=False, checksum=False``; every task then runs one training and one validation batch
(``fast_dev_run``) with its default settings, on a micro backbone."""

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rsvheat.trainers import ChangeDetectionTask, ClassificationTask, DetectionTask, SegmentationTask

pytest.importorskip("torchgeo")
from torchgeo.datamodules import LoveDADataModule, UCMercedDataModule, VHR10DataModule  # noqa: E402
from torchgeo.datasets import LEVIRCD  # noqa: E402

MICRO = {"backbone": "rsvheat_tiny", "encoder_kwargs": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}}


def png(path: Path, array: np.ndarray) -> None:
    """``(H, W)`` or ``(H, W, 3)`` uint8 -> an image file (PNG, JPEG or TIFF by the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def rgb(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3))


def fast_dev_run(task: pl.LightningModule, dm: pl.LightningDataModule, tmp_path: Path) -> None:
    trainer = pl.Trainer(
        fast_dev_run=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False, logger=False
    )
    trainer.fit(task, dm)
    # one optimiser step on a training batch, then a validation batch scored
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(k.startswith("val/") for k in trainer.callback_metrics)


def test_classification_step_on_a_torchgeo_batch():
    task = ClassificationTask(num_classes=4, **MICRO)
    loss = task.training_step({"image": torch.randn(2, 3, 64, 64), "label": torch.tensor([0, 3])}, 0)
    loss.backward()
    assert torch.isfinite(loss) and task.model.stems.optical.conv1.weight.grad is not None


def test_classification_on_uc_merced(tmp_path):
    # UCMerced_LandUse/Images/<class>/<class>NN.tif and the split lists uc_merced-{train,val,test}.txt beside it
    rng = np.random.default_rng(0)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name in ("agricultural", "airplane"):
        for i, split in enumerate(("train", "train", "val", "test")):
            fn = f"{name}{i:02d}.tif"
            png(tmp_path / "UCMerced_LandUse" / "Images" / name / fn, rgb(rng, 32))
            splits[split].append(fn)
    for split, names in splits.items():
        (tmp_path / f"uc_merced-{split}.txt").write_text("\n".join(names) + "\n")
    dm = UCMercedDataModule(root=tmp_path, batch_size=2, download=False, checksum=False)
    fast_dev_run(ClassificationTask(num_classes=2, **MICRO), dm, tmp_path)


def test_segmentation_on_loveda(tmp_path):
    # <Split>/<Scene>/images_png/<n>.png with masks_png/<n>.png of values 0..7 (0: no data)
    rng = np.random.default_rng(0)
    for split in ("Train", "Val"):
        for scene in ("Urban", "Rural"):
            for i in range(2):
                png(tmp_path / split / scene / "images_png" / f"{i}.png", rgb(rng))
                png(tmp_path / split / scene / "masks_png" / f"{i}.png", rng.integers(0, 8, (64, 64)))
    dm = LoveDADataModule(root=tmp_path, batch_size=2, download=False, checksum=False)
    fast_dev_run(SegmentationTask(num_classes=8, **MICRO), dm, tmp_path)


def test_change_detection_on_levir_cd(tmp_path):
    # {A,B,label}/<split>_<n>.png, labels 0/255
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(2):
            png(tmp_path / "A" / f"{split}_{i}.png", rgb(rng))
            png(tmp_path / "B" / f"{split}_{i}.png", rgb(rng))
            png(tmp_path / "label" / f"{split}_{i}.png", (rng.random((64, 64)) < 0.2) * 255)

    # The dataset's samples as they are ({"image": (2, 3, H, W), "mask": (1, H, W)}), scaled to [0, 1] as the data
    # module would: LEVIRCDDataModule's VideoSequential augmentation itself fails with Kornia 0.9 ("Video and mask
    # must have the same number of frames"), before any task sees the batch.
    def scaled(sample: dict) -> dict:
        return {**sample, "image": sample["image"] / 255}

    loaders = [
        DataLoader(LEVIRCD(tmp_path, split, transforms=scaled, download=False, checksum=False), batch_size=2)
        for split in ("train", "val")
    ]
    batch = next(iter(loaders[0]))
    assert batch["image"].shape == (2, 2, 3, 64, 64) and batch["mask"].shape == (2, 1, 64, 64)
    trainer = pl.Trainer(
        fast_dev_run=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False, logger=False
    )
    trainer.fit(ChangeDetectionTask(**MICRO), *loaders)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/F1" in trainer.callback_metrics


def test_detection_on_vhr10(tmp_path):
    # "NWPU VHR-10 dataset.zip" (only its presence is checked without checksum) and the extracted folder:
    # "positive image set/NNN.jpg" and the COCO "annotations.json", whose image_id is the file number - 1
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(0)
    folder = tmp_path / "NWPU VHR-10 dataset"
    (tmp_path / "NWPU VHR-10 dataset.zip").write_bytes(b"")
    images, annotations = [], []
    for i in range(1, 6):
        png(folder / "positive image set" / f"{i:03d}.jpg", rgb(rng))
        images.append({"id": i, "file_name": f"{i:03d}.jpg", "height": 64, "width": 64})
        x, y = 8 + 4 * i, 10
        annotations.append(
            {
                "id": i,
                "image_id": i - 1,
                "category_id": 1 + i % 10,
                "bbox": [x, y, 20, 16],
                "area": 320,
                "iscrowd": 0,
                "segmentation": [[x, y, x + 20, y, x + 20, y + 16, x, y + 16]],
            }
        )
    categories = [{"id": k, "name": f"class{k}"} for k in range(1, 11)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "annotations.json").write_text(json.dumps(coco))
    dm = VHR10DataModule(root=tmp_path, batch_size=2, patch_size=64, download=False, checksum=False)
    fast_dev_run(DetectionTask(num_classes=10, **MICRO), dm, tmp_path)
