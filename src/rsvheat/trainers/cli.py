"""LightningCLI for rsvheat's training commands: YAML configs, every option overridable on the command line."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class RSVHeatCLI(LightningCLI):
    """Adds a ``checkpoint`` section (``ModelCheckpoint``: periodic, atomic, ``last.ckpt`` kept) whose folder defaults
    to ``<trainer.default_root_dir>/checkpoints`` (stable across runs, so ``--ckpt_path last`` resumes), and CSV logs
    (plus TensorBoard when installed) under ``<default_root_dir>/logs/version_N``."""

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
