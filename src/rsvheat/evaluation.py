"""How good is an encoder's representation? Frozen-feature protocols, label fractions and a monitor for pre-training.

* :func:`extract_features`: pooled stage-4 features ``(N, C)`` of a frozen encoder over a labelled dataset (eval mode,
  no autograd; the module's training mode is restored afterwards).
* :func:`knn_predict` / :func:`knn_accuracy`: weighted k-NN on cosine similarity (the DINO/MAE-style evaluation:
  each of the ``k`` nearest training samples votes with ``exp(similarity / T)``).
* :func:`linear_probe`: multinomial logistic regression on standardised features, trained full-batch with L-BFGS; the
  L2 weight decay is chosen on validation data, the test data is scored once with that choice.
* :func:`stratified_fraction` and :func:`fraction_split_file`: a seeded, stratified share (1 %, 10 %, 100 %) of the
  training labels, at least one per class, written as a split file that
  :class:`~rsvheat.datamodules.ClassificationDataModule` reads, so fine-tuning with few labels is ordinary
  ``rsvheat fit`` / :class:`~rsvheat.trainers.ClassificationTask` with ``--data.split_file``.
* :class:`TransferMonitor`: a Lightning callback that runs k-NN and the linear probe every N steps of pre-training
  and logs ``monitor/knn_acc`` and ``monitor/linear_acc``.

This layer sits below ``trainers`` (``rsvheat pretrain`` wires the monitor in) and above ``datamodules``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from rsvheat.data.classification import SceneClassification, resolve_root, scan_class_folders
from rsvheat.files import write_json_atomic
from rsvheat.models.rsvheat import RSVHeat, fold_backbones

Split = tuple[torch.Tensor, torch.Tensor]  # (features (N, C), labels (N,))


# features -------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(
    encoder: RSVHeat,
    data: Dataset | DataLoader | Iterable[Mapping[str, torch.Tensor]],
    batch_size: int = 64,
    modality: str | None = None,
    device: torch.device | str | None = None,
) -> Split:
    """Average-pooled last-stage features of ``encoder`` (an :class:`~rsvheat.models.rsvheat.RSVHeat`; its
    ``forward_features`` gives ``(B, C, h, w)`` before the head norm) over ``data``: a dataset of
    ``{"image": (C_in, H, W), "label": ()}`` samples, a loader or any iterable of such batches.

    Returns ``(features (N, C) float32 on the CPU, labels (N,) int64)``. The encoder runs folded in eval mode (no drop
    path; :func:`~rsvheat.models.rsvheat.fold_backbones`); one that was training is put back into training mode (which
    ends the fold), one that was not stays folded."""
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    fold_backbones(encoder)
    feats, labels = [], []
    try:
        for batch in data:
            x = batch["image"].to(device)
            f = encoder.forward_features(x, modality=modality) if modality else encoder.forward_features(x)
            feats.append(f.float().mean(dim=(-2, -1)).cpu())
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# k-NN -----------------------------------------------------------------------------------------------------------------
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN: ``(N, C)`` training features with labels ``(N,)``, ``(M, C)`` queries -> ``(M,)`` classes.
    Cosine similarity; each of the ``min(k, N)`` neighbours votes for its class with ``exp(sim / temperature)``."""
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query_x.shape[0], chunk):
        q = F.normalize(query_x[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_y[idx].long(), (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


def knn_accuracy(train: Split, test: Split, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Share of ``test`` samples the weighted k-NN over ``train`` classifies correctly (see :func:`knn_predict`)."""
    pred = knn_predict(train[0], train[1], test[0], num_classes, k, temperature)
    return float((pred == test[1]).float().mean())


# linear probe ---------------------------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """A logistic-regression classifier on standardised features: ``logits = ((x - mean) / std) @ weight.T + bias``.
    ``weight (K, C)``, ``bias (K,)``, ``mean``/``std`` ``(C,)``."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight_decay: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` -> ``(N, K)``."""
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def accuracy(self, data: Split) -> float:
        return float((self.logits(data[0]).argmax(1) == data[1]).float().mean())


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 200
) -> LinearProbe:
    """Full-batch L-BFGS on ``mean cross-entropy + weight_decay / 2 · ||W||²`` (no decay on the bias) over the
    standardised ``(N, C)`` features ``x`` with labels ``(N,)`` ``y``. Deterministic: zero initialisation, and the
    loss is convex, so the solution does not depend on a seed."""
    x = x.float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)  # standardising makes one decay grid fit all
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y.long()) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std, weight_decay)


@dataclass
class ProbeResult:
    """What :func:`linear_probe` found: the chosen ``weight_decay``, the validation accuracy of every decay tried,
    the test accuracy (``None`` without test data) and the probe itself."""

    weight_decay: float
    val_accuracy: dict[float, float]
    test_accuracy: float | None
    probe: LinearProbe = field(repr=False)


