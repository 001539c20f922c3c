"""LightningCLI for rsvheat's training commands: YAML configs, every option overridable on the command line."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rsvheat.arguments import DEBUG_ENV, one_line
from rsvheat.trainers.checkpoints import (
    IntervalCheckpoint,
    SameFolderCheckpointIO,
    check_class_paths,
    check_task,
    read_checkpoint,
)

#: ``--ckpt_path`` values Lightning resolves itself (not file names).
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def _quiet_lightning() -> None:
    """Silence what a user of these commands cannot act on: Lightning's advertisement for its cloud logger, its note
    that the tasks' checkpoint callback replaces the CLI's (by design: see ``TaskModule.configure_callbacks``), and a
    deprecation inside Lightning's own use of torch's pytree."""
    logger = logging.getLogger("lightning.pytorch")
    drop = _DropMessages("litlogger", "will override existing callbacks passed to Trainer")
    # the logger's own filter sees its records; its handlers' see those propagated from child loggers too
    for target in (logger, *logger.handlers):
        if not any(isinstance(f, _DropMessages) for f in target.filters):
            target.addFilter(drop)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class _ExampleHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help with the epilog (the examples) printed line by line, as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class OneLineErrorParser(LightningArgumentParser):
    """Lightning's parser whose usage errors end the process with ``rsvheat fit: error: <problem>`` and a pointer to
    ``--help`` (status 2), where jsonargparse prints the whole usage (a hundred lines) and, for a typo in a class's
    options, every type it tried with the given values dumped. ``RSVHEAT_DEBUG`` keeps jsonargparse's report."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            return super().error(message, ex)  # inside jsonargparse's own attempts it raises, as it expects
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {one_line(message)}\n(the options: {prog} --help)\n")
        self.exit(2)


def with_examples(examples: dict[str, str], backbone: str = "model.backbone") -> dict[str, Any]:
    """LightningCLI ``parser_kwargs`` that end each subcommand's ``--help`` with its examples (one per line) and the
    option that names the backbone (``backbone``: the tasks' ``model.backbone``, pre-training's ``model.variant``)."""
    epilog = f"\noptions keep Lightning's spelling: --{backbone} (the backbone variant), --ckpt_path, --trainer.*"
    return {
        # jsonargparse gives a subcommand its parent's formatter: it is set on the main parser
        "formatter_class": _ExampleHelpFormatter,
        "prog": "rsvheat",  # not the script's name (`__main__.py` under `python -m`): errors say `rsvheat fit`
        **{subcommand: {"epilog": "examples:\n" + text + epilog} for subcommand, text in examples.items()},
    }


def next_log_version(folder: Path) -> int:
    """The first ``N`` above every ``version_N`` folder in ``folder`` (0 when there is none)."""
    taken = [int(p.name.removeprefix("version_")) for p in folder.glob("version_*") if p.name[8:].isdigit()]
    return max(taken, default=-1) + 1


