"""`rsvheat pretrain`: a Lightning run end to end (logs, previews, checkpoints, encoder export), resume after a normal
stop and after SIGKILL, a 2-process DDP run on CPU (gloo), and the shipped configs."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rsvheat.models.checkpoint import load_checkpoint
from rsvheat.models.rsvheat import RSVHeat
from rsvheat.trainers.pretrain import pretrain_cli
from tests.rasters import ramp, write

MICRO = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVHEAT_CACHE", str(tmp_path / "cache"))


def make_config(tmp_path: Path, steps: int, every: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        opt = ramp(3, 48, 48) + rng.integers(0, 20, (3, 48, 48)).astype(np.uint8)
        write(tmp_path / f"data/opt/{i}.png", opt)
        write(tmp_path / f"data/pairs/s2/{i}.tif", opt)
        write(tmp_path / f"data/pairs/s1/{i}.tif", rng.normal(-12, 3, (1, 48, 48)).astype(np.float32))
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "max_steps": steps,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "variant": "rsvheat_tiny",
            "encoder_kwargs": MICRO,
            "decoder_width": 16,
            "proj_dim": 8,
            "drop_path_rate": 0.0,
            "lr": 1e-3,
            "loss_weights": {"spa": 1.0, "fre": 1.0, "con": 1.0},  # every term, so every log and preview is there
        },
        "data": {
            "optical_dirs": [str(tmp_path / "data/opt")],
            "paired_dirs": [str(tmp_path / "data/pairs")],
            "crop_size": 32,
            "batch_size": 2,
            "num_workers": 0,
        },
        "checkpoint": {"every_n_train_steps": every},
        "previews": {"every_n_steps": every},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def run_cli(*args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rsvheat.cli", "pretrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **popen,
    )


def test_pretrain_run_logs_previews_checkpoints_and_export(tmp_path, monkeypatch):
    import rsvheat.trainers.checkpoints as cli

    written = []
    save = cli._save_synced
    monkeypatch.setattr(cli, "_save_synced", lambda ckpt, path: written.append(path) or save(ckpt, path))
    config = make_config(tmp_path, steps=4)
    pretrain_cli(["--config", str(config)])
    run = tmp_path / "run"
    assert ckpt_step(run / "checkpoints/last.ckpt") == 4
    assert written and all(run / "checkpoints" in p.parents for p in written)  # through SameFolderCheckpointIO
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # no epoch=0-step=4.ckpt beside it
    rows = list(csv.DictReader((run / "logs/version_0/metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/spa", "train/fre", "train/con", "train/paired/con", "train/optical/spa"} <= logged
    previews = sorted(p.name for p in (run / "logs/version_0/previews").glob("*.png"))
    assert "step_0000004_paired_sar.png" in previews and "step_0000004_optical_optical.png" in previews
    # the exported encoder loads into a plain backbone, also at another resolution (FVE/SCE resized)
    encoder_file = run / "logs/version_0/encoder.safetensors"
    for size in (32, 96):
        backbone = RSVHeat(modalities={"optical": 3, "sar": 1}, img_size=size, num_classes=0, **MICRO)
        load_checkpoint(backbone, encoder_file)
        assert backbone(torch.randn(1, 1, size, size), modality="sar").shape == (1, 64)
    from rsvheat.cli import main

    main(["export-encoder", str(run / "checkpoints/last.ckpt"), "-o", str(tmp_path / "exported.safetensors")])
    backbone = RSVHeat(modalities={"optical": 3, "sar": 1}, img_size=32, num_classes=0, **MICRO)
    load_checkpoint(backbone, tmp_path / "exported.safetensors")
    reference = RSVHeat(modalities={"optical": 3, "sar": 1}, img_size=32, num_classes=0, **MICRO)
    load_checkpoint(reference, encoder_file)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(backbone.eval()(x), reference.eval()(x))


def test_resume_continues_from_last(tmp_path):
    config = make_config(tmp_path, steps=5, every=2)
    pretrain_cli(["--config", str(config)])
    run = tmp_path / "run"
    assert ckpt_step(run / "checkpoints/last.ckpt") == 5  # the end of training, between two intervals (was: 4)
    pretrain_cli(["--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert ckpt_step(run / "checkpoints/last.ckpt") == 6
    resumed = [int(r["step"]) for r in csv.DictReader((run / "logs/version_1/metrics.csv").open())]
    assert min(resumed) >= 5  # continued, not restarted
    # a fine-tuning config refuses it, before Lightning would read its hyper-parameters into the task's config
    from rsvheat.trainers.cli import task_cli

    segmentation = str(REPO / "configs/segmentation/landsat_tiny_cpu.yaml")
    with pytest.raises(ValueError, match=r"is a rsvheat\.trainers\.pretrain\.PretrainTask checkpoint, not one of"):
        task_cli(["test", "--config", segmentation, "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    with pytest.raises(FileNotFoundError, match="no checkpoint .*/elsewhere/last.ckpt .leave out --ckpt_path"):
        pretrain_cli(
            ["--config", str(config), "--checkpoint.dirpath", str(tmp_path / "elsewhere"), "--ckpt_path", "last"]
        )


def test_bf16_autocast_and_gradient_accumulation(tmp_path):
    config = make_config(tmp_path, steps=2)
    args = ["--config", str(config), "--trainer.precision", "bf16-mixed", "--trainer.accumulate_grad_batches", "2"]
    pretrain_cli(args)
    run = tmp_path / "run"
    assert ckpt_step(run / "checkpoints/last.ckpt") == 2
    rows = list(csv.DictReader((run / "logs/version_0/metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # 2 batches per epoch (4 images, batch 2): with 2 batches accumulated per step, each step is a whole epoch
    assert [(r["step"], r["epoch"]) for r in rows if r.get("train/loss")] == [("0", "0"), ("1", "1")]
    weights = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for k, v in weights.items() if v.is_floating_point())  # fp32 master weights


def test_shipped_configs_parse(capsys):
    for config in sorted((REPO / "configs/pretrain").glob("*.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            pretrain_cli(["--config", str(config), "--print_config"])
        assert exit_info.value.code in (None, 0), config
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["variant"].startswith("rsvheat_"), config


@pytest.mark.slow
def test_sigkill_then_resume_loses_at_most_one_interval(tmp_path):
    every = 3
    config = make_config(tmp_path, steps=10_000, every=every)
    last = tmp_path / "run/checkpoints/last.ckpt"
    previews = tmp_path / "run/logs/version_0/previews"

    def reached() -> int:  # a preview per step: the newest one is the step the run had reached
        steps = [int(p.name.split("_")[1]) for p in previews.glob("step_*_optical_optical.png")]
        return max(steps, default=0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "rsvheat.cli", "pretrain", "--config", str(config), "--previews.every_n_steps", "1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and reached() < 2 * every + 1:  # past a checkpoint, not on one
            time.sleep(0.05)
        assert last.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = reached()
    for ckpt in last.parent.glob("*.ckpt"):  # whatever was on disk under a checkpoint's name is complete
        ckpt_step(ckpt)
    saved = ckpt_step(last)
    assert killed_at - every <= saved <= killed_at + 1, (killed_at, saved)
    done = run_cli("--config", str(config), "--trainer.max_steps", str(saved + 2), "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ckpt_step(last) == saved + 2
    # last.ckpt alone: no temporaries, and no step-named checkpoint of the killed run (was: epoch=0-step=6.ckpt)
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def test_checkpoints_are_written_next_to_their_target(tmp_path, monkeypatch):
    """An interrupted write leaves the old checkpoint intact and no temporary; a killed run's orphaned temporary is
    swept by the next run's first save."""
    from rsvheat.trainers.checkpoints import SameFolderCheckpointIO

    target = tmp_path / "ckpts/last.ckpt"
    SameFolderCheckpointIO().save_checkpoint({"global_step": 1}, target)
    orphan = target.parent / ".rsvheat-killed.tmp"  # a killed run's staging folder: its lock died with it
    orphan.mkdir()
    (orphan / "last.ckpt").write_bytes(b"half a checkpoint")
    (target.parent / ".mine.ckpt").write_bytes(b"a user's hidden file: never ours to delete")
    seen = []

    def interrupted(obj, path):
        seen.append(Path(path))
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SameFolderCheckpointIO().save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert target.parent in seen[0].parents and seen[0] != target  # a temporary in the checkpoint's own folder
    assert ckpt_step(target) == 1 and not orphan.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [".mine.ckpt", "last.ckpt"]


