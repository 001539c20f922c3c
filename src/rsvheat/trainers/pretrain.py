"""Lightning module for RS-vHeat pre-training, the reconstruction-preview callback and the encoder export."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from timm.optim import param_groups_weight_decay
from torchvision.utils import make_grid, save_image

from rsvheat.data.pretrain import skipped_count
from rsvheat.evaluation import TransferMonitor
from rsvheat.files import check_output, refuse_inputs_as_outputs, write_atomic
from rsvheat.models.checkpoint import save_weights
from rsvheat.pretraining.model import COLLAPSE_STD, FrequencyPretrainer, PretrainOutput, embedding_health
from rsvheat.trainers.checkpoints import check_checkpoint, read_checkpoint
from rsvheat.trainers.optim import warmup_cosine

ENCODER_FILE = "encoder.safetensors"
#: the learning-rate rules: the multiplier of ``lr`` for a batch of B images (``lr`` is the rate at 256)
LR_SCALING = {"sqrt": lambda b: math.sqrt(b / 256), "linear": lambda b: b / 256, "none": lambda b: 1.0}


def scaled_lr(lr: float, batch_size: int, rule: str = "sqrt") -> float:
    """The learning rate for ``batch_size`` images per step, ``lr`` being the rate at 256. ``"sqrt"`` is the
    square-root rule for adaptive optimisers (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms", NeurIPS 2022): AdamW's update size does not grow with the batch as SGD's does, so the linear rule
    (Goyal et al. 2017) overshoots at large batches."""
    return lr * LR_SCALING[rule](batch_size)


class PretrainTask(pl.LightningModule):
    """Frequency-masking pre-training of an RS-vHeat encoder (see :mod:`rsvheat.pretraining.model`).

    Args (model): ``variant``, ``modalities``, ``img_size``, ``ratio_range``, ``sector_degrees``, ``ratio_part``,
        ``loss_weights``, ``views``, ``reconstruct_from``, ``crop_scale``, ``local_crops``, ``local_scale``,
        ``jitter``, ``masked_views``, ``decoder_width``, ``decoder_depth``, ``proj_dim``, ``temperature``,
        ``negatives``, ``momentum``, ``drop_path_rate`` as in :class:`FrequencyPretrainer`.
    Args (optimisation): AdamW with ``weight_decay`` (none on norms, biases, FVE and SCE) and ``betas``. ``lr`` is the
        rate at a batch of 256 images; the rate used follows the batch (:func:`scaled_lr`): ``lr_scaling="sqrt"``
        (default) multiplies it by ``sqrt(B / 256)``, ``"linear"`` by ``B / 256``, ``"none"`` uses ``lr`` as given,
        with ``B`` = the data module's ``batch_size`` (per source) x devices x gradient accumulation.
        Linear warm-up over ``warmup_fraction`` of the steps, then cosine to ``min_lr_ratio`` x the rate.
        ``health_every_n_steps``: every N steps the collapse monitors of :func:`embedding_health` are logged
        (``health/<source>/<modality>/{std,rank,alignment,uniformity,nce_ratio}``) and a collapsed embedding
        (``std`` under :data:`COLLAPSE_STD`) is reported as a warning; 0 turns them off.
        ``grad_checkpointing`` trades compute for activation memory: ``true`` recomputes every encoder block in the
        backward pass, an integer N the first N (see :meth:`RSVHeat.set_grad_checkpointing`).
        ``encoder_kwargs``: more :class:`RSVHeat` arguments (e.g. ``depths``/``dims`` of a custom size).
    """

    def __init__(
        self,
        variant: str = "rsvheat_base",
        modalities: dict[str, int] | None = None,
        img_size: int = 224,
        ratio_range: tuple[float, float] = (0.2, 0.3),
        sector_degrees: float | None = None,
        ratio_part: str = "high",
        loss_weights: dict[str, float] | None = None,
        views: str = "crops",
        reconstruct_from: str = "low",
        crop_scale: tuple[float, float] = (0.25, 1.0),
        local_crops: int = 0,
        local_scale: tuple[float, float] = (0.05, 0.25),
        jitter: float = 0.0,
        masked_views: int = 2,
        decoder_width: int = 256,
        decoder_depth: int = 1,
        proj_dim: int = 128,
        temperature: float = 0.2,
        negatives: int = 0,
        momentum: float = 0.99,
        drop_path_rate: float = 0.1,
        lr: float = 2.5e-4,
        lr_scaling: str = "sqrt",
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.025,
        grad_checkpointing: bool | int = False,
        health_every_n_steps: int = 25,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if lr_scaling not in LR_SCALING:
            raise ValueError(f"lr_scaling must be one of {sorted(LR_SCALING)}, got {lr_scaling!r}")
        self.save_hyperparameters()
        self.model = FrequencyPretrainer(
            variant=variant,
            modalities=modalities,
            img_size=img_size,
            ratio_range=ratio_range,
            sector_degrees=sector_degrees,
            ratio_part=ratio_part,
            loss_weights=loss_weights,
            views=views,
            reconstruct_from=reconstruct_from,
            crop_scale=crop_scale,
            local_crops=local_crops,
            local_scale=local_scale,
            jitter=jitter,
            masked_views=masked_views,
            decoder_width=decoder_width,
            decoder_depth=decoder_depth,
            proj_dim=proj_dim,
            temperature=temperature,
            negatives=negatives,
            momentum=momentum,
            encoder_kwargs={"drop_path_rate": drop_path_rate, **(encoder_kwargs or {})},
        )
        self.model.encoder.set_grad_checkpointing(  # True: every block; N: the first N
            bool(grad_checkpointing), None if isinstance(grad_checkpointing, bool) else grad_checkpointing
        )

    @property
    def encoder(self):
        return self.model.encoder

    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int):
        # CombinedLoader gives {source: {modality: (B, C, H, W)}}; every source contributes equally.
        if not batch:
            raise ValueError("empty pre-training batch: no source gave images")
        losses, previews = [], {}
        terms: dict[str, list[torch.Tensor]] = {}
        for source, images in batch.items():
            out = self.model(images)
            losses.append(out.loss)
            for name, value in out.terms.items():
                terms.setdefault(name, []).append(value.detach())
                self.log(f"train/{source}/{name}", value.detach(), batch_size=_batch_size(images))
            for name, value in out.parts.items():  # diagnostics: not part of the loss
                self.log(f"train/{source}/{name}", value, batch_size=_batch_size(images))
            self._watch_health(source, out)
            previews[source] = out.previews
        loss = torch.stack(losses).mean()
        bs = sum(_batch_size(images) for images in batch.values())
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for name, values in terms.items():
            self.log(f"train/{name}", torch.stack(values).mean(), prog_bar=True, batch_size=bs)
        return {"loss": loss, "previews": previews}

    def _watch_health(self, source: str, out: PretrainOutput) -> None:
        every = self.hparams["health_every_n_steps"]
        if not every or self.global_step % every or not out.embeddings:
            return
        for modality, (first, second) in out.embeddings.items():
            health = embedding_health(first, second, self.model.temperature)
            for name, value in health.items():
                self.log(f"health/{source}/{modality}/{name}", value, batch_size=first.shape[0])
            if health["std"] < COLLAPSE_STD:
                rank_zero_warn(
                    f"step {self.global_step}: the {modality} embedding of '{source}' has collapsed (normalised "
                    f"std {health['std']:.3f} < {COLLAPSE_STD}, effective rank {health['rank']:.1f}, InfoNCE "
                    f"{health['nce_ratio']:.2f} x ln B): lower model.lr or check the views and the data"
                )

    def effective_batch_size(self) -> int | None:
        """Images per source in one optimiser step over all devices: the rule's ``B`` (None without a data module)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = datamodule.hparams.get("batch_size") if datamodule is not None else None
        if per_device is None:
            return None
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        h = self.hparams
        skip = {f"model.encoder.{n}" for n in self.model.encoder.no_weight_decay()}
        groups = param_groups_weight_decay(self, h.weight_decay, no_weight_decay_list=skip)
        batch = self.effective_batch_size()
        if batch is None and h.lr_scaling != "none":
            rank_zero_warn(f"batch size unknown (no data module): lr {h.lr} used as given, not scaled")
        lr = scaled_lr(h.lr, batch, h.lr_scaling) if batch is not None else h.lr
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(h.betas))
        total = int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine(optimizer, total, h.warmup_fraction, h.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the task, as fine-tuning checkpoints name theirs: `rsvheat fit` refuses this checkpoint, and the reverse
        checkpoint["rsvheat"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}"}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint(checkpoint, self)  # another task or model size: a ValueError naming the file

    def on_train_end(self) -> None:
        # set on every trainer by Lightning's data connector, but not declared on the Trainer class
        datasets = getattr(getattr(self.trainer, "datamodule", None), "datasets", {}) or {}
        skipped = {name: skipped_count(ds) for name, ds in datasets.items()}
        if any(skipped.values()):
            detail = ", ".join(f"{name}: {n}" for name, n in skipped.items() if n)
            rank_zero_warn(f"skip_bad: {sum(skipped.values())} bad file(s) were skipped on this process ({detail})")
        if self.trainer.is_global_zero:
            path = save_weights(
                self.model.encoder,
                Path(_run_dir(self.trainer)) / ENCODER_FILE,
                extra={"source": "rsvheat pretrain", "global_step": str(self.global_step)},
            )
            print(f"encoder weights written to {path}")


def _batch_size(images: Mapping[str, torch.Tensor]) -> int:
    return next(iter(images.values())).shape[0]


def _run_dir(trainer: pl.Trainer) -> str:
    # Not ``trainer.log_dir``: it broadcasts, and this runs on rank 0 only (a collective there would hang DDP).
    log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
    return log_dir or trainer.default_root_dir


def _display(x: torch.Tensor, reference: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """``(C, H, W)`` -> 3-channel ``[0, 1]`` image; stretched to the 2-98 % range of ``reference`` (or, for the
    zero-mean high-frequency part, symmetrically around 0)."""
    x, reference = x[:3].float(), reference[:3].float()
    if symmetric:
        scale = torch.quantile(reference.abs().flatten(), 0.98).clamp_min(1e-6)
        out = x / (2 * scale) + 0.5
    else:
        lo, hi = torch.quantile(reference.flatten(), torch.tensor([0.02, 0.98], device=x.device))
        out = (x - lo) / (hi - lo).clamp_min(1e-6)
    out = out.clamp(0, 1)
    return out if out.shape[0] == 3 else out[:1].expand(3, -1, -1)  # 1- or 2-band (SAR) images shown as grey


def preview_grid(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, recon: torch.Tensor, max_images: int = 4):
    """Rows: images; columns: original, ``I_low``, ``I_high``, reconstruction. Returns a ``(3, H', W')`` grid."""
    tiles = []
    for i in range(min(max_images, x.shape[0])):
        tiles += [
            _display(x[i], x[i]),
            _display(low[i], x[i]),
            _display(high[i], high[i], True),
            _display(recon[i], x[i]),
        ]
    return make_grid(torch.stack(tiles).cpu(), nrow=4, padding=2, pad_value=1.0)


def save_png_atomic(image: torch.Tensor, path: Path) -> Path:
    """Write a ``(3, H, W)`` ``[0, 1]`` image as PNG, atomically."""
    return write_atomic(path, lambda tmp: save_image(image, tmp, format="png"))


class ReconstructionPreviews(pl.Callback):
    """Every ``every_n_steps`` optimiser steps, write ``<run>/previews/step_XXXXXXX_<source>_<modality>.png``
    (original | I_low | I_high | reconstruction). 0 disables."""

    def __init__(self, every_n_steps: int = 100, max_images: int = 4) -> None:
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or not trainer.is_global_zero or step == self._last_step:
            return
        if step % self.every_n_steps and not (trainer.max_steps > 0 and step >= trainer.max_steps):
            return
        self._last_step = step
        for source, by_modality in (outputs or {}).get("previews", {}).items():
            for modality, (x, low, high, recon) in by_modality.items():
                grid = preview_grid(x, low, high, recon, max_images=self.max_images)
                save_png_atomic(grid, Path(_run_dir(trainer)) / "previews" / f"step_{step:07d}_{source}_{modality}.png")


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the encoder of a pre-training checkpoint (Lightning ``.ckpt``) as rsvheat safetensors weights, which
    ``rsvheat.load_checkpoint`` loads into any model of that variant (at any resolution: FVE/SCE are resized).
    The output must be named ``.safetensors``, is never the checkpoint itself, and replaces an existing file only
    with ``overwrite``."""
    refuse_inputs_as_outputs([out], [checkpoint])  # -o last.ckpt would replace the run's resume point
    check_output(out, overwrite, (".safetensors",), "the encoder weights")
    read_checkpoint(checkpoint)  # a refused pickle or a truncated file: a ValueError naming it (cheap: memory-mapped)
    task = PretrainTask.load_from_checkpoint(Path(checkpoint), map_location="cpu", weights_only=True)
    return save_weights(task.model.encoder, out, extra={"source": f"rsvheat pretrain {Path(checkpoint).name}"})


def pretrain_cli(argv: list[str] | None = None) -> None:
    """``rsvheat pretrain --config configs/pretrain/<name>.yaml [--section.option value ...] [--ckpt_path last]``."""
    from rsvheat.datamodules.pretrain import PretrainDataModule
    from rsvheat.trainers.cli import RSVHeatCLI, with_examples

    class PretrainCLI(RSVHeatCLI):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            # Nothing to rank on: last.ckpt alone. A top-k file named by its step (epoch=0-step=6.ckpt, a full
            # checkpoint) was left behind when a killed run was resumed: the resumed run never learns of it.
            parser.set_defaults({"checkpoint.save_top_k": 0})
            parser.add_lightning_class_args(ReconstructionPreviews, "previews")
            # k-NN / linear-probe accuracy of the encoder on a small labelled set, every N steps (off by default)
            parser.add_lightning_class_args(TransferMonitor, "monitor")
            # One source of truth: the data decide band counts and resolution, the model follows.
            parser.link_arguments("data.modalities", "model.modalities")
            parser.link_arguments("data.crop_size", "model.img_size")

        def _add_subcommands(self, parser, **kwargs) -> None:
            super()._add_subcommands(parser, **kwargs)
            # pre-training is Lightning's "fit" under another name: its --help says how users call it
            parser._subcommands_action._name_parser_map["fit"].prog = "rsvheat pretrain"

    PretrainCLI(
        PretrainTask,
        PretrainDataModule,
        args=["fit", *(argv or [])],
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs/pretrain"},
        parser_kwargs=with_examples(
            {
                "fit": "  rsvheat pretrain --config configs/pretrain/rsvheat_tiny_bigearthnet_landsat.yaml\n"
                "  rsvheat pretrain --config configs/pretrain/rsvheat_base_paper.yaml --ckpt_path last   # resume"
            },
            backbone="model.variant",
        ),
    )
