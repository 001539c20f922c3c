"""The task contract (rsvheat.models.contract): every trainer builds its network through its spec, a checkpoint is
rebuilt from its spec and hyper-parameters into the network that was trained, and serving a checkpoint (predict-scene,
predict-scenes, export, explain) imports no Lightning."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rsvheat.models.checkpoint import CheckpointError
from rsvheat.models.contract import SPECS, load_task
from rsvheat.trainers import (
    ChangeDetectionTask,
    ClassificationTask,
    DetectionTask,
    MultiLabelClassificationTask,
    SegmentationTask,
)
from tests.rasters import write

MICRO = {
    "backbone": "rsvheat_tiny",
    "img_size": 64,
    "encoder_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
}
TASKS = {
    "classification": (ClassificationTask, {"num_classes": 3}),
    "multilabel": (MultiLabelClassificationTask, {"num_classes": 4}),
    "segmentation": (SegmentationTask, {"num_classes": 3, "decoder_width": 16}),
    "change_detection": (ChangeDetectionTask, {"decoder_width": 16}),
    "detection": (DetectionTask, {"num_classes": 2, "min_size": 64, "max_size": 64}),
}


def test_every_trainer_is_bound_to_its_registered_spec():
    assert set(TASKS) == set(SPECS)
    for name, (cls, _) in TASKS.items():
        assert cls.spec is SPECS[name]
        assert cls.spec.task == f"{cls.__module__}.{cls.__qualname__}"  # what checkpoints record


def save(task, path, spec_name=None):
    meta = {
        "task": f"{type(task).__module__}.{type(task).__qualname__}",
        "stats": {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}},
        "classes": None,
    }
    if spec_name:
        meta["spec"] = spec_name
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "rsvheat": meta}, path)
    return path


@pytest.mark.parametrize("name", list(TASKS))
def test_a_checkpoint_is_rebuilt_into_the_trained_network(name, tmp_path):
    """The served network gives the trained task's outputs (old checkpoints, which name only the task class, too)."""
    cls, kwargs = TASKS[name]
    torch.manual_seed(0)
    task = cls(**MICRO, **kwargs).eval()
    for recorded in (name, None):
        served, meta = load_task(save(task, tmp_path / f"{name}.ckpt", recorded))
        assert served.spec is SPECS[name] and not served.model.training and meta["stats"]
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            if name == "change_detection":
                expected, got = task(torch.stack([x, x.flip(0)], 1)), served.model(x, x.flip(0))
            elif name == "detection":
                expected, got = task.model(list(x)), served.model(list(x))
                expected, got = [d["boxes"] for d in expected], [d["boxes"] for d in got]
            else:
                expected, got = task(x), served.model(x)
        torch.testing.assert_close(got, expected)


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    task = SegmentationTask(**MICRO, num_classes=3, decoder_width=16)
    path = save(task, tmp_path / "seg.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["num_classes"] = 5
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"seg.ckpt does not rebuild a SegmentationTask"):
        load_task(path)


def test_serving_commands_import_no_lightning(tmp_path):
    seg = save(SegmentationTask(**MICRO, num_classes=3, decoder_width=16), tmp_path / "seg.ckpt")
    scene = write(tmp_path / "scene.tif", np.random.default_rng(0).normal(size=(3, 96, 80)).astype(np.float32))
    (tmp_path / "scenes").mkdir()
    write(tmp_path / "scenes/a.tif", np.random.default_rng(1).normal(size=(3, 64, 64)).astype(np.float32))
    commands = [
        ["predict-scene", str(seg), str(scene), "-o", str(tmp_path / "map.tif"), "--tile", "64", "--overlap", "16"],
        ["predict-scenes", str(seg), str(tmp_path / "scenes/a.tif"), "-o", str(tmp_path / "maps"), "--tile", "64"],
        ["export", "-o", str(tmp_path / "seg.pt2"), "--checkpoint", str(seg), "--size", "64"],
        ["explain", str(scene), "--out", str(tmp_path / "heat"), "--checkpoint", str(seg), "--tile", "64"],
    ]
    script = textwrap.dedent(
        f"""
        import sys
        import rsvheat.inference
        from rsvheat.cli import main
        for argv in {commands!r}:
            main(argv)
        print("LIGHTNING", sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LIGHTNING []" in result.stdout, result.stdout[-2000:]
    assert (tmp_path / "map.tif").is_file() and (tmp_path / "maps/a.tif").is_file() and (tmp_path / "seg.pt2").is_file()