def test_failed_checkpoint_write_names_the_file(tmp_path, monkeypatch):
    """torch reports a full disk as "basic_ios::clear: iostream error", naming no file: the error names the
    checkpoint, says the disk may be full, keeps torch's error as its cause and leaves the old checkpoint alone."""
    from rsvheat.trainers.checkpoints import SameFolderCheckpointIO

    target = tmp_path / "ckpts/last.ckpt"
    SameFolderCheckpointIO().save_checkpoint({"global_step": 1}, target)

    def disk_full(obj, path):
        Path(path).write_bytes(b"the first megabytes")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        OSError, match=f"could not write checkpoint {re.escape(str(target))} .the disk may be full.: basic_ios"
    ) as err:
        SameFolderCheckpointIO().save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert isinstance(err.value.__cause__, RuntimeError)
    assert ckpt_step(target) == 1 and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]

    # a real write failure: a file size limit (EFBIG; Python ignores SIGXFSZ) stands for the full disk
    script = (
        "import resource, sys, torch\n"
        "from rsvheat.trainers.checkpoints import SameFolderCheckpointIO\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    SameFolderCheckpointIO().save_checkpoint({'w': torch.zeros(100_000)}, sys.argv[1])\n"
        "except OSError as err:\n"
        "    print(type(err.__cause__).__name__, err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith(f"RuntimeError could not write checkpoint {target} (the disk may be full): "), (
        done.stdout + done.stderr[-2000:]
    )
    assert ckpt_step(target) == 1 and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    config = make_config(tmp_path, steps=2)
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--model.negatives", "100")
    done = run_cli("--config", str(config), *ddp, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stderr + done.stdout
    assert ckpt_step(tmp_path / "run/checkpoints/last.ckpt") == 2
    # the queue holds every process's keys: per step 2 views x 2 images x 2 processes from each source, the optical
    # queue fed by the optical folder and the pairs, the SAR one by the pairs
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["model.queue_next"].tolist() == [32, 16]
    assert (tmp_path / "run/logs/version_0/encoder.safetensors").is_file()


def test_warmup_cosine_schedule_shape():
    from rsvheat.trainers.optim import warmup_cosine

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    schedule = warmup_cosine(optimizer, total_steps=20, warmup_fraction=0.25, min_lr_ratio=0.1)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(2e-3)
    assert rates[5] == pytest.approx(2.0)  # end of warm-up: the base rate
    assert all(a < b for a, b in zip(rates[:5], rates[1:6], strict=True))
    assert all(a > b for a, b in zip(rates[5:-1], rates[6:], strict=True))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)  # after the last step: min_lr_ratio × base


