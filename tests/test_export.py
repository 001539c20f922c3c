"""ONNX (run with ONNX Runtime) and torch.export programs of a folded backbone and of task models equal PyTorch."""

import pytest
import torch

from rsvheat.export import export_checkpoint, export_model
from rsvheat.models.tasks import ChangeDetectionModel, SegmentationModel
from rsvheat.trainers import SegmentationTask
from tests.conftest import micro_model

MICRO = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}


@pytest.mark.slow
def test_backbone_to_onnx_and_torch_export_at_an_odd_size(tmp_path):
    x = torch.randn(1, 3, 96, 80)
    for suffix in (".onnx", ".pt2"):
        result = export_model(micro_model(), tmp_path / f"backbone{suffix}", [x])
        assert result["path"].stat().st_size > 100_000
        assert result["max_abs_diff"] < 1e-4 * max(1.0, result["reference_max_abs"])


@pytest.mark.slow
def test_segmentation_and_change_models_export(tmp_path):
    backbone = micro_model(num_classes=0, feature_norms=True)
    seg = export_model(SegmentationModel(backbone, 4, 32), tmp_path / "seg.onnx", [torch.randn(1, 3, 64, 96)])
    assert seg["max_abs_diff"] < 1e-4 * max(1.0, seg["reference_max_abs"])
    change = ChangeDetectionModel(micro_model(num_classes=0, feature_norms=True), 32)
    pair = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)]
    result = export_model(change, tmp_path / "change.pt2", pair, kind="change")
    assert result["max_abs_diff"] < 1e-4 * max(1.0, result["reference_max_abs"])


def test_export_from_a_task_checkpoint_and_bad_requests(tmp_path):
    task = SegmentationTask(num_classes=3, backbone="rsvheat_tiny", img_size=64, encoder_kwargs=MICRO)
    ckpt = tmp_path / "seg.ckpt"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": dict(task.hparams),
            "rsvheat": {
                "task": "rsvheat.trainers.segmentation.SegmentationTask",
                "stats": {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}},
                "classes": ["a", "b", "c"],
            },
        },
        ckpt,
    )
    result = export_checkpoint(tmp_path / "seg.pt2", [64, 96], ckpt)
    program = torch.export.load(str(result["path"])).module()
    assert program(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match=r"export to \.onnx or \.pt2, got seg\.bin"):
        export_checkpoint(tmp_path / "seg.bin", [64], ckpt)
    with pytest.raises(ValueError, match="not a task checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
        export_checkpoint(tmp_path / "x.pt2", [64], tmp_path / "plain.ckpt")
