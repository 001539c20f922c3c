"""Training-batch augmentations of the data modules (``aug``): kornia and albumentations pipelines move every image of
a sample (optical and SAR stems, both dates of a change pair) and its label map with one geometry."""

from types import SimpleNamespace

import pytest
import torch

from rsvheat.data.transforms import batch_augmentation
from rsvheat.datamodules.base import TaskDataModule


def _batch():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(6, 3, 12, 12, generator=g)
    return {
        "image": image,
        "sar": image[:, :1] * 2,  # a second stem, co-registered
        "pair": torch.stack([image, -image], 1),  # a change pair (B, 2, C, H, W)
        "mask": (image[:, 0] > 0).long(),
        "label": torch.arange(6),
    }


def _check_one_geometry(before, after):
    assert after["image"].shape == before["image"].shape
    assert torch.equal(after["mask"], (after["image"][:, 0] > 0).long())  # the mask moved with the image
    assert torch.allclose(after["sar"], after["image"][:, :1] * 2)
    assert torch.allclose(after["pair"][:, 0], after["image"]) and torch.allclose(after["pair"][:, 1], -after["image"])
    assert torch.equal(after["label"], before["label"])
    assert after["mask"].dtype == torch.int64
    # something moved, and not every sample the same way (per-sample draws)
    moved = [not torch.equal(a, b) for a, b in zip(after["image"], before["image"], strict=True)]
    assert any(moved)


def test_kornia_pipeline():
    K = pytest.importorskip("kornia.augmentation")
    torch.manual_seed(0)
    aug = batch_augmentation(
        K.AugmentationSequential(K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5), K.RandomRotation90((1, 3)))
    )
    before = _batch()
    _check_one_geometry(before, aug(before))


def test_albumentations_pipeline():
    A = pytest.importorskip("albumentations")
    aug = batch_augmentation(A.Compose([A.HorizontalFlip(p=0.5), A.RandomRotate90(p=1.0)], seed=0))
    before = _batch()
    _check_one_geometry(before, aug(before))


def test_only_training_batches_are_augmented_and_bad_aug_is_named():
    flipped = TaskDataModule(aug=lambda b: {**b, "image": b["image"].flip(-1)})
    batch = _batch()
    flipped.trainer = SimpleNamespace(training=False)
    assert torch.equal(flipped.on_after_batch_transfer(batch, 0)["image"], batch["image"])
    flipped.trainer = SimpleNamespace(training=True)
    assert torch.equal(flipped.on_after_batch_transfer(batch, 0)["image"], batch["image"].flip(-1))
    assert TaskDataModule().on_after_batch_transfer(batch, 0) is batch  # no aug: the default is unchanged
    with pytest.raises(TypeError, match="kornia or albumentations"):
        TaskDataModule(aug="flip")


def test_an_albumentations_pipeline_from_a_config():
    pytest.importorskip("albumentations")
    from jsonargparse import ArgumentParser

    from rsvheat.datamodules import SegmentationDataModule

    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationDataModule, "data")
    affine = '{"class_path": "albumentations.Affine"}'
    aug = f'{{"class_path": "albumentations.Compose", "init_args": {{"transforms": [{affine}]}}}}'
    args = ["--data.train_root=a", "--data.val_root=b", "--data.num_classes=2", f"--data.aug={aug}"]
    config = parser.parse_args(args)
    data = parser.instantiate(config).data
    assert type(data.aug).__name__ == "_AlbumentationsBatch"