def test_learning_rate_follows_the_batch():
    from rsvheat.trainers.pretrain import PretrainTask, scaled_lr

    assert scaled_lr(1e-3, 256) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 64) == pytest.approx(5e-4)  # sqrt(64 / 256)
    assert scaled_lr(1e-3, 64, "linear") == pytest.approx(2.5e-4)
    assert scaled_lr(1e-3, 64, "none") == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_scaling"):
        PretrainTask(variant="rsvheat_tiny", lr_scaling="cubic", encoder_kwargs=MICRO)


def test_collapse_is_reported_as_a_warning():
    from rsvheat.pretraining.model import PretrainOutput
    from rsvheat.trainers.pretrain import PretrainTask

    task = PretrainTask(variant="rsvheat_tiny", modalities={"optical": 3}, encoder_kwargs=MICRO, decoder_width=8)
    spread = torch.randn(8, 16)
    healthy = PretrainOutput(torch.zeros(()), {}, embeddings={"optical": (spread, spread + 0.1 * torch.randn(8, 16))})
    collapsed = PretrainOutput(torch.zeros(()), {}, embeddings={"optical": (torch.ones(8, 16), torch.ones(8, 16))})
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task._watch_health("archive", healthy)
    assert not [w for w in caught if "collapsed" in str(w.message)]
    with pytest.warns(UserWarning, match=r"optical embedding of 'archive' has collapsed \(normalised std 0.000"):
        task._watch_health("archive", collapsed)


@pytest.mark.slow
def test_default_method_learns_without_collapse_at_batch_64(tmp_path):
    """The default configuration (rsvheat_tiny, the view contrast, the documented lr rule: 2.5e-4 x sqrt(64 / 256))
    at a batch of 64 small crops of the embedded Landsat scene: the view InfoNCE falls below half of ln B, the
    collapse monitor stays healthy, and no collapse is reported."""
    import warnings

    config = {
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "max_steps": 36,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
        },
        "model": {"variant": "rsvheat_tiny", "health_every_n_steps": 5},
        "data": {
            "optical_dirs": [str(REPO / "src/rsvheat/data")],
            "modalities": {"optical": 3},
            "crop_size": 32,
            "batch_size": 64,
            "num_workers": 0,
            "repeat": 2000,
        },
        "previews": {"every_n_steps": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain_cli(["--config", str(path)])
    assert not [w for w in caught if "collapsed" in str(w.message)]
    rows = list(csv.DictReader((tmp_path / "run/logs/version_0/metrics.csv").open()))
    health = {int(r["step"]): r for r in rows if r.get("health/optical/optical/std")}
    assert len(health) >= 5
    assert min(float(r["health/optical/optical/std"]) for r in health.values()) > 0.3
    # the loss of the last logged step (InfoNCE of the view pair, nothing else at one source and one modality)
    con = [float(r["train/optical/con"]) for r in rows if r.get("train/optical/con")]
    assert con[-1] < 0.5 * np.log(64), con
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    assert max(lrs) == pytest.approx(1.25e-4, rel=0.05)  # the rule's rate at batch 64, reached after the warm-up
