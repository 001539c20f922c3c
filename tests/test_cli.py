from pathlib import Path

import numpy as np
import pytest

from rsvheat.cli import main
from rsvheat.data import read_raster, sample_scene_path


def test_sample_scene_is_the_georeferenced_cc0_landsat_tile():
    image, profile = read_raster(sample_scene_path())
    assert image.shape == (3, 718, 791) and image.dtype == np.uint8
    assert profile["crs"].to_epsg() == 32618 and profile["nodata"] == 0


def test_bad_rasters_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        read_raster(tmp_path / "missing.tif")
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="cannot read raster .*corrupt.tif"):
        read_raster(tmp_path / "corrupt.tif")


def test_info_prints_both_conventions(capsys):
    main(["info", "--model", "vheat_tiny", "--img-size", "224", "--num-classes", "1000"])
    out = capsys.readouterr().out
    assert "29.56 M" in out and "4.59" in out and "30.85 M" in out


def test_user_errors_are_one_line_with_status_2_and_a_traceback_on_request(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing.ckpt"
    argv = ["predict-scene", str(missing), str(sample_scene_path()), "-o", str(tmp_path / "map.tif")]
    monkeypatch.delenv("RSVHEAT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"rsvheat predict-scene: error: checkpoint not found: {missing}\n"
    monkeypatch.setenv("RSVHEAT_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main(argv)


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    """``rsvheat demo --out .`` in a repository must not delete its ``configs/``."""
    from rsvheat.apps.demo import MARKER, _claim

    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs/mine.yaml").write_text("keep: me")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(repo)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rsvheat demo: error: {repo} is not empty") and "--overwrite" in err
    assert (repo / "configs/mine.yaml").read_text() == "keep: me" and not (repo / MARKER).exists()

    earlier = tmp_path / "earlier"  # a folder an earlier demo wrote: its subfolders are replaced, the rest kept
    (earlier / "scene").mkdir(parents=True)
    (earlier / "scene/old.tif").write_bytes(b"old")
    (earlier / "notes.txt").write_text("mine")
    (earlier / MARKER).write_text("")
    _claim(earlier, overwrite=False)
    assert not (earlier / "scene").exists() and (earlier / "notes.txt").read_text() == "mine"

    _claim(repo, overwrite=True)  # explicitly allowed: now marked, the demo's subfolders cleared
    assert (repo / MARKER).is_file() and not (repo / "configs").exists()
    fresh = tmp_path / "new/demo"
    _claim(fresh, overwrite=False)
    assert [p.name for p in fresh.iterdir()] == [MARKER]


def test_demo_labels_a_large_scene_on_a_decimated_overview(tmp_path):
    """The k-means labelling reads its whole input: a large ``--image`` is read through ``out_shape`` instead."""
    import rasterio
    from rasterio.transform import from_origin

    from rsvheat.apps.demo import _labelling_image

    assert _labelling_image(sample_scene_path(), tmp_path) == sample_scene_path()  # small: used as it is
    big = tmp_path / "big.tif"
    profile = dict(driver="GTiff", count=4, height=1500, width=2100, dtype="uint8", crs="EPSG:32618", nodata=0)
    with rasterio.open(big, "w", transform=from_origin(300000, 2700000, 10, 10), **profile) as dst:
        dst.write(np.broadcast_to(np.arange(2100, dtype=np.uint8), (4, 1500, 2100)))
    overview = _labelling_image(big, tmp_path / "data")
    with rasterio.open(overview) as src:
        assert src.shape == (731, 1024) and src.count == 3 and src.crs.to_epsg() == 32618
        assert src.bounds == pytest.approx((300000, 2700000 - 15000, 300000 + 21000, 2700000))  # same footprint


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    """The README's main job as a user runs it (``rsvheat demo``), with half its 120 pre-training steps to keep the
    suite short (the same code; the default method's learning at scale: test_pretrain_training.py): pre-train,
    fine-tune, whole-scene map, heat maps, efficiency, report."""
    import csv
    import re
    import subprocess
    import sys

    import rasterio

    done = subprocess.run(
        [sys.executable, "-m", "rsvheat.cli", "demo", "--pretrain-steps", "60", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for section in ("Pre-training", "Fine-tuning", "Whole-scene inference", "Heat maps", "Efficiency"):
        assert f". {section}" in report
    assert "60 steps of the view contrast on two augmented views" in report and "12 epochs" in report
    assert "compared with fine-tuning from random weights: too short to tell" in report
    # the contrastive term learned: a collapsed embedding sits at ln(batch of 6) = 1.79; below half of it at the end
    # (the mean of the last four logged steps: one batch of 6 is noisy)
    (metrics,) = (tmp_path / "pretrain").rglob("metrics.csv")
    con = [float(row["train/con"]) for row in csv.DictReader(metrics.open()) if row["train/con"]]
    assert len(con) == 12 and sum(con[-4:]) / 4 < 0.9, con
    assert float(re.search(r"test on its `val` tiles: OA (\d\.\d+)", report).group(1)) > 0.8  # it learned
    assert "max |difference| = 0.0e+00" in report
    assert "| rsvheat_base | 1024² | 148.40 | 148.4 |" in report
    with rasterio.open(sample_scene_path()) as src, rasterio.open(tmp_path / "scene/land_cover.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        assert set(np.unique(out.read(1))) <= {0, 1, 2, 255}
    assert (tmp_path / "heat_maps/summary.png").stat().st_size > 20_000
    assert (tmp_path / "configs/segmentation.yaml").is_file() and (tmp_path / "pretrain").is_dir()
    assert (tmp_path / ".rsvheat-demo").is_file()


def test_pretrain_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["pretrain", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: rsvheat pretrain [-c CONFIG]")


# One convention across the argparse commands -------------------------------------------------------------------------

ARGPARSE_COMMANDS = ("demo", "info", "make-samples", "predict-scene", "explain", "export", "export-encoder")


def _subparsers() -> dict:
    import argparse

    from rsvheat.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS)
def test_every_command_has_help_on_every_option_an_example_and_out(command, capsys):
    parser = _subparsers()[command]
    for action in parser._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help text"
        for option in action.option_strings:
            assert option in ("-o", "-h") or option.startswith("--") and "_" not in option, f"{command}: {option}"
    if command != "info":  # info writes nothing
        assert any(a.option_strings[:2] == ["-o", "--out"] for a in parser._actions), command
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "\nexamples:\n  rsvheat " + command in text
    assert "--output" not in text  # the old spelling works but is not shown


@pytest.mark.parametrize(
    "argv",
    [["fit", "--help"], ["pretrain", "--help"], ["torchgeo", "--help"], ["predict-scenes", "--help"], ["--help"]],
    ids=" ".join,
)
def test_lightning_and_passthrough_commands_show_examples_too(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    assert "examples:\n  rsvheat " in text
    if argv[0] in ("fit", "pretrain"):
        assert ("--model.variant" if argv[0] == "pretrain" else "--model.backbone") in text.split("examples:")[1]


def test_old_output_spellings_still_work(monkeypatch):
    from rsvheat import cli

    seen = {}
    monkeypatch.setattr(cli.arguments, "guarded", lambda command, run, args: seen.update({command: args.out}))
    cli.main(["predict-scene", "m.ckpt", "s.tif", "--output", "a.tif"])
    cli.main(["export", "b.onnx", "--size", "64"])  # the output as the first argument, as before
    cli.main(["export-encoder", "last.ckpt", "e.safetensors"])
    cli.main(["make-samples", "samples"])
    assert {k: str(v) for k, v in seen.items()} == {
        "predict-scene": "a.tif",
        "export": "b.onnx",
        "export-encoder": "e.safetensors",
        "make-samples": "samples",
    }
    cli.main(["make-samples"])
    assert str(seen["make-samples"]) == "data/samples"


def test_output_given_twice_or_not_at_all_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as twice:
        main(["export", "a.onnx", "-o", "b.onnx"])
    assert twice.value.code == 2 and "give the output once, as -o/--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        main(["export-encoder", "last.ckpt"])
    assert missing.value.code == 2 and "the following arguments are required: -o/--out" in capsys.readouterr().err


def test_the_checkpoint_is_spelled_checkpoint_in_every_command(monkeypatch, tmp_path):
    from rsvheat import cli
    from rsvheat.inference import batch, tasks

    seen = {}
    monkeypatch.setattr(cli.arguments, "guarded", lambda command, run, args: seen.update({command: args}))
    cli.main(["predict-scene", "--checkpoint", "m.ckpt", "before.tif", "after.tif", "-o", "a.tif"])
    assert (str(seen["predict-scene"].checkpoint), [str(p) for p in seen["predict-scene"].images]) == (
        "m.ckpt",
        ["before.tif", "after.tif"],
    )
    cli.main(["predict-scene", "m.ckpt", "s.tif", "-o", "a.tif"])  # the old positional spelling
    assert (str(seen["predict-scene"].checkpoint), [str(p) for p in seen["predict-scene"].images]) == (
        "m.ckpt",
        ["s.tif"],
    )
    cli.main(["export-encoder", "--checkpoint", "last.ckpt", "e.safetensors"])
    assert (str(seen["export-encoder"].checkpoint), str(seen["export-encoder"].out)) == ("last.ckpt", "e.safetensors")
    cli.main(["explain", "s.tif", "--checkpoint", "m.ckpt"])
    cli.main(["export", "-o", "m.onnx", "--checkpoint", "m.ckpt"])
    assert str(seen["explain"].checkpoint) == str(seen["export"].checkpoint) == "m.ckpt"
    mapped = {}

    def predict_scenes(checkpoint, scenes, *args, **kwargs):
        mapped.update(c=checkpoint, s=scenes)
        return {"counts": {"failed": 0}}

    monkeypatch.setattr(batch, "predict_scenes", predict_scenes)
    for argv in (["--checkpoint", "m.ckpt", "a.tif", "b.tif"], ["m.ckpt", "a.tif", "b.tif"]):
        batch.main(batch.build_parser().parse_args([*argv, "-o", "maps"]))
        assert (str(mapped["c"]), mapped["s"]) == ("m.ckpt", ["a.tif", "b.tif"])
    with pytest.raises(SystemExit) as missing:
        cli.main(["predict-scene", "s.tif", "-o", "a.tif"])
    assert missing.value.code == 2
    with pytest.raises(SystemExit) as twice:
        cli.main(["export-encoder", "a.ckpt", "--checkpoint", "b.ckpt", "-o", "e.safetensors"])
    assert twice.value.code == 2

    # --probabilities alone means the same in predict-scene as in predict-scenes: <map stem>.probabilities.tif
    written = {}
    monkeypatch.setattr(tasks, "predict_scene", lambda *a, **k: written.update(k) or [])
    monkeypatch.setattr(cli.arguments, "guarded", lambda command, run, args: run(args))
    cli.main(["predict-scene", "--checkpoint", "m.ckpt", "s.tif", "-o", str(tmp_path / "map.tif"), "--probabilities"])
    assert written["probabilities"] == tmp_path / "map.probabilities.tif"
    cli.main(["predict-scene", "m.ckpt", "s.tif", "-o", "map.tif", "--probabilities", str(tmp_path / "p.tif")])
    assert written["probabilities"] == tmp_path / "p.tif"


def test_a_typo_in_a_lightning_command_is_one_line(tmp_path, capsys):
    """A misspelt option of the task in a YAML, and an unknown option on the command line: one line naming it (with the
    option's section), where jsonargparse prints its usage and the whole config it was given."""
    config = (Path(__file__).resolve().parents[1] / "configs/segmentation/landsat_tiny_cpu.yaml").read_text()
    (tmp_path / "typo.yaml").write_text(config.replace("    backbone:", "    backbon:"))
    for argv, problem in (
        (
            ["fit", "--config", str(tmp_path / "typo.yaml")],
            "model: Problem with given class_path 'rsvheat.trainers.SegmentationTask': Option 'backbon' is not "
            "accepted",
        ),
        (["pretrain", "--model.variantt", "x"], "unrecognized arguments: --model.variantt x"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rsvheat {argv[0]}: error: ") and problem in err and len(err.splitlines()) == 2
