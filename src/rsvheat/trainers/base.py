"""What the downstream tasks share: building the backbone from weights at the task resolution, freezing, AdamW with
layer-wise learning-rate decay and a warm-up + cosine schedule, the best-checkpoint callback, prediction writing."""

from __future__ import annotations

import time
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection

from rsvheat.models.contract import TaskSpec, modalities_of
from rsvheat.models.precision import compile_in_place
from rsvheat.trainers.checkpoints import IntervalCheckpoint, check_checkpoint
from rsvheat.trainers.optim import warmup_cosine

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict


def check_window(eval_tile: int, eval_overlap: int) -> None:
    """The sliding window of evaluation: ``0 <= eval_overlap < eval_tile``."""
    if not 0 <= eval_overlap < eval_tile:
        raise ValueError(f"eval_overlap ({eval_overlap}) must be in [0, eval_tile) with eval_tile = {eval_tile}")


class TaskModule(pl.LightningModule):
    """Base of the downstream tasks, shaped like TorchGeo's ``BaseTask``: ``__init__`` saves the hyper-parameters and
    calls the template methods :meth:`configure_models` (``self.backbone`` and ``self.model``, what ``forward`` and
    inference run, built by the task's ``spec``, a :class:`~rsvheat.models.contract.TaskSpec`), :meth:`configure_losses`
    and :meth:`configure_metrics` (one
    collection, cloned into ``val_metrics`` and ``test_metrics`` with the prefixes ``val/`` and ``test/``). Subclasses
    set ``monitor`` (metric name, ``"max"``/``"min"``) for the best checkpoint.

    Samples and batches are dicts with TorchGeo 0.8's keys (``image``, ``mask``, ``label``, ``bbox_xyxy``; see
    :mod:`rsvheat.data.transforms`), so a task trains on TorchGeo's datasets and data modules as on rsvheat's.

    Args:
        backbone: variant (``rsvheat_base`` = the paper's model); ``weights``: checkpoint to start from, a path or
            ``vheat_tiny``/``vheat_small``/``vheat_base`` (see :func:`build_backbone`); ``modalities``: stems, e.g.
            ``{"optical": 3}`` (the default) or ``{"optical": 4, "sar": 1}``; ``img_size``: the task resolution
            (FVE/SCE resized to it); ``drop_path_rate``; ``encoder_kwargs``: further options of the backbone (e.g.
            ``depths``, ``dims``).
        freeze_backbone: linear probe: the backbone is frozen and kept in eval mode.
        freeze_stages: the stems and the first N stages are frozen.
        lr: AdamW learning rate (of the head; the backbone's shrinks by ``layer_decay`` per block from the top, as in
            BEiT and the vHeat detection/segmentation recipes, when ``layer_decay < 1``).
        weight_decay: none on norms, biases, FVE and SCE.
        warmup_fraction, min_lr_ratio: linear warm-up over this share of the steps, then cosine decay to
            ``min_lr_ratio`` × ``lr``.
        grad_checkpointing: trade compute for activation memory: ``true`` recomputes every backbone block in the
            backward pass, an integer N the first N blocks (the high-resolution ones: most of the memory for little
            time; see :meth:`RSVHeat.set_grad_checkpointing`).
        compile: run the task's network through ``torch.compile`` (``true``: inductor, or a backend's name) in
            training, validation and Lightning's prediction (:func:`~rsvheat.models.precision.compile_in_place`);
            the weights and checkpoints are those of the eager network.
    """

    monitor: tuple[str, str] = ("val/loss", "min")
    #: the task's contract: its network, inputs, outputs and export (set by every task)
    spec: TaskSpec

    if TYPE_CHECKING:  # what the type checker knows of attributes Lightning and configure_models set

        @property
        def hparams(self) -> AttributeDict:
            """``save_hyperparameters`` stores the arguments as an ``AttributeDict`` (Lightning types it loosely)."""

        @property
        def model(self) -> torch.nn.Module:
            """What ``forward`` and inference run: a submodule (registered by :meth:`configure_models`), or the
            backbone itself, under a property, in the classification tasks."""

    def __init__(
        self,
        backbone: str = "rsvheat_base",
        weights: str | None = None,
        modalities: dict[str, int] | None = None,
        img_size: int = 224,
        drop_path_rate: float = 0.1,
        freeze_backbone: bool = False,
        freeze_stages: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        layer_decay: float = 0.9,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        encoder_kwargs: dict | None = None,
        grad_checkpointing: bool | int = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # with the subclass's arguments: Lightning collects every __init__ frame
        classes, num_classes = self.hparams.get("classes"), self.hparams.get("num_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"num_classes is {num_classes} but {len(classes)} class names are given")
        self.configure_models()
        self.configure_losses()
        metrics = self.configure_metrics()
        if metrics is not None:
            self.val_metrics = metrics.clone(prefix="val/")
            self.test_metrics = metrics.clone(prefix="test/")

    # template methods ------------------------------------------------------------------------------------------------
    def configure_models(self) -> None:
        """``self.backbone`` and ``self.model`` built by the task's :attr:`spec` from its hyper-parameters (the one
        recipe that inference uses too), the backbone started from ``weights`` and frozen as configured."""
        self.backbone, network = self.spec.build(self.hparams, self.hparams.weights)
        if network is not self.backbone:  # classification's model is its backbone (a property: weights `backbone.*`)
            self.add_module("model", network)  # as `self.model = network` does
        self.configure_backbone()
        compile_in_place(network, self.hparams.get("compile", False))

    def configure_losses(self) -> None:
        """Build the loss (``self.criterion``); none for models that compute their own (detection)."""

    def configure_metrics(self) -> MetricCollection | None:
        """The validation/test metrics, without prefix; per-class test metrics are kept by the subclass."""
        return None

    @property
    def modalities(self) -> dict[str, int]:
        """The backbone's stems (``{"optical": 3}`` unless configured)."""
        return modalities_of(self.hparams)

    def configure_backbone(self) -> None:
        """Gradient checkpointing and freezing of ``self.backbone`` as configured."""
        h = self.hparams
        num_classes = h.num_classes if self.spec.classifier_head else 0
        checkpointing = h.get("grad_checkpointing", False)  # True: every block; N: the first N
        self.backbone.set_grad_checkpointing(
            bool(checkpointing), None if isinstance(checkpointing, bool) else checkpointing
        )
        if num_classes == 0:
            self.backbone.head.requires_grad_(False)  # dense tasks do not use the classifier's norm
        if h.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.head.requires_grad_(num_classes > 0)  # the linear probe trains the classifier
        elif h.freeze_stages:
            self.backbone.stems.requires_grad_(False)
            for stage in self.backbone.stages[: h.freeze_stages]:
                stage.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.hparams.get("freeze_backbone"):
            self.backbone.eval()  # a linear probe reads fixed features: no drop path
        return self

    def head_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        backbone = {id(p) for p in self.backbone.parameters()}
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in backbone]

    def configure_optimizers(self):
        h = self.hparams
        skip = self.backbone.no_weight_decay()
        if h.layer_decay < 1:
            groups = param_groups_layer_decay(self.backbone, h.weight_decay, skip, layer_decay=h.layer_decay)
        else:
            groups = param_groups_weight_decay(self.backbone, h.weight_decay, skip)
        for group in groups:
            group["lr"] = h.lr * group.pop("lr_scale", 1.0)
            group.pop("param_names", None)
        head = self.head_parameters()
        groups += [
            {"params": [p for n, p in head if p.ndim > 1], "weight_decay": h.weight_decay, "lr": h.lr},
            {"params": [p for n, p in head if p.ndim <= 1], "weight_decay": 0.0, "lr": h.lr},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=h.lr)
        schedule = warmup_cosine(
            optimizer, int(self.trainer.estimated_stepping_batches), h.warmup_fraction, h.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_callbacks(self):
        """One checkpoint callback (:class:`IntervalCheckpoint`) keeping ``best.ckpt`` (on ``monitor``) and
        ``last.ckpt`` (the latest model, written at every checkpoint interval and when training ends, so that
        ``--ckpt_path last`` resumes where the run stopped). It takes the place of an unmonitored ``ModelCheckpoint``
        the trainer already has (the CLI's ``checkpoint`` section), keeping that one's folder and period; a trainer
        with a monitored checkpoint of its own is left as it is, and one built with
        ``enable_checkpointing=False`` writes no checkpoint.

        Both files are overwritten in place (atomically, as Lightning saves): no ``best-v1.ckpt`` when a second fit
        runs in the same folder, so ``--ckpt_path best`` always names this run's best model. Without validation
        data (a data module whose ``has_validation`` is false, or ``limit_val_batches=0``) there is nothing to rank
        on: ``best.ckpt`` is then the latest model, like ``last.ckpt``."""
        if self._trainer is None:
            return []
        speed = [] if any(isinstance(c, TrainingSpeed) for c in self.trainer.callbacks) else [TrainingSpeed()]
        present = [c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)]
        # none present: the trainer was built with enable_checkpointing=False, which must mean no checkpoint files
        if not present or any(c.monitor for c in present):
            return speed
        base = present[0]
        name, mode = self.monitor
        dm = self.trainer.datamodule
        if not getattr(dm, "has_validation", True) or self.trainer.limit_val_batches == 0:
            name = None  # an unmonitored top-1 checkpoint keeps the latest model
        return speed + [
            IntervalCheckpoint(
                dirpath=base.dirpath or Path(self.trainer.default_root_dir) / "checkpoints",
                filename="best",
                monitor=name,
                mode=mode,
                save_top_k=1,
                save_last=True,
                every_n_train_steps=base._every_n_train_steps,
                every_n_epochs=base._every_n_epochs,
                enable_version_counter=False,
            )
        ]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What inference needs besides the weights (``rsvheat predict-scene``): the task class, the normalisation
        statistics of the training data, the class names."""
        dm = self._datamodule()
        checkpoint["rsvheat"] = {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "spec": self.spec.name,
            "stats": getattr(dm, "stats", None),
            "classes": self.class_names() if "num_classes" in self.hparams else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another task or model shape is a ``ValueError`` naming both (see :func:`check_checkpoint`),
        raised before Lightning loads the weights."""
        check_checkpoint(checkpoint, self)

    def _datamodule(self) -> pl.LightningDataModule | None:
        """The trainer's data module (``None`` without a trainer or data module)."""
        # set by Lightning's data connector on every trainer, but not declared on the Trainer class
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def class_names(self) -> list[str]:
        """From the config (``classes``), else from the data module, else ``"0".."K-1"``."""
        dm = self._datamodule()
        names = self.hparams.get("classes") or getattr(dm, "classes", None)
        return list(names) if names else [str(i) for i in range(self.hparams.num_classes)]

    def run_dir(self) -> Path:
        """Folder of this run's logs (``<default_root_dir>/logs/version_N``), without a collective call."""
        trainer = self.trainer
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
        return Path(log_dir or trainer.default_root_dir)

    # prediction writing (called by PredictionWriter) -----------------------------------------------------------------
    def write_batch(self, prediction, out_dir: Path) -> None:
        raise NotImplementedError

    def finish_writing(self, out_dir: Path) -> None:
        """Write what is collected over the whole prediction run (tables)."""


class TrainingSpeed(pl.Callback):
    """Logs ``train/images_per_s`` every epoch: training images over the time from the epoch's start to its last
    training batch (data loading, forward, backward and optimiser steps; not validation or checkpointing), per
    process. Every task module adds one."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start: float = time.perf_counter()
        self._end: float | None = None  # the end of the last training batch
        self._batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end, self._batches = time.perf_counter(), self._batches + 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        if not self._batches or self._end is None or not isinstance(loader, DataLoader) or loader.batch_size is None:
            return
        per_epoch = len(cast(Sized, loader.sampler))  # this process's share under DDP (map-style datasets)
        if loader.drop_last:
            per_epoch -= per_epoch % loader.batch_size
        images = min(self._batches * loader.batch_size, per_epoch)
        pl_module.log("train/images_per_s", images / max(self._end - self._start, 1e-9), on_epoch=True)


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict_step`` returns through the task's ``write_batch`` (per batch: maps are streamed to disk)
    and ``finish_writing`` (tables), into ``output_dir`` (default ``<default_root_dir>/predictions``)."""

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        pl_module.write_batch(prediction, self._dir(trainer))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        pl_module.finish_writing(self._dir(trainer))
        print(f"predictions written to {self._dir(trainer)}")
