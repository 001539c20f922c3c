"""LightningCLI for rsvheat's training commands: YAML configs, every option overridable on the command line."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from rsvheat.files import write_atomic


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class SameFolderCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a hidden temporary file in their own folder, then renamed onto the final name.

    Lightning's default goes through fsspec, whose temporary file lives in the system temp folder: when that is
    another filesystem, the final move is a copy onto ``last.ckpt`` that a kill can leave half-written, and a kill
    mid-write leaves a checkpoint-sized orphan in ``/tmp``. Orphans this class leaves after a kill (``.<name>.*.ckpt``)
    are removed by the next run's first save. Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def __init__(self) -> None:
        super().__init__()
        self._started = time.time()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        if path.parent not in self._swept:
            self._swept.add(path.parent)
            for orphan in path.parent.glob(".*.ckpt"):  # hidden temporaries of a killed earlier run
                if orphan.stat().st_mtime < self._started:
                    orphan.unlink(missing_ok=True)
        write_atomic(path, lambda tmp: _save_synced(checkpoint, tmp))


def _save_synced(checkpoint: dict[str, Any], path: Path) -> None:
    torch.save(checkpoint, path)
    with open(path, "rb") as f:  # on disk before the rename makes it the checkpoint, also across a power cut
        os.fsync(f.fileno())


class RSVHeatCLI(LightningCLI):
    """Adds a ``checkpoint`` section (``ModelCheckpoint``: periodic, atomic, ``last.ckpt`` kept) whose folder defaults
    to ``<trainer.default_root_dir>/checkpoints`` (stable across runs, so ``--ckpt_path last`` resumes), and CSV logs
    (plus TensorBoard when installed) under ``<default_root_dir>/logs/version_N``; checkpoints are written through
    :class:`SameFolderCheckpointIO` unless the config names another checkpoint plugin."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or ".")
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")
        if config.trainer.logger in (None, True):
            classes = ["CSVLogger"] + (["TensorBoardLogger"] if _tensorboard_available() else [])
            config.trainer.logger = [
                Namespace(
                    class_path=f"lightning.pytorch.loggers.{name}", init_args=Namespace(save_dir=str(root), name="logs")
                )
                for name in classes
            ]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, SameFolderCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)


def task_cli(argv: list[str] | None = None) -> None:
    """``rsvheat fit|validate|test|predict --config configs/<task>/<name>.yaml [--section.option value ...]``.

    The config names the task (``model.class_path: rsvheat.trainers.SegmentationTask``) and its data module
    (``data.class_path: rsvheat.datamodules.SegmentationDataModule``); see ``configs/``.
    """
    from rsvheat.datamodules.base import TaskDataModule
    from rsvheat.trainers.base import PredictionWriter, TaskModule

    class TaskCLI(RSVHeatCLI):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            # fine-tuning runs are short epochs over fixed datasets: a checkpoint (last.ckpt) per epoch
            parser.set_defaults({"checkpoint.every_n_train_steps": 0, "checkpoint.every_n_epochs": 1})
            parser.add_lightning_class_args(PredictionWriter, "predictions")

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            config = self.config[self.subcommand]
            # a new process has no memory of the best model: "best" names the file the best checkpoint writes
            if self.subcommand != "fit" and config.get("ckpt_path") == "best":
                best = Path(config.checkpoint.dirpath) / "best.ckpt"
                if not best.is_file():
                    raise FileNotFoundError(f"--ckpt_path best: no {best} (run `rsvheat fit` with this config first)")
                config.ckpt_path = str(best)

    TaskCLI(
        TaskModule,
        TaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs/task"},
    )