class RSVHeatCLI(LightningCLI):
    """Adds a ``checkpoint`` section (:class:`IntervalCheckpoint`: periodic, atomic, ``last.ckpt`` written at every
    interval) whose folder defaults to ``<trainer.default_root_dir>/checkpoints`` (stable across runs, so
    ``--ckpt_path last`` resumes), and CSV logs (plus TensorBoard when installed) under
    ``<default_root_dir>/logs/version_N``; checkpoints are written through :class:`SameFolderCheckpointIO` unless the
    config names another checkpoint plugin.

    ``--ckpt_path last`` names ``<checkpoint.dirpath>/last.ckpt``, and it or any other path that does not exist is an
    error (Lightning would warn and go on with an untrained model). Checkpoints are loaded with
    ``weights_only=True`` (tensors and plain data, never pickled code) unless ``--weights_only false`` is given."""

    #: what a run that failed before logging a metric leaves in its new log folder (removed with the folder)
    _RUN_METADATA = ("events.out.tfevents.", "hparams.yaml", "config.yaml")

    def __init__(self, *args, **kwargs) -> None:
        _quiet_lightning()
        self._new_log_dir: Path | None = None
        self._new_folders: list[Path] = []
        kwargs.setdefault("parser_class", OneLineErrorParser)
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._remove_failed_log_dir()
            raise

    def _remove_failed_log_dir(self) -> None:
        """A run that fails before it logs anything leaves no ``logs/version_N`` behind: the folder is removed when
        this run created it and it holds nothing but the run's metadata (a run that logged metrics keeps them)."""
        folder = self._new_log_dir
        if folder is None or folder.is_symlink() or not folder.is_dir():
            return
        files = list(folder.iterdir())
        if all(f.is_file() and not f.is_symlink() and f.name.startswith(self._RUN_METADATA) for f in files):
            for f in files:
                f.unlink()
            folder.rmdir()
            for created in self._new_folders:  # deepest first; only when this run made them and left them empty
                if created.is_dir() and not created.is_symlink() and not any(created.iterdir()):
                    created.rmdir()

    def parse_arguments(self, parser, args) -> None:
        # rsvheat's entry point hands over the command line it was given: "args and sys.argv both set" is expected
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(IntervalCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 500,
                # a new run in the same folder overwrites last.ckpt instead of writing last-v1.ckpt beside it, which
                # "--ckpt_path last" would not name
                "checkpoint.enable_version_counter": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir or ".")
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(root / "checkpoints")
        self._check_ckpt_path(config)
        if config.get("weights_only") is None:
            config.weights_only = True  # Lightning's default (None) leaves the choice to torch and its environment
        if config.trainer.logger in (None, True):
            classes = ["CSVLogger"] + (["TensorBoardLogger"] if _tensorboard_available() else [])
            # One version for both: each logger would otherwise number its own folder (CSV in version_0, TensorBoard
            # in version_1, as the CSV folder already exists by then).
            version = next_log_version(root / "logs")
            self._new_log_dir = root / "logs" / f"version_{version}"
            self._new_folders = [p for p in (root / "logs", root) if not os.path.lexists(p)]
            config.trainer.logger = [
                Namespace(
                    class_path=f"lightning.pytorch.loggers.{name}",
                    init_args=Namespace(save_dir=str(root), name="logs", version=version),
                )
                for name in classes
            ]
        if config.trainer.logger and not any(
            str(getattr(c, "class_path", "")).endswith("LearningRateMonitor") for c in config.trainer.callbacks or []
        ):
            # the schedule (warm-up, cosine, layer decay's groups) is part of what a user checks in the logs
            monitor = Namespace(
                class_path="lightning.pytorch.callbacks.LearningRateMonitor",
                init_args=Namespace(logging_interval="step"),
            )
            config.trainer.callbacks = [*(config.trainer.callbacks or []), monitor]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, SameFolderCheckpointIO()]
        if config.get("enable_checkpointing") is False:
            # --trainer.enable_checkpointing false: Lightning refuses a checkpoint callback beside it; ours is dropped
            callbacks = [c for c in callbacks if not isinstance(c, IntervalCheckpoint)]
        try:
            return super()._instantiate_trainer(config, callbacks)
        except (MisconfigurationException, ImportError) as err:  # e.g. --trainer.accelerator tpu without a TPU
            raise ValueError(f"the trainer cannot be built with these --trainer options: {err}") from None

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the hyper-parameters of an explicit ``--ckpt_path`` file here, into the model's config, and
        so would turn a segmentation config into the change-detection task of the checkpoint (which then fails on the
        segmentation data with ``KeyError: 'before'``). A checkpoint of another task than the config's, and one
        that cannot be read safely, are refused first."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoint = read_checkpoint(ckpt_path)
            check_class_paths(checkpoint, f"checkpoint {ckpt_path}")  # before the configured class is imported too
            check_task(checkpoint, self._configured_model_class(), f"checkpoint {ckpt_path}")
        super()._parse_ckpt_path()

    def _configured_model_class(self) -> type:
        if not self.subclass_mode_model:
            if not isinstance(self.model_class, type):
                raise TypeError(f"the CLI's model must be a LightningModule class, got {self.model_class!r}")
            return self.model_class
        module, _, name = self.config[self.config.subcommand].model.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)  # the config's class: jsonargparse has imported it

    def _check_ckpt_path(self, config: Namespace) -> None:
        ckpt = config.get("ckpt_path")
        if ckpt is None or "://" in str(ckpt):
            return
        if ckpt == "last" and "://" not in str(config.checkpoint.dirpath):
            last = Path(config.checkpoint.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt"
            if not last.is_file():
                fresh = " (leave out --ckpt_path to start a new run)" if self.subcommand == "fit" else ""
                raise FileNotFoundError(f"--ckpt_path last: no checkpoint {last}{fresh}")
            config.ckpt_path = str(last)
        elif ckpt not in _CKPT_KEYWORDS and not str(ckpt).startswith("registry:") and not Path(ckpt).is_file():
            raise FileNotFoundError(f"--ckpt_path: no checkpoint {ckpt}")


def task_cli(argv: list[str] | None = None) -> None:
    """``rsvheat fit|validate|test|predict --config configs/<task>/<name>.yaml [--section.option value ...]``.

    The config names the task (``model.class_path: rsvheat.trainers.SegmentationTask``) and its data module
    (``data.class_path: rsvheat.datamodules.SegmentationDataModule``, or any Lightning data module that yields the
    task's sample dicts, e.g. ``torchgeo.datamodules.LoveDADataModule``); see ``configs/``.
    """
    from lightning.pytorch import LightningDataModule

    from rsvheat.trainers.base import PredictionWriter, TaskModule

    class TaskCLI(RSVHeatCLI):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            # fine-tuning runs are short epochs over fixed datasets: a checkpoint (last.ckpt) per epoch
            parser.set_defaults({"checkpoint.every_n_train_steps": 0, "checkpoint.every_n_epochs": 1})
            parser.add_lightning_class_args(PredictionWriter, "predictions")
            # Facts of the data go to the model once the data module is built, instead of the task probing it in
            # setup(): its bands per stem (data.channels, e.g. {"optical": 4, "sar": 1}) become the model's stems, its
            # class count and names the model's. A data module without the attribute (change detection has no
            # classes, segmentation no class names) or a task without the argument leaves the link out.
            for source, target in (("channels", "modalities"), ("num_classes", "num_classes"), ("classes", "classes")):
                parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

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
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs/task"},
        parser_kwargs=with_examples(
            {
                "fit": "  rsvheat fit --config configs/segmentation/landsat_tiny_cpu.yaml\n"
                "  rsvheat fit --config configs/segmentation/potsdam_rsvheat_base.yaml --model.weights vheat_base "
                "--data.batch_size 4\n"
                "  rsvheat fit --config configs/segmentation/landsat_tiny_cpu.yaml --ckpt_path last   # resume",
                "validate": "  rsvheat validate --config configs/segmentation/landsat_tiny_cpu.yaml --ckpt_path best",
                "test": "  rsvheat test --config configs/segmentation/landsat_tiny_cpu.yaml --ckpt_path best",
                "predict": "  rsvheat predict --config configs/segmentation/landsat_tiny_cpu.yaml --ckpt_path best",
            }
        ),
    )
