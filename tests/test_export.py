"""ONNX (run with ONNX Runtime) and torch.export programs of a folded backbone and of task models equal PyTorch."""

import collections
import json

import numpy as np
import pytest
import torch
from torch import nn

from rsvheat.export import ExportMismatchError, export_checkpoint, export_model
from rsvheat.inference.tasks import load_task
from rsvheat.models.tasks import ChangeDetectionModel
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
    # the .pt2 program is folded: the decay filters exp(-k·t·ω²) and the resized FVE/SCE are constants in the file
    program = torch.export.load(str(tmp_path / "backbone.pt2"))
    ops = collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert ops["aten.exp.default"] == 0 and not any("upsample" in op or "interp" in op for op in ops)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.onnx", "backbone.pt2"]  # no temporary file


@pytest.mark.slow
def test_change_model_exports_to_torch_export(tmp_path):
    # (segmentation models export from checkpoints below, to both formats; the change model to ONNX further down)
    change = ChangeDetectionModel(micro_model(num_classes=0, feature_norms=True), 32)
    pair = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)]
    result = export_model(change, tmp_path / "change.pt2", pair, kind="change")
    assert result["max_abs_diff"] < 1e-4 * max(1.0, result["reference_max_abs"])


def segmentation_checkpoint(tmp_path, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
    task = SegmentationTask(num_classes=3, backbone="rsvheat_tiny", img_size=64, encoder_kwargs=MICRO)
    ckpt = tmp_path / "seg.ckpt"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": dict(task.hparams),
            "rsvheat": {
                "task": "rsvheat.trainers.segmentation.SegmentationTask",
                "stats": {"optical": {"mean": list(mean), "std": list(std)}},
                "classes": ["a", "b", "c"],
            },
        },
        ckpt,
    )
    return ckpt


def test_onnx_export_has_named_inputs_a_dynamic_batch_and_metadata(tmp_path):
    import onnx
    import onnxruntime

    ckpt = segmentation_checkpoint(tmp_path, mean=(10.0, 20.0, 30.0), std=(1.0, 2.0, 3.0))
    result = export_checkpoint(tmp_path / "seg.onnx", [64, 96], ckpt)
    session = onnxruntime.InferenceSession(str(result["path"]), providers=["CPUExecutionProvider"])
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (image.name, logits.name) == ("image", "logits")
    assert image.shape[1:] == [3, 64, 96] and isinstance(image.shape[0], str)  # a named, dynamic batch dimension
    task = load_task(ckpt)[0]
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        expected = task.model(x)
    (out,) = session.run(None, {"image": x.numpy()})
    assert out.shape == (3, 3, 64, 96) and np.abs(out - expected.numpy()).max() < 1e-3 * expected.abs().max().item()
    meta = {p.key: p.value for p in onnx.load(str(result["path"]), load_external_data=False).metadata_props}
    lists = {k: json.loads(meta[k]) for k in ("classes", "input_size", "mean", "std")}
    assert lists["classes"] == ["a", "b", "c"] and lists["input_size"] == [64, 96] and meta["bands"] == "3"
    assert lists["mean"] == [10.0, 20.0, 30.0] and lists["std"] == [1.0, 2.0, 3.0]
    assert meta["model"] == "SegmentationTask(rsvheat_tiny)" and meta["checkpoint"] == "seg.ckpt"
    # the .pt2 program carries the same facts
    export_checkpoint(tmp_path / "seg.pt2", [64], ckpt)
    extra = {"rsvheat.json": ""}
    torch.export.load(str(tmp_path / "seg.pt2"), extra_files=extra)
    assert json.loads(json.loads(extra["rsvheat.json"])["classes"]) == ["a", "b", "c"]


@pytest.mark.slow
def test_change_model_onnx_takes_before_and_after_at_any_batch(tmp_path):
    import onnxruntime

    change = ChangeDetectionModel(micro_model(num_classes=0, feature_norms=True), 32)
    pair = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)]
    result = export_model(change, tmp_path / "change.onnx", pair, kind="change", metadata={"model": "change"})
    session = onnxruntime.InferenceSession(str(result["path"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["before", "after"]
    before, after = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = change.eval()(before, after)
    (out,) = session.run(None, {"before": before.numpy(), "after": after.numpy()})
    assert np.abs(out - expected.numpy()).max() < 1e-3 * expected.abs().max().item()


def test_export_from_a_task_checkpoint_and_bad_requests(tmp_path):
    ckpt = segmentation_checkpoint(tmp_path)
    result = export_checkpoint(tmp_path / "seg.pt2", [64, 96], ckpt)
    program = torch.export.load(str(result["path"])).module()
    assert program(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match=r"seg\.bin: an export .* must be named \.onnx or \.pt2"):
        export_checkpoint(tmp_path / "seg.bin", [64], ckpt)
    with pytest.raises(ValueError, match="not a task checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
        export_checkpoint(tmp_path / "x.pt2", [64], tmp_path / "plain.ckpt")


class Drifts(nn.Module):
    """Differs once traced: what a broken exporter or runtime looks like to the check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 if torch.compiler.is_compiling() else x


def test_export_refuses_existing_outputs_and_keeps_nothing_that_fails_the_check(tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"keep me")
    x = [torch.full((1, 3, 8, 8), 2.0)]
    with pytest.raises(FileExistsError, match=r"model\.pt2 exists \(pass --overwrite"):
        export_model(Drifts(), out, x)
    with pytest.raises(FileExistsError, match=r"model\.pt2 exists"):
        export_checkpoint(out, [64], tmp_path / "not-even-read.ckpt")
    with pytest.raises(ExportMismatchError, match=r"model\.pt2: the exported model differs from PyTorch by 5\.00e-03"):
        export_model(Drifts(), out, x, overwrite=True)
    assert out.read_bytes() == b"keep me"  # checked before it replaces anything
    result = export_model(Drifts(), out, x, overwrite=True, tolerance=1e-2)
    assert result["relative_diff"] == pytest.approx(0.005) and out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # no temporary file


def test_export_cli_fails_with_status_2_above_the_tolerance(tmp_path, monkeypatch, capsys):
    import rsvheat.export
    from rsvheat.cli import main

    monkeypatch.setattr(rsvheat.export, "_Features", lambda backbone: Drifts())
    with pytest.raises(SystemExit) as failed:
        main(["export", "-o", str(tmp_path / "b.pt2"), "--size", "64", "--tolerance", "1e-6"])
    assert failed.value.code == 2
    assert "rsvheat export: error: " in capsys.readouterr().err and not (tmp_path / "b.pt2").exists()