DEFAULT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def linear_probe(
    train: Split,
    val: Split,
    test: Split | None,
    num_classes: int,
    weight_decays: Sequence[float] = DEFAULT_DECAYS,
    max_iter: int = 200,
) -> ProbeResult:
    """Train a logistic regression on ``train`` for every decay in ``weight_decays``, keep the one with the best
    ``val`` accuracy (ties: the stronger decay), score ``test`` with it. Each split is ``(features (N, C), labels)``."""
    scores, probes = {}, {}
    for wd in sorted(weight_decays, reverse=True):
        probes[wd] = fit_logistic_regression(train[0], train[1], num_classes, wd, max_iter)
        scores[wd] = probes[wd].accuracy(val)
    best = max(scores, key=lambda wd: (scores[wd], wd))
    test_acc = probes[best].accuracy(test) if test is not None else None
    return ProbeResult(best, scores, test_acc, probes[best])


# label fractions ------------------------------------------------------------------------------------------------------
def stratified_fraction(labels: Sequence[int], fraction: float, seed: int = 0, min_per_class: int = 1) -> list[int]:
    """Sorted indices of a seeded per-class share ``fraction`` of ``labels``: ``round(fraction · n_c)`` (half up) of
    each class's ``n_c`` samples, at least ``min_per_class`` (and at most ``n_c``). The same ``seed`` gives the same
    subset, and a class's draw does not depend on the other classes."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    label_array = np.asarray(labels)
    chosen: list[int] = []
    for c in np.unique(label_array):
        idx = np.flatnonzero(label_array == c)
        rng = np.random.default_rng([seed, int(c)])
        n = min(len(idx), max(min_per_class, math.floor(fraction * len(idx) + 0.5)))
        chosen += idx[rng.permutation(len(idx))[:n]].tolist()
    return sorted(chosen)


def fraction_split_file(split_file: str | Path, fraction: float, seed: int, out: str | Path) -> Path:
    """A copy of a :class:`~rsvheat.datamodules.ClassificationDataModule` split file whose ``train`` list keeps only
    a stratified ``fraction`` of its samples (:func:`stratified_fraction`); ``val`` and ``test`` are unchanged, so
    every fraction is selected and scored on the same images. The split's own ``train_ratio``/``val_ratio``/``seed``
    are kept (the data module checks them); ``label_fraction`` and ``fraction_seed`` are added. Labels are the class
    folders (the first component of each path)."""
    split = json.loads(Path(split_file).read_text())
    classes = split["classes"]
    train = split["train"]
    labels = [classes.index(Path(p).parts[0]) for p in train]
    keep = stratified_fraction(labels, fraction, seed)
    split = {**split, "train": [train[i] for i in keep], "label_fraction": fraction, "fraction_seed": seed}
    return write_json_atomic(split, out)


# the monitor ----------------------------------------------------------------------------------------------------------
def _pick_per_class(
    labels: Sequence[int], counts: Sequence[int], seed: int, first_share: float = 1.0
) -> list[list[int]]:
    """Disjoint seeded per-class picks: for each ``n`` of ``counts`` a list of up to ``n`` indices per class. The first
    pick takes at most ``first_share`` of a class (so a held-out pick leaves images for the others)."""
    label_array = np.asarray(labels)
    out: list[list[int]] = [[] for _ in counts]
    for c in np.unique(label_array):
        idx = np.flatnonzero(label_array == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        start = 0
        for j, n in enumerate(counts):
            n = min(n, int(len(idx) * first_share)) if j == 0 else n
            out[j] += idx[start : start + n].tolist()
            start += n
    return out


class TransferMonitor(pl.Callback):
    """Watch representation quality during pre-training: every ``every_n_steps`` optimiser steps (and once before the
    first), pooled stage-4 features of the current encoder (``pl_module.encoder``) are extracted for a small labelled
    set, and the weighted k-NN and a linear probe trained on ``train`` are scored on ``val``; logged as
    ``monitor/knn_acc`` and ``monitor/linear_acc`` (to the trainer's loggers, at the current step).

    The labelled set is read once into memory: ``train_root`` holds class folders; ``val_root`` too, or, when not
    given, ``per_class_val`` images per class of ``train_root`` are held out (disjoint from the ``per_class_train``
    used for training; seeded). Images are resized to ``img_size`` and normalised with the per-band mean/std of the
    monitor's own training images. Cost: two no-grad passes over ``30 × (per_class_train + per_class_val)`` small
    images plus an L-BFGS fit on ``(N, C)`` features; rank 0 only, the encoder's mode is restored.

    Args:
        train_root, val_root: classification layouts (``root/<class>/<image>``); ``train_root=None`` or
            ``every_n_steps=0`` disables the monitor (the default).
        every_n_steps: evaluation period in optimiser steps.
        per_class_train, per_class_val: images per class (``None``: all).
        img_size: side the images are resized to.
        modality: the encoder stem the images go through.
        k, temperature: of the k-NN. weight_decay: of the linear probe (fixed: no validation left to choose it).
        seed: of the per-class picks.
    """

    def __init__(
        self,
        train_root: str | None = None,
        val_root: str | None = None,
        every_n_steps: int = 0,
        per_class_train: int | None = 10,
        per_class_val: int | None = 10,
        img_size: int = 64,
        modality: str = "optical",
        k: int = 20,
        temperature: float = 0.07,
        weight_decay: float = 1e-2,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.train_root, self.val_root, self.every_n_steps = train_root, val_root, every_n_steps
        self.per_class_train, self.per_class_val = per_class_train, per_class_val
        self.img_size, self.modality, self.k, self.temperature = img_size, modality, k, temperature
        self.weight_decay, self.batch_size, self.seed = weight_decay, batch_size, seed
        self.history: list[dict[str, float]] = []
        self._data: dict[str, dict[str, torch.Tensor]] | None = None
        self._num_classes = 0
        self._last_step = -1

    @property
    def enabled(self) -> bool:
        return bool(self.train_root) and self.every_n_steps > 0

    def _load(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"train"|"val": {"image": (N, C, S, S), "label": (N,)}}``, normalised."""
        train_root = self.train_root
        if train_root is None:  # the callbacks run only when enabled (train_root given)
            raise ValueError("TransferMonitor: no train_root to evaluate on")
        classes, samples = scan_class_folders(train_root)
        labels = [label for _, label in samples]
        big = 10**9  # "all"
        if self.val_root:
            _, val_samples = scan_class_folders(self.val_root, classes)
            val_labels = [label for _, label in val_samples]
            picks = {
                "train": (train_root, samples, _pick_per_class(labels, [self.per_class_train or big], self.seed)),
                "val": (
                    self.val_root,
                    val_samples,
                    _pick_per_class(val_labels, [self.per_class_val or big], self.seed),
                ),
            }
        else:
            n_val = self.per_class_val or 1
            val_idx, train_idx = _pick_per_class(labels, [n_val, self.per_class_train or big], self.seed, 0.5)
            picks = {"train": (train_root, samples, [train_idx]), "val": (train_root, samples, [val_idx])}
        if not picks["train"][2][0] or not picks["val"][2][0]:
            raise ValueError(
                f"TransferMonitor: too few images in {self.train_root} for a training and a validation set"
            )
        self._num_classes = len(classes)
        raw: dict[str, dict[str, torch.Tensor]] = {}
        for split, (root, pool, (idx,)) in picks.items():
            ds = SceneClassification(
                resolve_root(root), [pool[i] for i in idx], 3 if self.modality == "optical" else 1, [0.0], [1.0], None
            )
            images = [
                F.interpolate(
                    torch.from_numpy(ds.read_raw(i)).float()[None],
                    (self.img_size,) * 2,
                    mode="bilinear",
                    antialias=True,
                )[0]
                for i in range(len(ds))
            ]
            raw[split] = {"image": torch.stack(images), "label": torch.tensor([pool[i][1] for i in idx])}
        mean = raw["train"]["image"].mean(dim=(0, 2, 3), keepdim=True)
        std = raw["train"]["image"].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        for split in raw:
            raw[split]["image"] = (raw[split]["image"] - mean) / std
        return raw

    def evaluate(self, encoder: RSVHeat) -> dict[str, float]:
        """Run both protocols on ``encoder`` now; returns ``{"monitor/knn_acc": .., "monitor/linear_acc": ..}``."""
        if self._data is None:
            self._data = self._load()
        feats = {}
        for split, data in self._data.items():
            batches = (
                {"image": data["image"][i : i + self.batch_size], "label": data["label"][i : i + self.batch_size]}
                for i in range(0, len(data["label"]), self.batch_size)
            )
            feats[split] = extract_features(encoder, batches, modality=self.modality)
        knn = knn_accuracy(feats["train"], feats["val"], self._num_classes, self.k, self.temperature)
        probe = fit_logistic_regression(*feats["train"], self._num_classes, self.weight_decay)
        return {"monitor/knn_acc": knn, "monitor/linear_acc": probe.accuracy(feats["val"])}

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        # the pre-training module's RS-vHeat encoder (the monitor is a pre-training callback)
        encoder = cast(RSVHeat, getattr(pl_module, "encoder", None) or pl_module.backbone)
        metrics = self.evaluate(encoder)
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:  # not self.log: Lightning refuses it in on_train_start
            logger.log_metrics(metrics, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step % self.every_n_steps == 0 or (trainer.max_steps > 0 and step >= trainer.max_steps):
            self._run(trainer, pl_module)
