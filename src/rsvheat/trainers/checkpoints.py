"""Checkpoints of rsvheat's training runs: written staged and atomically next to their target, read with
``weights_only=True``, ``last.ckpt`` kept at every interval, and checked against the task that loads them."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from rsvheat.arguments import first_line
from rsvheat.files import write_atomic
from rsvheat.models.checkpoint import read_torch_file, unreadable_checkpoint


class SameFolderCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a hidden temporary in their own folder (:func:`rsvheat.files.write_atomic`), then
    renamed onto the final name.

    Lightning's default goes through fsspec, whose temporary file lives in the system temp folder: when that is
    another filesystem, the final move is a copy onto ``last.ckpt`` that a kill can leave half-written, and a kill
    mid-write leaves a checkpoint-sized orphan in ``/tmp``. Temporaries left by a kill are removed by the next run's
    write into that folder (:func:`rsvheat.files.sweep_staging`). A failed write
    (full disk) is an ``OSError`` naming the checkpoint, and a checkpoint that cannot be read (refused by
    ``weights_only``, truncated) a ``ValueError`` naming it. Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            write_atomic(path, lambda tmp: _save_synced(checkpoint, tmp))  # removes its temporary on any failure
        except (OSError, RuntimeError) as err:
            # torch's C++ writer reports a full disk as "basic_ios::clear: iostream error" or "unexpected pos ...",
            # naming neither the file nor the cause
            raise OSError(f"could not write checkpoint {path}{_likely_cause(err)}: {first_line(err)}") from err

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:  # a refused pickle, a truncated or foreign file
            raise unreadable_checkpoint(path, err) from err


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's content for checks (tensors memory-mapped, not read), loaded with ``weights_only=True``:
    refused pickles, truncated and foreign files are a ``ValueError`` that names the file."""
    return read_torch_file(path, mmap=True)


def check_checkpoint(checkpoint: dict[str, Any], module: pl.LightningModule) -> None:
    """For ``on_load_checkpoint``, which Lightning calls before loading the weights: a checkpoint of another task, or
    whose weights do not fit ``module`` (other backbone, class count, decoder), is a ``ValueError`` that names the
    file and both sides, instead of a ``KeyError`` deep in the run or a ``RuntimeError`` listing every tensor."""
    path = module._trainer.ckpt_path if module._trainer is not None else None  # None in load_from_checkpoint
    where = f"checkpoint {path}" if path else "checkpoint"
    check_task(checkpoint, type(module), where)
    weights = checkpoint.get("state_dict")
    if not isinstance(weights, dict):
        raise ValueError(f"{where} holds no model weights ('state_dict')")
    problems = []
    expected = module.state_dict()
    if module.strict_loading:
        for what, names in (
            ("missing", expected.keys() - weights.keys()),
            ("unexpected", weights.keys() - expected.keys()),
        ):
            if names:
                listed = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
                problems.append(f"{len(names)} {what} ({listed})")
    shapes = [
        f"{name} {tuple(weights[name].shape)} vs {tuple(value.shape)}"
        for name, value in expected.items()
        if isinstance(weights.get(name), torch.Tensor) and weights[name].shape != value.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} of another shape (checkpoint vs model: {'; '.join(shapes[:3])})")
    if problems:
        raise ValueError(
            f"{where} does not fit this {_name(type(module))} (another backbone, class count or decoder in the"
            f" config?): weights {', '.join(problems)}"
        )


def check_class_paths(checkpoint: dict[str, Any], where: str) -> None:
    """Lightning hands a checkpoint's ``hyper_parameters`` to jsonargparse, which imports every ``class_path`` (and
    ``_class_path``) it names: a file would choose the code a command imports. Any class path outside rsvheat's own
    package is refused, before anything parses it."""

    def named(value: Any):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("class_path", "_class_path") and isinstance(item, str):
                    yield item
                yield from named(item)
        elif isinstance(value, list | tuple):
            for item in value:
                yield from named(item)

    for path in named(checkpoint.get("hyper_parameters")):
        if not path.startswith("rsvheat."):
            raise ValueError(f"{where} names the class path {path!r}, which is not one of rsvheat's: refused")


def check_task(checkpoint: dict[str, Any], cls: type, where: str) -> None:
    """The task a checkpoint was written by (``checkpoint["rsvheat"]["task"]``) must be ``cls`` or a parent of it."""
    meta = checkpoint.get("rsvheat")
    task = meta.get("task") if isinstance(meta, dict) else None
    if task is not None and task not in {_name(c) for c in cls.__mro__}:
        raise ValueError(f"{where} is a {task} checkpoint, not one of {_name(cls)}: use a config of that task")


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _likely_cause(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno is not None:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        return " (the disk is full or a file size limit is reached)" if full else ""
    return " (the disk may be full)"  # torch's writer drops the errno


def _save_synced(checkpoint: dict[str, Any], path: Path) -> None:
    torch.save(checkpoint, path)
    with open(path, "rb") as f:  # on disk before the rename makes it the checkpoint, also across a power cut
        os.fsync(f.fileno())


class IntervalCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``last.ckpt`` follows training, whatever the monitored metric does.

    Lightning 2.6 writes "last" only together with a top-k save at epoch intervals: with a metric that stops
    improving, ``last.ckpt`` stayed at the best epoch, so ``--ckpt_path last`` re-ran finished epochs or tested an old
    model. This class writes ``last.ckpt`` at every interval (steps or epochs) and once more when training ends
    between two intervals (``max_steps`` not a multiple of ``every_n_train_steps``). Top-k (``best.ckpt``) is
    unchanged; ``save_top_k=0`` keeps ``last.ckpt`` alone.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written before this class keep their best score when resumed
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # after this epoch's validation (and a top-k save, which writes "last" too): "last" is this epoch's model
        due = self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0
        if due:
            self._save_last_if_new(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_new(trainer)  # the steps after the last interval are not lost

    def _save_last_if_new(self, trainer: pl.Trainer) -> None:
        # skipped when this step is already saved, outside fit, in sanity checks and fast_dev_run
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# --ckpt_path values Lightning resolves itself, without a file of that name ("registry:<model>" too)
