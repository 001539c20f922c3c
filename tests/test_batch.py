"""``rsvheat predict-scenes``: many scenes mapped with one checkpoint, a failing scene reported while the others are
written, re-runs that skip complete scenes, refused requests, and two gloo processes under torchrun splitting the
scenes with outputs equal to one process's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from rsvheat.inference.batch import (
    SUMMARY,
    build_parser,
    collect_scenes,
    main,
    predict_scenes,
    run,
    split_by_size,
)
from rsvheat.trainers import SegmentationTask
from tests.rasters import write

FAST = ["--tile", "64", "--overlap", "16", "--device", "cpu", "--no-cog"]


def segmentation_checkpoint(folder: Path) -> Path:
    """A task checkpoint as ``rsvheat fit`` writes it, of a micro backbone and a narrow decoder: a scene of a few
    64-pixel tiles is mapped in a fraction of a second, so the tests can map many."""
    task = SegmentationTask(
        num_classes=3,
        backbone="rsvheat_tiny",
        img_size=64,
        decoder_width=16,
        encoder_kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
    )
    path = folder / "seg.ckpt"
    meta = {
        "task": "rsvheat.trainers.segmentation.SegmentationTask",
        "stats": {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}},
        "classes": ["water", "field", "town"],
    }
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "rsvheat": meta}, path)
    return path


def scenes_in(folder: Path, shapes) -> list[Path]:
    """Small float rasters like the checkpoint's training data (mean 0, std 1): no statistics warning."""
    rng = np.random.default_rng(len(shapes))
    return [
        write(folder / f"scene{i}.tif", rng.normal(size=(3, *shape)).astype(np.float32))
        for i, shape in enumerate(shapes)
    ]


def run_main(argv) -> int:
    """The command's exit status (0 when it returns)."""
    try:
        main(build_parser().parse_args([str(a) for a in argv]))
    except SystemExit as end:
        return end.code
    return 0


def by_name(summary: dict) -> dict:
    return {Path(r["scene"]).name: r for r in summary["scenes"]}


