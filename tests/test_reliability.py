"""The reliability promises (docs/reliability.md): untrusted files never run code, outputs are staged privately
and renamed atomically without following planted links, concurrent writers never mix, nothing of the user's is
deleted, files honour the umask, and bad input ends in one clear line with exit status 2.

Each test reproduces a defect a hostile-user battery found on an earlier main; ``BATTERY`` is the table new commands
join (command, exit status, message fragment)."""

import builtins
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from rsvheat.cli import main
from rsvheat.files import STAGING_PREFIX, staged_outputs, sweep_staging, write_atomic
from tests.rasters import ramp, write
from tests.test_task_training import COMMON

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickled, it creates ``marker``: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def task_checkpoint(path: Path, task_class, payload: Path | None = None, **kwargs) -> Path:
    """A checkpoint as ``rsvheat fit`` writes it (``rsvheat`` metadata, hyper-parameters, state dict), without
    training; with ``payload``, it also carries a :class:`Payload`."""
    task = task_class(img_size=64, **COMMON, **kwargs)
    channels = task.modalities["optical"]
    ckpt = {
        "rsvheat": {
            "task": f"{task_class.__module__}.{task_class.__qualname__}",
            "stats": {"optical": {"mean": [100.0] * channels, "std": [50.0] * channels}},
            "classes": [f"c{i}" for i in range(kwargs.get("num_classes", 1))],
        },
        "hyper_parameters": dict(task.hparams),
        "state_dict": task.state_dict(),
    }
    if payload is not None:
        ckpt["callbacks"] = {"innocent": Payload(payload)}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The battery's inputs: a segmentation and a detection checkpoint, a 256² GeoTIFF, broken files."""
    from rsvheat.trainers import DetectionTask, SegmentationTask

    root = tmp_path_factory.mktemp("inputs")
    marker = root / "PWNED"
    f = {
        "CK": task_checkpoint(root / "seg.ckpt", SegmentationTask, num_classes=3),
        "DET": task_checkpoint(root / "det.ckpt", DetectionTask, num_classes=2, min_size=64, max_size=64),
        "EVIL": task_checkpoint(root / "evil.ckpt", SegmentationTask, payload=marker, num_classes=3),
        "G": write(root / "g.tif", ramp(3, 256, 256, np.uint8)),
        "PNG": write(root / "g.png", ramp(3, 64, 64, np.uint8)),
        "EMPTY": root / "empty.ckpt",
        "RANDOM": root / "random.ckpt",
        "TRUNCATED": root / "truncated.ckpt",
        "TRUNCATED_TIF": root / "truncated.tif",
        "MARKER": marker,
    }
    f["EMPTY"].write_bytes(b"")
    f["RANDOM"].write_bytes(np.random.default_rng(0).bytes(4096))
    f["TRUNCATED"].write_bytes(f["CK"].read_bytes()[:5000])
    f["TRUNCATED_TIF"].write_bytes(f["G"].read_bytes()[:60000])
    f["ENCODER"] = root / "encoder.safetensors"
    f["ENCODER"].write_bytes(b"weights the user keeps")
    # a checkpoint whose hyper-parameters name a module to import (jsonargparse would import it)
    f["CLASS_PATH"] = root / "class_path.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "this.X"}, "state_dict": {}}, f["CLASS_PATH"])
    planted = torch.load(f["CK"], weights_only=True)
    planted["hyper_parameters"]["_class_path"] = "this.X"
    f["CLASS_PATH_TASK"] = root / "class_path_task.ckpt"
    torch.save(planted, f["CLASS_PATH_TASK"])
    return f


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and the last line of stderr of ``rsvheat argv`` (in-process)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_score_threshold_sets_which_boxes_a_detector_keeps(files, tmp_path):
    """A young detector's boxes score low: 0 keeps every box the detector proposes, 1 none; ``label`` indexes the
    class list."""
    from rsvheat.inference.tasks import load_task, predict_scene, set_score_threshold

    def boxes(threshold):
        out = tmp_path / f"b{threshold}.geojson"
        predict_scene(files["DET"], [files["G"]], out, tile=128, overlap=32, progress=False, score_threshold=threshold)
        return json.loads(out.read_text())["features"]

    everything, nothing = boxes(0.0), boxes(1.0)
    assert nothing == [] and len(everything) > 0
    assert {f["properties"]["label"] for f in everything} <= {0, 1}
    assert all(f["properties"]["class"] == f"c{f['properties']['label']}" for f in everything)
    # a task loaded once (predict-scenes) goes back to its trained threshold when the next call gives none
    task, _ = load_task(files["DET"], "cpu")
    set_score_threshold(task, 1.0)
    set_score_threshold(task, None)
    assert task.model.roi_heads.score_thresh == task.hparams["box_score_thresh"] == 0.05