def test_three_scenes_a_corrupt_one_and_reruns(tmp_path, capsys):
    ckpt = segmentation_checkpoint(tmp_path)
    good = scenes_in(tmp_path / "in", [(64, 80), (96, 64), (70, 70)])
    corrupt = tmp_path / "in/broken.tif"
    corrupt.write_bytes(b"II*\x00 not a tiff at all")
    out = tmp_path / "out"

    status = run_main([ckpt, tmp_path / "in/*.tif", "-o", out, "--probabilities", *FAST])
    assert status == 1  # one scene failed, after the others were mapped
    summary = json.loads((out / SUMMARY).read_text())
    records = by_name(summary)
    assert summary["counts"] == {"ok": 3, "skipped": 0, "failed": 1} and summary["processes"] == 1
    assert records["broken.tif"]["status"] == "failed" and str(corrupt) in records["broken.tif"]["error"]
    for path in good:
        assert records[path.name]["status"] == "ok" and records[path.name]["rank"] == 0
        with rasterio.open(out / f"{path.stem}.tif") as cls, rasterio.open(path) as src:
            assert cls.shape == src.shape and cls.crs == src.crs and cls.count == 1
        assert (out / f"{path.stem}.probabilities.tif").is_file()
    assert not (out / "broken.tif").exists() and not list(out.glob(".rsvheat-*"))  # nothing partial left
    printed = capsys.readouterr()
    assert "broken.tif: failed: ImageReadError" in printed.out and "1 failed" in printed.out

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("scene*.tif")}
    assert run_main([ckpt, tmp_path / "in/*.tif", "-o", out, "--probabilities", *FAST]) == 1
    assert {p: p.stat().st_mtime_ns for p in out.glob("scene*.tif")} == mtimes  # complete scenes untouched
    assert json.loads((out / SUMMARY).read_text())["counts"] == {"ok": 0, "skipped": 3, "failed": 1}

    corrupt.unlink()  # GDAL would try to read the broken file it replaces
    write(corrupt, np.zeros((3, 64, 64), np.float32))  # fixed: mapped once, the others still skipped
    assert run_main([ckpt, tmp_path / "in/*.tif", "-o", out, "--probabilities", *FAST]) == 0
    records = by_name(json.loads((out / SUMMARY).read_text()))
    assert records["broken.tif"]["status"] == "ok" and (out / "broken.tif").is_file()
    assert [records[p.name]["status"] for p in good] == ["skipped"] * 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("scene*.tif")} == mtimes

    # --overwrite maps everything again; an incomplete set (probabilities missing) is reported, never half-replaced
    (out / "scene0.probabilities.tif").unlink()
    summary = predict_scenes(ckpt, [tmp_path / "in/*.tif"], out, probabilities=True, tile=64, device="cpu", cog=False)
    record = by_name(summary)["scene0.tif"]
    assert record["status"] == "failed" and "pass --overwrite" in record["error"]
    summary = predict_scenes(
        ckpt, [tmp_path / "in/*.tif"], out, probabilities=True, tile=64, device="cpu", cog=False, overwrite=True
    )
    assert summary["counts"]["ok"] == 4 and (out / "scene0.probabilities.tif").is_file()

    # a truncated output whose header is intact (a COG keeps it in front of the data) is not complete: reported
    cog_out = tmp_path / "cog"
    predict_scenes(ckpt, [good[0]], cog_out, tile=64, device="cpu", cog=True)
    cls = cog_out / f"{good[0].stem}.tif"
    cls.write_bytes(cls.read_bytes()[: cls.stat().st_size * 2 // 3])
    with rasterio.open(cls) as src:
        assert src.count == 1  # the header still opens: what a header check sees
    record = predict_scenes(ckpt, [good[0]], cog_out, tile=64, device="cpu", cog=True)["scenes"][0]
    assert record["status"] == "failed" and f"{cls.name} cannot be read" in record["error"], record


def test_scene_lists_and_refused_requests(tmp_path):
    ckpt = segmentation_checkpoint(tmp_path)
    a, b = scenes_in(tmp_path / "data", [(64, 64), (64, 64)])
    other = write(tmp_path / "elsewhere/scene0.tif", np.zeros((3, 64, 64), np.float32))
    listing = tmp_path / "data/scenes.txt"
    listing.write_text(f"# the archive\n\nscene0.tif\n  {b}  \n# scene9.tif\nscene0.tif|scene1.tif\n")
    jobs = collect_scenes([], listing)
    assert [job.images for job in jobs] == [(a,), (b,), (a, b)]  # relative to the list, comments skipped

    with pytest.raises(ValueError, match=r"listed more than once: .*scene0\.tif \(scenes 1 and 3\)"):
        predict_scenes(ckpt, [a, b, tmp_path / "data/../data/scene0.tif"], tmp_path / "out", device="cpu")
    with pytest.raises(ValueError, match=rf"{a} and {other} would both write"):
        predict_scenes(ckpt, [a, other], tmp_path / "out", device="cpu")
    with pytest.raises(ValueError, match="would replace the input"):
        predict_scenes(ckpt, [a], tmp_path / "data", device="cpu")
    with pytest.raises(ValueError, match="matches no file"):
        predict_scenes(ckpt, [tmp_path / "nothing/*.tif"], tmp_path / "out", device="cpu")
    with pytest.raises(ValueError, match="cannot read checkpoint .*plain.ckpt"):
        (tmp_path / "plain.ckpt").write_bytes(b"")
        predict_scenes(tmp_path / "plain.ckpt", [a], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_command_line_errors_are_one_line(tmp_path, capsys):
    ckpt = segmentation_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as end:
        run([str(ckpt), "-o", str(tmp_path / "out")])
    assert end.value.code == 2
    assert (
        capsys.readouterr().err
        == "rsvheat predict-scenes: error: no scenes given: name rasters or globs, or a list file (--list)\n"
    )
    with pytest.raises(SystemExit) as end:
        run([str(ckpt), "--list", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "out")])
    assert end.value.code == 2 and "cannot read the scene list" in capsys.readouterr().err


def test_split_balances_pixels_deterministically():
    groups = split_by_size([100, 10, 60, 50, 0, 40], 2)
    assert groups == [[0, 5], [1, 2, 3, 4]]  # 140 and 120 pixels, largest first onto the lighter group
    assert split_by_size([5, 5, 5], 1) == [[0, 1, 2]]
    assert split_by_size([1], 3) == [[0], [], []]


@pytest.mark.slow
def test_two_gloo_processes_split_the_scenes_like_one(tmp_path):
    ckpt = segmentation_checkpoint(tmp_path)
    paths = scenes_in(tmp_path / "in", [(64, 64), (96, 64), (64, 128), (80, 80)])
    assert run_main([ckpt, *paths, "-o", tmp_path / "one", *FAST]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small machine: no oversubscription
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "rsvheat.inference.batch", str(ckpt), *map(str, paths), "-o", str(tmp_path / "two"), *FAST]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    summary = json.loads((tmp_path / "two" / SUMMARY).read_text())
    assert summary["processes"] == 2 and summary["counts"] == {"ok": 4, "skipped": 0, "failed": 0}
    assert [r["scene"] for r in summary["scenes"]] == [str(p) for p in paths]  # in list order, each once
    assert {r["rank"] for r in summary["scenes"]} == {0, 1}
    lines = [line for line in done.stdout.splitlines() if line.startswith("[rank ")]
    for path in paths:  # each scene mapped by exactly one process
        assert sum(f" {path}: ok" in line for line in lines) == 1
    for path in paths:
        with (
            rasterio.open(tmp_path / "one" / f"{path.stem}.tif") as one,
            rasterio.open(tmp_path / "two" / f"{path.stem}.tif") as two,
        ):
            np.testing.assert_array_equal(one.read(), two.read())
            assert one.profile == two.profile


def test_a_scene_of_the_batch_equals_predict_scene(tmp_path):
    from rsvheat.inference.tasks import predict_scene

    ckpt = segmentation_checkpoint(tmp_path)
    (path,) = scenes_in(tmp_path / "in", [(70, 90)])
    predict_scene(ckpt, [path], tmp_path / "alone.tif", tmp_path / "alone_p.tif", tile=64, overlap=16, device="cpu")
    predict_scenes(ckpt, [path], tmp_path / "out", probabilities=True, tile=64, overlap=16, device="cpu")
    for alone, batch in (("alone.tif", "scene0.tif"), ("alone_p.tif", "scene0.probabilities.tif")):
        with rasterio.open(tmp_path / alone) as a, rasterio.open(tmp_path / "out" / batch) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.profile == b.profile and a.tags(1) == b.tags(1)


def test_change_pairs_from_a_list_file(tmp_path):
    """Pairs (``before|after``) mapped by a change-detection checkpoint: each named after its first raster."""
    from rsvheat.trainers import ChangeDetectionTask

    task = ChangeDetectionTask(
        backbone="rsvheat_tiny",
        img_size=64,
        decoder_width=16,
        encoder_kwargs={"depths": [1] * 4, "dims": [8, 16, 32, 64]},
    )
    meta = {
        "task": "rsvheat.trainers.change.ChangeDetectionTask",
        "stats": {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}},
    }
    ckpt = tmp_path / "cd.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "rsvheat": meta}, ckpt)
    before, after, later = scenes_in(tmp_path / "in", [(64, 72), (64, 72), (64, 72)])
    listing = tmp_path / "in/pairs.txt"
    listing.write_text("scene0.tif | scene1.tif\nscene1.tif|scene2.tif\n")
    summary = predict_scenes(ckpt, [], tmp_path / "out", list_file=listing, tile=64, device="cpu", progress=False)
    assert summary["counts"]["ok"] == 2
    assert [r["scene"] for r in summary["scenes"]] == [f"{before}|{after}", f"{after}|{later}"]
    for name in ("scene0.tif", "scene1.tif"):
        with rasterio.open(tmp_path / "out" / name) as change:
            assert change.shape == (64, 72) and set(np.unique(change.read(1))) <= {0, 1}


def test_a_scene_mapped_by_another_run_meanwhile_is_skipped_not_failed(tmp_path):
    """Two predict-scenes into one folder: when this run finds at the rename that the other one has written the
    scene's complete outputs, the scene is skipped (with a note), not failed; an incomplete one still fails."""
    from rsvheat.inference.batch import SceneJob, _map_one

    (scene,) = scenes_in(tmp_path / "in", [(64, 64)])
    out = tmp_path / "out" / "scene0.tif"

    def other_run_first(images, outputs):
        write(out, np.zeros((1, 64, 64), np.uint8))  # the other process's complete map
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")

    record = _map_one(SceneJob((scene,)), [out], other_run_first, overwrite=False)
    assert record["status"] == "skipped" and "mapped by another run meanwhile" in record["warnings"]

    def other_run_half(images, outputs):
        out.write_bytes(b"II*\x00")  # not a readable map
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")

    out.unlink()
    record = _map_one(SceneJob((scene,)), [out], other_run_half, overwrite=False)
    assert record["status"] == "failed" and "exists" in record["error"]