def test_a_malicious_checkpoint_is_refused_and_never_runs(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RSVHEAT_DEBUG", raising=False)
    marker = files["MARKER"]
    torch.load(files["EVIL"], weights_only=False)  # the payload is real: unpickled without protection, it runs
    assert marker.exists()
    marker.unlink()
    commands = [
        ["predict-scene", files["EVIL"], files["G"], "-o", tmp_path / "o.tif"],
        ["explain", files["G"], "--checkpoint", files["EVIL"], "--out", tmp_path / "heat"],
        ["export", "-o", tmp_path / "x.onnx", "--checkpoint", files["EVIL"]],
    ]
    for argv in commands:
        code, err = run_cli(argv, capsys)
        assert code == 2 and "does not load" in err and str(files["EVIL"]) in err, (argv, err)
    from rsvheat import load_checkpoint
    from rsvheat.models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not load"):
        load_checkpoint(rsvheat_micro(), files["EVIL"])
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no folder


def rsvheat_micro():
    from tests.conftest import micro_model

    return micro_model()


def test_planted_links_are_never_followed(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    victim, victim_dir = tmp_path / "victim.txt", tmp_path / "victim_dir"
    victim.write_text("precious")
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("precious")
    # the temporary names earlier versions used, and a link named like a staging folder of ours
    for name in (".map.tif.partial", ".map.partial.tif", ".map.tif.cog.partial"):
        (out / name).symlink_to(victim)
    (out / f"{STAGING_PREFIX}planted.tmp").symlink_to(victim_dir)
    (out / "link.tif").symlink_to(victim)
    assert run_cli(["predict-scene", files["CK"], files["G"], "-o", out / "map.tif", "--tile", "128"], capsys)[0] == 0
    args = ["predict-scene", files["CK"], files["G"], "-o", out / "link.tif", "--overwrite", "--no-cog"]
    assert run_cli(args, capsys)[0] == 0
    assert victim.read_text() == "precious" and (victim_dir / "keep.txt").read_text() == "precious"
    for name in ("map.tif", "link.tif"):  # the link itself was replaced, its target left alone
        assert not (out / name).is_symlink()
        with rasterio.open(out / name) as src:
            assert src.read(1).shape == (256, 256)
    from rsvheat.data.io import write_raster

    (out / ".r.partial.tif").symlink_to(victim)
    write_raster(out / "r.tif", np.zeros((1, 8, 8), np.uint8))
    assert victim.read_text() == "precious"


def _predict_in_subprocess(files, out: Path, *extra: str) -> subprocess.Popen:
    argv = ["predict-scene", str(files["CK"]), str(files["G"]), "-o", str(out), "--probabilities"]
    argv += [str(out.with_name("p.tif")), "--tile", "64", "--overlap", "16", "--batch-size", "1", *extra]
    code = f"import sys; from rsvheat.cli import main; main({argv!r})"
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.slow
def test_two_runs_writing_the_same_outputs_never_mix(files, tmp_path):
    """Two runs at once (they used to share one temporary name): with ``--overwrite`` both complete and the outputs
    are one run's complete pair (COG); without it (plain GeoTIFF), the run that finishes second fails cleanly."""
    out = tmp_path / "o.tif"
    runs = [_predict_in_subprocess(files, out, "--overwrite") for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert all(code == 0 for code, _ in results), results
    with rasterio.open(out) as classes, rasterio.open(out.with_name("p.tif")) as probs:
        assert classes.read(1).max() < 3 and probs.count == 3
        np.testing.assert_array_equal(classes.read(1), probs.read().argmax(0))  # a complete pair
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif", "p.tif"]

    for name in ("o.tif", "p.tif"):
        (tmp_path / name).unlink()
    runs = [_predict_in_subprocess(files, out, "--no-cog") for _ in range(2)]
    results = sorted((run.wait(timeout=600), run.stderr.read()) for run in runs)
    assert [code for code, _ in results] == [0, 2], results
    assert "exists" in results[1][1] and "Traceback" not in results[1][1]
    with rasterio.open(out) as classes:
        assert classes.read(1).shape == (256, 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif", "p.tif"]


def test_a_killed_run_leaves_a_staging_folder_that_the_next_write_removes(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from rsvheat.files import staged_outputs
        with staged_outputs([{str(tmp_path / "map.tif")!r}]) as (tmp,):
            tmp.write_bytes(b"half a map")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == -signal.SIGKILL
    (orphan,) = tmp_path.glob(f"{STAGING_PREFIX}*")
    assert (orphan / "map.tif").read_bytes() == b"half a map"
    with staged_outputs([tmp_path / "other.tif"]) as (live,):
        live.write_bytes(b"x")
        assert sweep_staging(tmp_path) == []  # a running write's folder is never taken
        assert not orphan.exists()  # the killed run's was, by this write's start
    (tmp_path / "mine").mkdir()  # names that are not ours are never touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other.tif"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    from rsvheat import save_weights
    from rsvheat.data.io import write_raster
    from rsvheat.trainers.checkpoints import SameFolderCheckpointIO

    previous = os.umask(umask)
    try:
        paths = [
            write_atomic(tmp_path / "a.txt", lambda p: p.write_text("a")),
            save_weights(rsvheat_micro(), tmp_path / "w.safetensors"),
            write_raster(tmp_path / "r.tif", np.zeros((1, 8, 8), np.uint8)),
        ]
        SameFolderCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
        paths.append(tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o666 & ~umask)}


def test_make_samples_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "classification").mkdir(parents=True)
    (mine / "classification/thesis.tif").write_text("years of work")
    code, err = run_cli(["make-samples", "-o", mine], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert (mine / "classification/thesis.tif").read_text() == "years of work"


def test_a_failed_explain_leaves_no_folder(files, tmp_path, capsys):
    out = tmp_path / "a/b/heat"
    code, err = run_cli(["explain", files["TRUNCATED_TIF"], "-o", out], capsys)
    assert code == 2 and str(files["TRUNCATED_TIF"]) in err
    assert list(tmp_path.iterdir()) == []


#: ``(argv with placeholders, exit status, fragment of the last stderr line)``: the CLI's bad-input battery.
#: Placeholders are keys of the ``files`` fixture, ``OUT`` (a fresh folder), ``EXISTING_DIR`` (a folder) and
#: ``SEG_CONFIG``/``PRETRAIN_CONFIG`` (shipped configs).
BATTERY = [
    (["predict-scene", "CK", "G", "-o", "OUT/map.png"], 2, "must be named .tif or .tiff"),
    (["predict-scene", "DET", "G", "-o", "OUT/boxes.tif"], 2, "must be named .geojson or .json"),
    (["predict-scene", "DET", "PNG", "-o", "OUT/boxes.geojson"], 2, "has no CRS"),
    (["predict-scene", "DET", "G", "-o", "OUT/b.geojson", "--score-threshold", "1.5"], 2, "must be at most 1"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--score-threshold", "0.1"], 2, "applies to detection models"),
    (["predict-scenes", "CK", "G", "-o", "OUT", "--score-threshold", "0.1"], 2, "applies to detection models"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--probabilities", "OUT/p.png"], 2, ".tif or .tiff"),
    (["predict-scene", "CK", "G", "-o", "G", "--overwrite"], 2, "is the input"),
    (["predict-scene", "CK", "G", "-o", "EXISTING_DIR", "--overwrite"], 2, "is a folder"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--batch-size", "0"], 2, "--batch-size: must be at least 1"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--batch-size", "-1"], 2, "--batch-size: must be at least 1"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--tile", "16"], 2, "--tile: must be at least 32"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--tile", "64", "--overlap", "64"], 2, "overlap (64)"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--bands", "0,1,2"], 2, "1-based"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--bands", "1,2"], 2, "stem takes 3"),
    (["predict-scene", "CK", "G", "G", "-o", "OUT/m.tif", "--bands", "1,2,3"], 2, "one band selection per image"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--device", "tpu9"], 2, "device 'tpu9'"),
    (["predict-scene", "CK", "G", "-o", "OUT/m.tif", "--device", "cuda:7"], 2, "cuda"),
    (["predict-scene", "EMPTY", "G", "-o", "OUT/m.tif"], 2, "empty.ckpt: the file is empty"),
    (["predict-scene", "RANDOM", "G", "-o", "OUT/m.tif"], 2, "cannot read checkpoint"),
    (["predict-scene", "TRUNCATED", "G", "-o", "OUT/m.tif"], 2, "cannot read checkpoint"),
    (["predict-scene", "CK", "OUT/missing.tif", "-o", "OUT/m.tif"], 2, "image not found"),
    (["predict-scene", "CK", "TRUNCATED_TIF", "-o", "OUT/m.tif"], 2, "truncated.tif"),
    (["explain", "TRUNCATED_TIF", "--out", "OUT/heat"], 2, "truncated.tif"),
    (["explain", "G", "--checkpoint", "EMPTY", "--out", "OUT/heat"], 2, "the file is empty"),
    (["explain", "G", "--tile", "8", "--out", "OUT/heat"], 2, "--tile: must be at least 32"),
    (["explain", "G", "--model", "rsvheat_tiny", "--bands", "9", "--out", "OUT/heat"], 2, "the file has 3"),
    (["explain", "G", "--model", "rsvheat_tiny", "--bands", "3,2,7", "--out", "OUT/heat"], 2, "the file has 3"),
    (["export", "-o", "OUT/x.onnx", "--size", "-64"], 2, "--size: must be at least 32"),
    (["export", "-o", "OUT/x.txt"], 2, "must be named .onnx or .pt2"),
    (["export", "-o", "OUT/x.onnx", "--checkpoint", "RANDOM"], 2, "cannot read checkpoint"),
    (["export", "-o", "OUT/x.onnx", "--tolerance", "nan"], 2, "--tolerance: must be at least 0.0"),
    (["export-encoder", "EMPTY", "-o", "OUT/e.safetensors"], 2, "the file is empty"),
    (["export-encoder", "TRUNCATED", "-o", "OUT/e.safetensors"], 2, "cannot read checkpoint"),
    (["export-encoder", "CK", "-o", "CK"], 2, "is the input"),
    (["export-encoder", "CK", "-o", "CK", "--overwrite"], 2, "is the input"),
    (["export-encoder", "CK", "-o", "ENCODER"], 2, "exists (pass --overwrite"),
    (["export-encoder", "CK", "-o", "OUT/x.txt"], 2, "must be named .safetensors"),
    (["info", "--img-size", "-224"], 2, "--img-size: must be at least 32"),
    (["bench", "--device", "tpu", "--quick", "-o", "OUT/bench"], 2, "--device 'tpu'"),
    (["info", "--model", "nonexistent"], 2, "nonexistent"),
    (["demo", "--pretrain-steps", "-5", "--out", "OUT/demo"], 2, "--pretrain-steps: must be at least 1"),
    (["demo", "--epochs", "0", "--out", "OUT/demo"], 2, "--epochs: must be at least 1"),
    (["demo", "--train-root", "OUT/nonexistent", "--num-classes", "3", "--out", "OUT/demo"], 2, "--train-root"),
    (["make-samples", "-o", "EXISTING_DIR"], 2, "not empty"),
    (["test", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--ckpt_path", "last"], 2, "last.ckpt"),
    (["test", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--ckpt_path", "EVIL"], 2, "not load"),
    (
        ["pretrain", "--config", "PRETRAIN_CONFIG", "--trainer.default_root_dir", "OUT", "--ckpt_path", "EMPTY"],
        2,
        "empty",
    ),
    (
        ["fit", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--trainer.accelerator", "tpu"],
        2,
        "cannot be built with these --trainer options",
    ),
    # a run that fails before logging leaves no empty logs/version_N (nor the folders it made for it)
    (
        ["fit", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--data.train_root", "OUT/no"],
        2,
        "not found",
    ),
    # the problem, not jsonargparse's report of every Union subtype it tried
    (
        ["fit", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--model.init_args.backbone", "nope"],
        2,
        "rsvheat fit: error: unknown model 'nope'; available:",
    ),
    # a checkpoint must not choose what a command imports
    (
        ["validate", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--ckpt_path", "CLASS_PATH"],
        2,
        "'this.X'",
    ),
    (
        ["test", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--ckpt_path", "CLASS_PATH_TASK"],
        2,
        "'this.X'",
    ),
    (["fit", "--config", "SEG_CONFIG", "--trainer.default_root_dir", "OUT", "--ckpt_path", "CLASS_PATH"], 2, "refused"),
    (
        ["pretrain", "--config", "PRETRAIN_CONFIG", "--trainer.default_root_dir", "OUT", "--ckpt_path", "CLASS_PATH"],
        2,
        "'this.X'",
    ),
]


@pytest.mark.parametrize(
    ("argv", "status", "fragment"), BATTERY, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_input_battery(files, tmp_path, capsys, monkeypatch, argv, status, fragment):
    if "cuda" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.delenv("RSVHEAT_DEBUG", raising=False)
    out, existing = tmp_path / "out", tmp_path / "existing"
    (existing / "sub").mkdir(parents=True)
    (existing / "sub/user.txt").write_text("mine")
    before = {k: (v.stat().st_size if v.exists() else None) for k, v in files.items()}

    def resolve(arg: str) -> str:
        if arg in files:
            return str(files[arg])
        configs = {
            "SEG_CONFIG": "segmentation/landsat_tiny_cpu.yaml",
            "PRETRAIN_CONFIG": "pretrain/rsvheat_tiny_bigearthnet_landsat.yaml",
        }
        if arg in configs:
            return str(REPO / "configs" / configs[arg])
        return arg.replace("OUT", str(out)).replace("EXISTING_DIR", str(existing))

    imported_before = "this" in sys.modules
    code, err = run_cli([resolve(a) for a in argv], capsys)
    assert imported_before or "this" not in sys.modules  # no module named by a file was imported
    assert code == status, err
    assert fragment in err, err
    assert err.startswith("rsvheat ") or err.startswith("usage") or ": error: " in err
    assert not out.exists()  # nothing written, no folder left
    assert (existing / "sub/user.txt").read_text() == "mine"
    assert before == {k: (v.stat().st_size if v.exists() else None) for k, v in files.items()}


def test_huge_tiles_are_clamped_or_refused_before_anything_is_allocated(files, tmp_path, capsys, monkeypatch):
    """A tile larger than the scene is the scene (a correct map); a tile whose buffers and activations exceed the
    memory available is refused in one line before any work, by predict-scene and explain alike."""
    monkeypatch.delenv("RSVHEAT_DEBUG", raising=False)
    out = tmp_path / "m.tif"
    assert run_cli(["predict-scene", files["CK"], files["G"], "-o", out, "--tile", "65536", "--no-cog"], capsys)[0] == 0
    with rasterio.open(out) as src:
        assert src.read(1).shape == (256, 256)
    import psutil

    class Small:
        available = 16 * 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small)
    for argv in (
        ["predict-scene", files["CK"], files["G"], "-o", tmp_path / "n.tif", "--tile", "256"],
        ["explain", files["G"], "--model", "rsvheat_tiny", "--tile", "65536", "--out", tmp_path / "heat"],
    ):
        code, err = run_cli(argv, capsys)
        assert code == 2 and "GiB available: use a smaller --tile" in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]


def test_info_counts_on_the_meta_device_with_bounded_memory():
    """``rsvheat info`` at 2048² counts shapes, not activations: a few hundred MB of peak memory, not 9 GB."""
    script = (
        "from rsvheat.apps.bench import peak_rss_mb; from rsvheat.cli import main; "
        "main(['info', '--model', 'rsvheat_base', '--img-size', '2048', '--num-classes', '0']); "
        "print('peak_mib', peak_rss_mb())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_gib = float(done.stdout.split("peak_mib")[-1]) / 2**10
    assert peak_gib < 1.5, done.stdout
    assert "params  train   216.21 M" in done.stdout  # the same count as a real model's (tests/test_counting.py)


def test_full_disk_writes_end_in_one_line_naming_the_file(tmp_path):
    """A full disk (a file size limit stands for it: EFBIG, Python ignores SIGXFSZ) while writing encoder weights or
    a .pt2 program: an OSError naming the file, no abort, nothing left behind."""
    script = (
        "import resource, sys, torch\n"
        "from rsvheat.models.checkpoint import save_weights\n"
        "from rsvheat.export import export_checkpoint\n"
        "from tests.conftest import micro_model\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"
        "for write in (lambda: save_weights(micro_model(), sys.argv[1] + '/e.safetensors'),\n"
        "              lambda: export_checkpoint(sys.argv[1] + '/x.pt2', [64], progress=False)):\n"
        "    try:\n"
        "        write()\n"
        "    except OSError as err:\n"
        "        print('OSError', err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr[-3000:]
    assert (
        lines[0].startswith("OSError [Errno 27] could not write ")
        and "e.safetensors (the disk may be full)" in lines[0]
    )
    assert "x.pt2 (the disk may be full)" in lines[1], lines
    assert list(tmp_path.iterdir()) == []
