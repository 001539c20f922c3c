"""Does rsvheat's pre-training transfer? RS-vHeat pre-trained on unlabelled real imagery vs the same model from random
initialisation, on AID scene classification: k-NN and linear probe on frozen pooled stage-4 features, and fine-tuning
(:class:`~rsvheat.trainers.ClassificationTask`) with 1 %, 10 % and 100 % of the training labels, over several seeds.

    python benchmarks/transfer.py --aid /path/to/AID [--per-class 40] [--pretrain-minutes 60] [--seeds 0 1 2]

Stages, each cached under ``--out`` (default ``runs/transfer``) so that a killed run resumes where it stopped:

1. data: a seeded ``--per-class`` subset of AID (``scripts/prepare_aid.py``), its stratified split (per class half for
   training, of which 20 % is validation; the other half is the test set, never used to choose anything), a folder of
   the monitor's labelled images (training split only) and the unlabelled pre-training pool: every AID image that is
   not in the test split, the Landsat scene embedded in rsvheat and, when fetched
   (``scripts/get_bigearthnet_example.py``), BigEarthNet's S1/S2 example pairs.
2. pre-training (``rsvheat pretrain``, resumed from ``last.ckpt``): as many steps as the measured step time fits into
   ``--pretrain-minutes`` (``trainer.max_time`` guards it too), with the TransferMonitor on.
3. evaluations: for ``init`` in {pretrained, random} × ``--seeds`` × ``--fractions`` × {knn, linear, finetune}; each
   finished unit is one JSON line of ``results.jsonl`` and is skipped when the script runs again. The seed draws the
   label subset (and, for random init and fine-tuning, the weights and batches); the pre-trained encoder is one run.
   Fine-tuning's learning rate is chosen per start and label fraction from ``--ft-lrs`` by the first seed's
   validation accuracy (each start gets the rate that suits it; the test split is not looked at); the other seeds
   run at the chosen rate.
4. diagnose (only when asked, ``--stage diagnose``): fine-tuning pairs with every label under other settings
   (``--diagnose-layer-decays``), scored on validation and test, to find why a pre-trained start loses.
5. report: ``transfer.{md,csv,png}`` in ``--results-dir`` (default ``benchmarks/results``): mean ± std over seeds,
   the difference pretrained − random, and whether it exceeds the spread (|diff| > std_pre + std_rand).

``--smoke`` runs a seconds-long miniature (micro model, a few steps) for the tests.

The step count is calibrated from a measured step time; on a machine shared with other jobs the measurement is
unreliable, so give ``--pretrain-steps`` instead. Lightning catches SIGTERM: stop a run with SIGINT (or SIGKILL) and
start the same command again to resume.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import prepare_aid  # noqa: E402
import prepare_dubai  # noqa: E402

from rsvheat.apps.bench import machine_description  # noqa: E402
from rsvheat.evaluation import (  # noqa: E402
    extract_features,
    fraction_split_file,
    knn_accuracy,
    linear_probe,
)

MICRO = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
SPLIT = {"train_ratio": 0.5, "val_ratio": 0.2, "seed": 0}  # the data module's base split (seed fixed: one test set)
PROTOCOLS = ("knn", "linear", "finetune", "lpft")  # lpft (head first, then the whole model) only when asked
FROZEN = ("knn", "linear")
TUNED = ("finetune", "lpft")
ABLATION_FRACTIONS = (0.1, 1.0)


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)


# stage 1: data ----------------------------------------------------------------------------------------------------
def link_files(paths: list[Path], dst: Path, rel_to: Path) -> None:
    for path in paths:
        target = dst / path.relative_to(rel_to)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())


def prepare_data(args: argparse.Namespace) -> dict:
    """AID subset, base split, monitor set and pre-training pool; cached in ``out/data/state.json``."""
    data = args.out / "data"
    state_file = data / "state.json"
    if state_file.is_file():
        return json.loads(state_file.read_text())
    from rsvheat.datamodules import ClassificationDataModule

    subset = data / f"aid_pc{args.per_class}"
    counts = prepare_aid.prepare(args.aid, subset, per_class=args.per_class, seed=0)
    split_file = data / "split.json"
    dm = ClassificationDataModule(str(subset), split_file=str(split_file), img_size=args.img_size, **SPLIT)
    # the monitor watches training-split images only (the test split is never looked at before the end)
    link_files([subset / p for p in dm.split["train"] + dm.split["val"]], data / "monitor", subset)
    # unlabelled pre-training pool: all of AID but the test split of the subset (labels are not used)
    test = set(dm.split["test"])  # paths relative to the class root: "<Class>/<file>", as in the source
    source = prepare_aid.class_root(Path(args.aid))
    pool = [
        p
        for p in sorted(source.rglob("*"))
        if p.suffix.lower() in prepare_aid.SUFFIXES and str(p.relative_to(source)) not in test
    ]
    if args.smoke:
        pool = pool[:40]
    link_files(pool, data / "pretrain_aid", source)
    state = {
        "subset": str(subset),
        "split_file": str(split_file),
        "classes": dm.classes,
        "counts": counts,
        "split_sizes": {k: len(dm.split[k]) for k in ("train", "val", "test")},
        "pretrain_pool": len(pool),
    }
    state_file.write_text(json.dumps(state, indent=1))
    return state


# stage 2: pre-training --------------------------------------------------------------------------------------------
def step_seconds(model_kwargs: dict, modalities: dict[str, int], crop: int, batch: int, sources: list[str]) -> float:
    """Measured seconds of one pre-training step (forward + backward + AdamW over one batch per source)."""
    from rsvheat.trainers.pretrain import PretrainTask

    task = PretrainTask(modalities=modalities, img_size=crop, **model_kwargs)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    batches = {
        "optical": {"optical": torch.randn(batch, 3, crop, crop)},
        "bigearthnet": {"optical": torch.randn(batch, 3, crop, crop), "sar": torch.randn(batch, 1, crop, crop)},
    }
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for source in sources:
            task.model(batches[source]).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the first step pays for allocations


#: variations of the main run, pre-trained for ``--ablation-steps`` each and judged by frozen probes
FULL = {"spa": 1.0, "fre": 1.0, "con": 1.0}
ABLATIONS = {
    "default": {},  # the view contrast on two augmented views, each split in frequency (the ablation table's reference)
    # + masked frequency modelling (the decoder predicts the hidden band): every term of RS-vHeat
    "full": {"loss_weights": FULL},
    "paper": {"views": "low_high", "reconstruct_from": "both", "temperature": 0.1, "loss_weights": FULL},  # its reading
    # the same with the decoder reading I_low only
    "paper_low": {"views": "low_high", "reconstruct_from": "low", "temperature": 0.1, "loss_weights": FULL},
    "recon_only": {"loss_weights": {"spa": 1.0, "fre": 1.0, "con": 0.0}},  # masked frequency modelling alone
    "con_only": {"loss_weights": {"spa": 0.0, "fre": 0.0, "con": 1.0}},  # the contrast alone: the default, spelled out
    # reconstruction alone, with four 3x3 decoder blocks instead of one: does the decoder take the pixel work?
    "recon_only_deep": {"loss_weights": {"spa": 1.0, "fre": 1.0, "con": 0.0}, "decoder_depth": 4},
    "optical_only": {"sources": ["optical"]},  # no BigEarthNet S1/S2 pairs: no SAR stem, no cross-modal term
    "jitter": {"jitter": 0.4},  # the views also differ in radiometry: colour statistics no longer tell images apart
    # SimCLR's views (small crops, colour distortion) with the view contrast alone
    "con_strong": {"loss_weights": {"spa": 0.0, "fre": 0.0, "con": 1.0}, "jitter": 0.4, "crop_scale": [0.08, 1.0]},
    # the former default rate, 1e-3 at 256: does the early peak of the monitor follow the rate?
    "lr_1e-3": {"lr": 1e-3},
    # crops of 1-8x the crop's width, resampled (capped by AID's 600 px: up to the whole scene, as evaluated)
    "zoom": {"zoom_out": [1.0, 8.0]},
    # negatives from a queue of 4,096 keys of a momentum encoder (MoCo) instead of the batch's 22
    "queue": {"negatives": 4096, "momentum": 0.99},
    # the second view seen whole: downstream images are never low-passed, pre-training saw only low-passed ones
    "one_masked": {"masked_views": 1},
    "unmasked": {"masked_views": 0},  # plain SimCLR views, no frequency split: what does the split itself add?
    # multi-crop: four more views per image at half the side (5-25 % of the area), each matched to both full views
    "multicrop": {"local_crops": 4},
    "multicrop_queue": {"local_crops": 4, "negatives": 4096, "momentum": 0.99},  # the same with the MoCo queue
}
DATA_OPTIONS = ("zoom_out",)  # ablation keys that are options of the data module, not of the model


def pretrain(
    args: argparse.Namespace,
    state: dict,
    root: Path | None = None,
    steps: int | None = None,
    overrides: dict | None = None,
    monitor_points: int = 10,
) -> Path:
    """The pre-trained encoder (``root/encoder.safetensors``, default ``out/pretrain``), trained or resumed if not
    there yet. ``steps`` and ``overrides`` (model options, or ``sources``) are the ablations' variations; the monitor
    runs ``monitor_points`` times."""
    method = None
    if root is None:  # the main run: the chosen --method
        root, overrides, method = args.out / "pretrain", ABLATIONS[args.method], args.method
    overrides = dict(overrides or {})
    data_overrides = {k: overrides.pop(k) for k in DATA_OPTIONS if k in overrides}
    encoder = root / "encoder.safetensors"
    if encoder.is_file():
        return encoder
    from rsvheat.trainers.pretrain import pretrain_cli

    ben = REPO / "data/bigearthnet-example"
    has_ben = (ben / "BigEarthNet-S1-Example").is_dir() and not args.smoke
    sources = overrides.pop("sources", [s for s in args.sources if s == "optical" or has_ben])
    modalities = {"optical": 3, "sar": 1} if "bigearthnet" in sources else {"optical": 3}
    model = {
        "variant": args.variant,
        "lr": args.pretrain_lr,
        "weight_decay": 0.05,
        "warmup_fraction": 0.1,
        "drop_path_rate": 0.0,
        "decoder_width": 16 if args.smoke else 128,
        "proj_dim": 8 if args.smoke else 128,
        "encoder_kwargs": MICRO if args.smoke else None,
        **overrides,
    }
    plan_file = root / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
    else:
        root.mkdir(parents=True, exist_ok=True)
        if steps or args.pretrain_steps:
            steps, seconds = steps or args.pretrain_steps, None
        else:
            seconds = step_seconds(model, modalities, args.crop, args.pretrain_batch, sources)
            # 15 % for data loading, logging, checkpoints and the monitor
            steps = max(10, int(args.pretrain_minutes * 60 / (seconds * 1.15)))
            seconds = round(seconds, 3)
        plan = {"steps": steps, "step_seconds": seconds, "sources": sources, "modalities": modalities, "method": method}
        plan_file.write_text(json.dumps(plan, indent=1))
    log(f"pre-training {root.name}: {plan['steps']} steps (measured s/step: {plan['step_seconds']}), {plan['sources']}")
    data = {
        "optical_dirs": [str(args.out / "data/pretrain_aid"), str(REPO / "src/rsvheat/data")],
        "modalities": plan["modalities"],
        "crop_size": args.crop,
        "batch_size": args.pretrain_batch,
        "num_workers": 0 if args.smoke else 1,
        **data_overrides,
    }
    if "bigearthnet" in plan["sources"]:
        data.update(
            bigearthnet_s1=str(ben / "BigEarthNet-S1-Example"),
            bigearthnet_s2=str(ben / "BigEarthNet-S2-Example"),
            bigearthnet_s2_bands=["B04", "B03", "B02"],
            bigearthnet_s1_bands=["VV"],
            repeat=1,
        )
    minutes = args.pretrain_minutes * 1.5  # a guard only: the step count is the budget
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root),
            "accelerator": args.accelerator,
            "devices": 1,
            "precision": args.precision,
            "max_steps": plan["steps"],
            "max_time": f"00:{int(minutes // 60):02d}:{int(minutes % 60):02d}:00",
            "gradient_clip_val": 5.0,
            "log_every_n_steps": 1 if args.smoke else 10,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {k: v for k, v in model.items() if v is not None},
        "data": data,
        "checkpoint": {"every_n_train_steps": max(1, min(100, plan["steps"] // 4))},
        "previews": {"every_n_steps": 0},
        "monitor": {
            "train_root": str(args.out / "data/monitor"),
            "every_n_steps": max(1, plan["steps"] // (2 if args.smoke else monitor_points)),
            "per_class_train": 12,
            "per_class_val": 8,
            "img_size": args.img_size,
        },
    }
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    resume = ["--ckpt_path", "last"] if (root / "checkpoints/last.ckpt").is_file() else []
    start = time.perf_counter()
    pretrain_cli(["--config", str(config_file), *resume])
    written = sorted(root.glob("logs/version_*/encoder.safetensors"), key=lambda p: p.stat().st_mtime)
    if not written:
        raise SystemExit(f"pre-training wrote no encoder under {root}")
    shutil.copy2(written[-1], encoder)
    plan["minutes_last_session"] = round((time.perf_counter() - start) / 60, 1)
    plan_file.write_text(json.dumps(plan, indent=1))
    return encoder


# stage 3: evaluations ---------------------------------------------------------------------------------------------
def done_units(path: Path) -> dict[tuple, dict]:
    """Recorded units by ``(init, seed, protocol, fraction, lr)``; ``lr`` is None but for fine-tuning rows."""
    units = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                units[(r["init"], r["seed"], r["protocol"], r["fraction"], r.get("lr"))] = r
    return units


def chosen_lr(
    units: dict[tuple, dict], init: str, fraction: float, lrs: list[float], seed: int, protocol: str = "finetune"
) -> float | None:
    """The fine-tuning rate of one start, label fraction and fine-tuning protocol: the best validation accuracy of
    ``seed``'s runs over ``lrs`` (ties: the first listed; a rate not run is not a candidate, and the report's table
    says which ran); None when none has run."""
    rows = [(lr, units.get((init, seed, protocol, fraction, lr))) for lr in lrs]
    rows = [(lr, r) for lr, r in rows if r is not None]
    return max(rows, key=lambda pair: pair[1]["val_accuracy"])[0] if rows else None


def record(path: Path, row: dict) -> None:
    with open(path, "a") as f:  # one line per finished unit, flushed: a kill loses at most the unit under way
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_encoder(args: argparse.Namespace, weights: Path | None, seed: int):
    from rsvheat.models.contract import build_backbone

    torch.manual_seed(seed)  # random init: the seed draws the weights
    return build_backbone(
        args.variant,
        {"optical": 3},
        args.img_size,
        str(weights) if weights else None,
        0.0,
        0,
        MICRO if args.smoke else None,
    )


def data_module(args: argparse.Namespace, state: dict, split_file: Path, batch_size: int = 32):
    from rsvheat.datamodules import ClassificationDataModule

    return ClassificationDataModule(
        state["subset"],
        split_file=str(split_file),
        img_size=args.img_size,
        batch_size=batch_size,
        eval_batch_size=64,
        num_workers=0,
        **SPLIT,
    )


_FEATURES: dict = {}  # (weights or (None, seed)) -> {split: (features, labels)}, for this process


def frozen_units(args, state, init: str, weights: Path | None, seed: int, todo: list[float], results: Path) -> None:
    """k-NN and linear probe at every fraction in ``todo`` for one (init, seed): features are extracted once."""
    if not todo:
        return
    start = time.perf_counter()
    dm = data_module(args, state, Path(state["split_file"]))
    dm.setup("fit")
    dm.setup("test")
    dm.datasets["train"].train = False  # frozen features of the images themselves: no random flips/rotations
    # a pre-trained encoder's features do not depend on the seed (only the label subset does): extracted once
    key = str(weights) if weights else (None, seed)
    if key not in _FEATURES:
        encoder = build_encoder(args, weights, seed)
        _FEATURES[key] = {s: extract_features(encoder, dm.datasets[s], batch_size=64) for s in ("train", "val", "test")}
    feats = _FEATURES[key]
    seconds = time.perf_counter() - start
    k = len(state["classes"])
    from rsvheat.evaluation import stratified_fraction

    for fraction in todo:
        keep = torch.tensor(stratified_fraction(feats["train"][1].tolist(), fraction, seed))
        train = (feats["train"][0][keep], feats["train"][1][keep])
        t0 = time.perf_counter()
        knn = knn_accuracy(train, feats["test"], k, k=args.knn_k)
        extra = {"val_accuracy": round(knn_accuracy(train, feats["val"], k, k=args.knn_k), 4)}  # to choose on
        record(results, unit(init, seed, "knn", fraction, knn, len(keep), seconds + time.perf_counter() - t0, extra))
        t0 = time.perf_counter()
        probe = linear_probe(train, feats["val"], feats["test"], k)
        extra = {"weight_decay": probe.weight_decay, "val_accuracy": round(probe.val_accuracy[probe.weight_decay], 4)}
        row = unit(init, seed, "linear", fraction, probe.test_accuracy, len(keep), time.perf_counter() - t0, extra)
        record(results, row)
        log(f"{init} seed {seed} fraction {fraction}: knn {knn:.3f}, linear {probe.test_accuracy:.3f}")


def unit(init, seed, protocol, fraction, acc, n_train, seconds, extra=None) -> dict:
    return {
        "init": init,
        "seed": seed,
        "protocol": protocol,
        "fraction": fraction,
        "accuracy": round(float(acc), 4),
        "train_images": int(n_train),
        "seconds": round(seconds, 1),
        **(extra or {}),
    }


def fine_tuning_trainer(args: argparse.Namespace, steps: int, root: Path):
    """The trainer of every fine-tuning unit: ``steps`` optimiser steps, no validation, no logs, no checkpoints."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,  # no model selection: the final model is scored, the same rule for every run
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,  # the final model is scored in this process: no 350 MB file per epoch
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def finetune_unit(
    args,
    state,
    init: str,
    weights: Path | None,
    seed: int,
    fraction: float,
    results: Path,
    layer_decay: float = 0.9,
    protocol: str = "finetune",
    lr: float | None = None,
) -> None:
    """Fine-tune the whole model (:class:`ClassificationTask`) on a stratified ``fraction`` of the training labels
    for ``--ft-steps`` optimiser steps at ``lr`` (default ``--ft-lr``); the final model is scored on the test split
    (no selection on it) and on the validation split (recorded as ``val_accuracy``, what a choice between settings
    may look at)."""
    import lightning.pytorch as pl

    from rsvheat.trainers import ClassificationTask

    start = time.perf_counter()
    lr = lr or args.ft_lr
    work = args.out / protocol / f"{init}_s{seed}_f{fraction:g}_lr{lr:g}"
    split = fraction_split_file(state["split_file"], fraction, seed, work / "split.json")
    dm = data_module(args, state, split, batch_size=args.ft_batch)

    def classifier(**options) -> ClassificationTask:
        return ClassificationTask(
            num_classes=len(state["classes"]),
            classes=state["classes"],
            backbone=args.variant,
            weights=str(weights) if weights else None,
            modalities={"optical": 3},
            img_size=args.img_size,
            drop_path_rate=0.1,
            weight_decay=0.05,
            warmup_fraction=0.1,
            encoder_kwargs=MICRO if args.smoke else None,
            **options,
        )

    pl.seed_everything(seed, verbose=False)
    task = classifier(lr=lr, layer_decay=layer_decay)
    if protocol == "lpft":
        # LP-FT (Kumar et al., ICLR 2022): the head first learns alone on the frozen backbone, so that the first
        # full-model steps do not send a random head's gradients into the pre-trained features
        probe = classifier(lr=args.ft_head_lr, layer_decay=1.0, freeze_backbone=True)
        fine_tuning_trainer(args, args.ft_head_steps, work / "head").fit(probe, datamodule=dm)
        task.load_state_dict(probe.state_dict())
    trainer = fine_tuning_trainer(args, args.ft_steps, work)
    trainer.fit(task, datamodule=dm)
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    scorer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_progress_bar=False)
    val = scorer.validate(task, datamodule=dm, verbose=False)[0]["val/OA"]
    n_train = len(json.loads(split.read_text())["train"])
    seconds = time.perf_counter() - start
    extra = {"val_accuracy": round(float(val), 4), "layer_decay": layer_decay, "lr": lr}
    record(results, unit(init, seed, protocol, fraction, metrics["test/OA"], n_train, seconds, extra))
    log(f"{init} seed {seed} fraction {fraction} lr {lr:g}: {protocol} test {metrics['test/OA']:.3f}, val {val:.3f}")


def evaluate(args: argparse.Namespace, state: dict, encoder: Path) -> Path:
    results = args.out / "results.jsonl"
    for seed in args.seeds if "knn" in args.protocols or "linear" in args.protocols else []:
        for init in ("pretrained", "random"):
            weights = encoder if init == "pretrained" else None
            done = done_units(results)
            todo = [f for f in args.fractions if any((init, seed, p, f, None) not in done for p in FROZEN)]
            frozen_units(args, state, init, weights, seed, todo, results)
    # fine-tuning after every frozen unit: the cheap protocols finish first in a session cut short
    first, others = args.seeds[0], args.seeds[1:]
    for protocol in (p for p in args.protocols if p in TUNED):
        for fraction in sorted(args.fractions, reverse=True):  # the most telling units first in a session cut short
            for init in ("pretrained", "random"):
                weights = encoder if init == "pretrained" else None
                for lr in args.ft_lrs:  # the first seed at every rate: the choice, on validation accuracy
                    if (init, first, protocol, fraction, lr) not in done_units(results):
                        finetune_unit(args, state, init, weights, first, fraction, results, protocol=protocol, lr=lr)
                lr = chosen_lr(done_units(results), init, fraction, args.ft_lrs, first, protocol)
                for seed in others:
                    if (init, seed, protocol, fraction, lr) not in done_units(results):
                        finetune_unit(args, state, init, weights, seed, fraction, results, protocol=protocol, lr=lr)
    return results


def dense_unit(args, init: str, weights: Path | None, seed: int, results: Path) -> None:
    """The dense protocol: fine-tune UPerNet segmentation (:class:`SegmentationTask`) on the Dubai set (split by tile:
    tiles 1-6 train, 7 validation, 8 test; ``scripts/prepare_dubai.py``) for ``--dense-steps`` steps from the
    pre-trained encoder or from random weights; the final model's test mIoU is recorded (no selection)."""
    import lightning.pytorch as pl

    from rsvheat.datamodules import SegmentationDataModule
    from rsvheat.trainers import SegmentationTask

    start = time.perf_counter()
    data = args.out / "dubai"
    if not (data / "counts.json").is_file():
        prepare_dubai.prepare(args.dubai, data, patch=args.dense_patch)
    dm = SegmentationDataModule(
        train_root=str(data / "train"),
        val_root=str(data / "val"),
        test_root=str(data / "test"),
        num_classes=len(prepare_dubai.CLASSES),
        crop_size=args.dense_crop,
        batch_size=args.dense_batch,
        eval_batch_size=4,
        num_workers=0,
    )
    pl.seed_everything(seed, verbose=False)
    task = SegmentationTask(
        num_classes=len(prepare_dubai.CLASSES),
        classes=list(prepare_dubai.CLASSES),
        backbone=args.variant,
        weights=str(weights) if weights else None,
        img_size=args.dense_crop,
        decoder_width=32 if args.smoke else 128,
        eval_tile=args.dense_patch,
        eval_overlap=0,
        drop_path_rate=0.1,
        lr=args.ft_lr,
        layer_decay=0.9,
        warmup_fraction=0.1,
        encoder_kwargs=MICRO if args.smoke else None,
    )
    trainer = fine_tuning_trainer(args, args.dense_steps, args.out / "dense" / f"{init}_s{seed}")
    trainer.fit(task, datamodule=dm)
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    extra = {"OA": round(float(metrics["test/OA"]), 4), "steps": args.dense_steps, "crop": args.dense_crop}
    n_train = len(list((data / "train/images").iterdir()))
    seconds = time.perf_counter() - start
    record(results, unit(init, seed, "dubai_miou", 1.0, metrics["test/mIoU"], n_train, seconds, extra))
    log(f"{init} seed {seed}: Dubai test mIoU {metrics['test/mIoU']:.3f}, OA {metrics['test/OA']:.3f}")


def dense(args: argparse.Namespace, encoder: Path) -> None:
    if args.dubai is None:
        raise SystemExit("--stage dense needs --dubai (the Dubai set, see scripts/prepare_dubai.py)")
    results = args.out / "results.jsonl"
    for seed in args.dense_seeds:
        for init in ("pretrained", "random"):
            if (init, seed, "dubai_miou", 1.0, None) not in done_units(results):
                dense_unit(args, init, encoder if init == "pretrained" else None, seed, results)


def dense_lines(units: list[dict]) -> list[str]:
    """The dense protocol's table (markdown lines; none before it ran)."""
    rows = [u for u in units if u["protocol"] == "dubai_miou"]
    if not rows:
        return []
    lines = [
        "",
        "## Dense protocol: Dubai semantic segmentation (5 classes, split by tile)",
        "",
        f"UPerNet on the encoder, fine-tuned end to end for {rows[0].get('steps', '?')} steps on "
        f"{rows[0].get('crop', '?')}² crops of {rows[0]['train_images']} training patches (tiles 1-6); the final "
        "model scored on tile 8 (never looked at before).",
        "",
        "| init | seeds | test mIoU (mean ± std) | test OA (mean) |",
        "|---|---:|---:|---:|",
    ]
    for init in ("pretrained", "random"):
        us = [u for u in rows if u["init"] == init]
        if us:
            m, sd = mean_std([u["accuracy"] for u in us])
            oa = sum(u["OA"] for u in us) / len(us)
            lines.append(f"| {init} | {len(us)} | {m:.3f} ± {sd:.3f} | {oa:.3f} |")
    return lines


def diagnose(args: argparse.Namespace, state: dict, encoder: Path) -> None:
    """Why does the pre-trained start fine-tune worse with all labels? One hypothesis at a time, each a pair of
    fine-tunings (pre-trained, random) with every label, first seed, scored on validation and test: ``diag_ld{v}`` =
    layer decay ``v`` (0.9 is the main table's setting, re-run so that its validation score exists; 1.0 gives every
    block the head's learning rate, so the pre-trained lower blocks are not held near their reconstruction
    features)."""
    results = args.out / "results.jsonl"
    seed = args.seeds[0]
    for layer_decay in args.diagnose_layer_decays:
        protocol = f"diag_ld{layer_decay:g}"
        for init in ("pretrained", "random"):
            if (init, seed, protocol, 1.0, args.ft_lr) not in done_units(results):
                weights = encoder if init == "pretrained" else None
                finetune_unit(args, state, init, weights, seed, 1.0, results, layer_decay, protocol)


def diagnosis_lines(units: list[dict]) -> list[str]:
    """The diagnosis table (markdown lines; none before :func:`diagnose` ran)."""
    rows = sorted((u for u in units if u["protocol"].startswith("diag_")), key=lambda u: (u["protocol"], u["init"]))
    if not rows:
        return []
    return [
        "",
        "## Diagnosis: fine-tuning with every label (first seed)",
        "",
        "Layer decay 0.9 is the main table's setting; 1.0 gives every block the head's learning rate. One seed per "
        "cell: a hint, read against the main table's spread.",
        "",
        "| layer decay | init | val accuracy | test accuracy |",
        "|---:|---|---:|---:|",
        *[
            f"| {u['layer_decay']:g} | {u['init']} | {u.get('val_accuracy', float('nan')):.3f} | {u['accuracy']:.3f} |"
            for u in rows
        ],
    ]


def ablate(args: argparse.Namespace, state: dict) -> Path:
    """Each :data:`ABLATIONS` variant pre-trained for ``--ablation-steps`` (cached like the main run), then k-NN and
    linear probe at ``ABLATION_FRACTIONS`` over the seeds; rows of ``out/ablation/results.jsonl`` with ``init`` = the
    variant's name."""
    results = args.out / "ablation/results.jsonl"
    for name in args.ablations:
        root = args.out / "ablation" / name
        encoder = pretrain(args, state, root, args.ablation_steps, ABLATIONS[name], args.ablation_monitor_points)
        for seed in args.seeds:
            done = done_units(results)
            todo = [f for f in ABLATION_FRACTIONS if any((name, seed, p, f, None) not in done for p in FROZEN)]
            frozen_units(args, state, name, encoder, seed, todo, results)
    return results


# stage 4: report --------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def monitor_curve(out: Path) -> list[tuple[int, float, float]]:
    """``(step, k-NN acc, linear acc)`` of the main run's monitor; a resumed run repeats the steps after its last
    checkpoint, and its later value of a step replaces the earlier one."""
    by_step = {}
    versions = sorted((out / "pretrain").glob("logs/version_*"), key=lambda p: int(p.name.removeprefix("version_")))
    for version in versions:
        path = version / "metrics.csv"
        for r in csv.DictReader(path.open()) if path.is_file() else []:
            if r.get("monitor/knn_acc"):
                by_step[int(r["step"])] = (float(r["monitor/knn_acc"]), float(r["monitor/linear_acc"]))
    return [(step, *accs) for step, accs in sorted(by_step.items())]


def health_curve(out: Path, rows: int = 12) -> tuple[list[str], list[tuple[int, list[float]]]]:
    """The collapse monitors of the main run (``health/<source>/<modality>/{nce_ratio,std}``): column names and up
    to ``rows`` evenly spaced ``(step, values)``, a resumed run's later values replacing earlier ones."""
    by_step: dict[int, dict[str, float]] = {}
    for path in sorted((out / "pretrain").glob("logs/version_*/metrics.csv")):
        for r in csv.DictReader(path.open()):
            values = {
                k: float(v)
                for k, v in r.items()
                if v and k.startswith("health/") and k.endswith(("/nce_ratio", "/std"))
            }
            if values:
                by_step.setdefault(int(r["step"]), {}).update(values)
    if not by_step:
        return [], []
    columns = sorted({k for v in by_step.values() for k in v})
    steps = sorted(by_step)
    picked = sorted({steps[round(i * (len(steps) - 1) / max(1, rows - 1))] for i in range(min(rows, len(steps)))})
    return columns, [(st, [by_step[st].get(c, float("nan")) for c in columns]) for st in picked]


def report(args: argparse.Namespace, state: dict, results: Path, commands: list[str]) -> None:
    done = done_units(results)
    table, units = [], []  # units: the rows of the main table (fine-tuning: at the chosen rate only)
    for protocol in (p for p in PROTOCOLS if p in args.protocols):
        for fraction in sorted(args.fractions):
            cell = {"protocol": protocol, "fraction": fraction}
            for init in ("pretrained", "random"):
                tuned = protocol in TUNED
                lr = chosen_lr(done, init, fraction, args.ft_lrs, args.seeds[0], protocol) if tuned else None
                rows = [u for (i, _, p, f, r), u in done.items() if (i, p, f, r) == (init, protocol, fraction, lr)]
                units += rows
                accs = [u["accuracy"] for u in rows]
                cell[init] = (mean_std(accs), len(accs)) if accs else None
            table.append(cell)
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["protocol", "label_fraction", "init", "seeds", "mean_acc", "std_acc"])
        for c in table:
            for init in ("pretrained", "random"):
                if c[init]:
                    (m, s), n = c[init]
                    w.writerow([c["protocol"], c["fraction"], init, n, f"{m:.4f}", f"{s:.4f}"])
    plan_file = args.out / "pretrain/plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    method = plan.get("method") or args.method
    recipe = json.dumps(ABLATIONS[method]) if ABLATIONS[method] else "the trainer's defaults"
    expected = len(args.seeds) * 2 * len(args.protocols) * len(args.fractions)
    device = "cuda" if args.accelerator in ("gpu", "cuda") else "cpu"
    lines = [
        "# Does the pre-training transfer? (AID scene classification)",
        "",
        f"Date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine_description(device, [args.precision])}.",
        f"Status: {len(units)} of {expected} units measured" + (" (**partial**)." if len(units) < expected else "."),
        "",
        f"Pre-training: {args.variant}, method `{method}` ({recipe}), "
        f"{plan.get('steps', '?')} steps of {args.crop}² crops, batch "
        f"{args.pretrain_batch} per source ({', '.join(plan.get('sources', []))}), lr {args.pretrain_lr}, budget "
        f"{args.pretrain_minutes} min (its last session took {plan.get('minutes_last_session', '?')} min, monitor "
        "included; a run resumed over sessions took longer in all). "
        "Unlabelled pool: "
        f"{state['pretrain_pool']} AID images (all but the evaluation test split) + the embedded Landsat scene"
        + (" + BigEarthNet's 6 S1/S2 example pairs." if "bigearthnet" in plan.get("sources", []) else "."),
        f"Evaluation: AID subset of {args.per_class} images per class ({len(state['classes'])} classes), split "
        f"train/val/test {state['split_sizes']['train']}/{state['split_sizes']['val']}/{state['split_sizes']['test']}"
        f" (seed 0); images at {args.img_size}². Label fractions of the training split are stratified and seeded "
        "(at least one image per class). k-NN: cosine, weighted vote, "
        f"k = {args.knn_k}. Linear probe: logistic regression (L-BFGS) on standardised pooled stage-4 features, "
        "decay chosen on the validation split. Fine-tuning: whole model, AdamW, layer decay 0.9, "
        f"{args.ft_steps} steps of batch {args.ft_batch}, final model scored; learning rate chosen per start and "
        f"label fraction from {', '.join(f'{lr:g}' for lr in args.ft_lrs)} by the first seed's validation accuracy "
        "(table below)."
        + (
            f" lpft: the same after {args.ft_head_steps} steps of the head alone on the frozen backbone (AdamW lr "
            f"{args.ft_head_lr:g}; LP-FT, Kumar et al., ICLR 2022)."
            if "lpft" in args.protocols
            else ""
        ),
        "Seeds: the label subset (all protocols), the random weights and the batches (random init, fine-tuning); "
        "the pre-trained encoder is one pre-training run, so its frozen 100 % cells have no spread.",
        "",
        "| protocol | labels | pretrained (mean ± std, n) | random init (mean ± std, n) | difference | beyond spread |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in table:
        cells = []
        for init in ("pretrained", "random"):
            cells.append(f"{c[init][0][0]:.3f} ± {c[init][0][1]:.3f} ({c[init][1]})" if c[init] else "not run")
        if c["pretrained"] and c["random"]:
            (mp, sp), n_p = c["pretrained"]
            (mr, sr), n_r = c["random"]
            diff = f"{mp - mr:+.3f}"
            # one seed has no spread to compare with; the pre-trained frozen cells at 100 % have none by design
            beyond = ("yes" if abs(mp - mr) > sp + sr else "no") if max(n_p, n_r) > 1 else "one seed"
        else:
            diff, beyond = "", ""
        lines.append(f"| {c['protocol']} | {100 * c['fraction']:g} % | {cells[0]} | {cells[1]} | {diff} | {beyond} |")
    curve = monitor_curve(args.out)
    if not (args.out / "pretrain/encoder.safetensors").is_file():
        last = curve[-1][0] if curve else 0
        lines += ["", f"Pre-training not finished yet: last monitored step {last} of {plan.get('steps', '?')}."]
    if curve:
        lines += [
            "",
            "Monitor during pre-training (TransferMonitor: 12 train / 8 val images per class of the training split):",
            "",
            "| step | k-NN acc | linear acc |",
            "|---:|---:|---:|",
            *[f"| {s} | {a:.3f} | {b:.3f} |" for s, a, b in curve],
        ]
    columns, health = health_curve(args.out)
    if health:
        names = [
            c.removeprefix("health/").replace("/nce_ratio", " InfoNCE/ln B").replace("/std", " std") for c in columns
        ]
        lines += [
            "",
            "Collapse monitors during pre-training (the batch's embeddings of the two views, per source/modality: "
            "InfoNCE over ln B, 1 = chance; normalised per-dimension std × √D, 0 = collapsed, ~1 = spread):",
            "",
            "| step | " + " | ".join(names) + " |",
            "|---:|" + "---:|" * len(names),
            *[f"| {st} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for st, values in health],
        ]
    lines += lr_choice_lines(args, done)
    lines += dense_lines(list(done.values()))
    lines += diagnosis_lines(list(done.values()))
    lines += ablation_lines(args, units)
    lines += ["", "Commands:", "", "```", *commands, "```", ""]
    (out / "transfer.md").write_text("\n".join(lines))
    plot(table, curve, out / "transfer.png")


def lr_choice_lines(args: argparse.Namespace, done: dict[tuple, dict]) -> list[str]:
    """The fine-tuning rate choice (markdown lines; none with a single rate): the first seed's validation and test
    accuracy at every rate, the chosen one in bold."""
    if len(args.ft_lrs) < 2:
        return []
    seed = args.seeds[0]
    lines = [
        "",
        f"## Fine-tuning rate, chosen on validation (seed {seed})",
        "",
        "| init | protocol | labels | " + " | ".join(f"lr {lr:g} (val / test)" for lr in args.ft_lrs) + " |",
        "|---|---|---:|" + "---:|" * len(args.ft_lrs),
    ]
    for protocol in (p for p in TUNED if p in args.protocols):
        for fraction in sorted(args.fractions, reverse=True):
            for init in ("pretrained", "random"):
                best = chosen_lr(done, init, fraction, args.ft_lrs, seed, protocol)
                cells = []
                for lr in args.ft_lrs:
                    u = done.get((init, seed, protocol, fraction, lr))
                    text = f"{u['val_accuracy']:.3f} / {u['accuracy']:.3f}" if u else "not run"
                    cells.append(f"**{text}**" if lr == best else text)
                lines.append(f"| {init} | {protocol} | {100 * fraction:g} % | " + " | ".join(cells) + " |")
    return lines


def ablation_lines(args: argparse.Namespace, main_units: list[dict]) -> list[str]:
    """The ablation table (markdown lines; none before any ablation ran): each variant's frozen-probe accuracy as mean
    ± std over seeds, next to random initialisation and the main run, and whether it differs from the full method
    (``default``) by more than the spread."""
    units = list(done_units(args.out / "ablation/results.jsonl").values())
    if not units:
        return []
    rows = {"random init (main table)": [u for u in main_units if u["init"] == "random"]}
    rows |= {name: [u for u in units if u["init"] == name] for name in ABLATIONS}
    cols = [(p, f) for p in ("knn", "linear") for f in ABLATION_FRACTIONS]

    def cell(us: list[dict], protocol: str, fraction: float):
        accs = [u["accuracy"] for u in us if (u["protocol"], u["fraction"]) == (protocol, fraction)]
        return mean_std(accs) if accs else None

    full = {c: cell(rows["default"], *c) for c in cols}
    lines = [
        "",
        f"## Ablations in miniature ({args.ablation_steps} pre-training steps each, frozen probes)",
        "",
        "Same data, crops, batch and schedule as the main run, shorter. `default`: the view contrast on two "
        "augmented views, each seen through its I_low (the reference of the † marks); `full`: with masked frequency "
        "modelling added (the decoder predicts the hidden I_high); `paper`: the paper's reading (the encoder sees "
        "I_low and I_high of one image, both streams fused and decoded, L_con between them, temperature 0.1); "
        "`paper_low`: the same with the decoder reading the I_low stream only; `recon_only`: masked frequency "
        "modelling alone (no L_con); `con_only`: the default spelled out; `optical_only`: no BigEarthNet S1/S2 pairs "
        "(no SAR stem, no cross-modal term); `jitter`: the default with a radiometric jitter of the views (per-band "
        "gain/shift ± 0.4, sometimes grey); `con_strong`: SimCLR's views (crops of 8-100 % of the area, jitter); "
        "`lr_1e-3`: four times the default rate. "
        "† = differs from `default` by more than the sum of the two stds. Each variant is one pre-training run: the "
        "10 % columns vary the label subset over the seeds, the 100 % columns do not vary at all (std 0), so they "
        "get no verdict, and the spread between pre-training runs of one variant is not measured.",
        "",
        "| variant | " + " | ".join(f"{p} {100 * f:g} %" for p, f in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, us in rows.items():
        if not us:
            lines.append(f"| {name} | " + " | ".join("not run" for _ in cols) + " |")
            continue
        texts = []
        for c in cols:
            v = cell(us, *c)
            if v is None:
                texts.append("not run")
                continue
            # two single pre-training runs scored on all labels have no spread at all: no verdict there
            spread = v[1] + full[c][1] if full[c] else 0.0
            mark = "†" if spread and name != "default" and abs(v[0] - full[c][0]) > spread else ""
            texts.append(f"{v[0]:.3f} ± {v[1]:.3f}{mark}")
        lines.append(f"| {name} | " + " | ".join(texts) + " |")
    return lines


def plot(table: list[dict], curve: list[tuple[int, float, float]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 7, 4), squeeze=False)
    ax = axes[0][0]
    labels = [f"{c['protocol']}\n{100 * c['fraction']:g} %" for c in table]
    for j, (init, colour) in enumerate((("pretrained", "tab:blue"), ("random", "tab:grey"))):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(table))]
        means = [c[init][0][0] if c[init] else float("nan") for c in table]
        stds = [c[init][0][1] if c[init] else 0.0 for c in table]
        ax.bar(xs, means, 0.38, yerr=stds, capsize=2, color=colour, label=init)
    ax.set_xticks(range(len(table)), labels, fontsize=7)
    ax.set_ylabel("AID test accuracy")
    ax.legend()
    if curve:
        ax = axes[0][1]
        ax.plot([s for s, _, _ in curve], [a for _, a, _ in curve], "o-", label="k-NN")
        ax.plot([s for s, _, _ in curve], [b for _, _, b in curve], "s-", label="linear")
        ax.set_xlabel("pre-training step")
        ax.set_ylabel("monitor accuracy (val)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aid", type=Path, required=True, help="AID's class folders (see scripts/prepare_aid.py)")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--variant", default="rsvheat_tiny")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--crop", type=int, default=96, help="pre-training crop")
    parser.add_argument("--pretrain-minutes", type=float, default=60)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="instead of the time budget")
    parser.add_argument("--pretrain-batch", type=int, default=12)
    parser.add_argument(
        "--pretrain-lr", type=float, default=2.5e-4, help="model.lr: the rate at batch 256 (square-root rule)"
    )
    parser.add_argument(
        "--sources",
        nargs="+",
        choices=("optical", "bigearthnet"),
        default=["optical", "bigearthnet"],
        help="pre-training sources: AID's pool, BigEarthNet's S1/S2 example pairs (when downloaded)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=PROTOCOLS,
        default=["knn", "linear", "finetune"],
        help="what --stage evaluate runs (lpft: LP-FT, the head trained alone first)",
    )
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--ft-steps", type=int, default=150)
    parser.add_argument("--ft-batch", type=int, default=32)
    parser.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning rate of the dense and diagnosis runs")
    parser.add_argument("--ft-head-steps", type=int, default=50, help="lpft: steps of the head alone")
    parser.add_argument("--ft-head-lr", type=float, default=1e-3, help="lpft: learning rate of the head alone")
    parser.add_argument(
        "--ft-lrs",
        type=float,
        nargs="+",
        default=None,
        help="fine-tuning rates to choose from per start on validation (default: --ft-lr alone)",
    )
    parser.add_argument(
        "--method", choices=list(ABLATIONS), default="default", help="the pre-training of the main run (an ablation's)"
    )
    parser.add_argument("--ablation-steps", type=int, default=100, help="pre-training steps of each ablation")
    parser.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument(
        "--ablation-monitor-points", type=int, default=2, help="k-NN/linear monitor runs during each ablation"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every training (cpu, gpu)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument(
        "--stage",
        choices=("data", "pretrain", "evaluate", "ablation", "diagnose", "dense", "report", "all"),
        default="all",
    )
    parser.add_argument("--dubai", type=Path, default=None, help="the Dubai set (see scripts/prepare_dubai.py)")
    parser.add_argument("--dense-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dense-steps", type=int, default=300)
    parser.add_argument("--dense-batch", type=int, default=8)
    parser.add_argument("--dense-crop", type=int, default=128)
    parser.add_argument("--dense-patch", type=int, default=256, help="Dubai images cut into N×N patches")
    parser.add_argument(
        "--diagnose-layer-decays", type=float, nargs="+", default=[1.0, 0.9], help="layer decays of --stage diagnose"
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long miniature for the tests")
    args = parser.parse_args(argv)
    args.ft_lrs = args.ft_lrs or [args.ft_lr]
    if args.smoke:
        args.variant, args.img_size, args.crop, args.per_class = "rsvheat_tiny", 32, 32, min(args.per_class, 6)
        args.pretrain_steps, args.pretrain_batch, args.ft_steps, args.ft_batch = 2, 2, 2, 4
        args.knn_k, args.ablation_steps = 3, 2
        args.dense_steps, args.dense_batch, args.dense_crop, args.dense_patch = 2, 2, 32, 64
    torch.set_num_threads(args.threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    command = "python benchmarks/transfer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "commands.txt", "a") as f:
        f.write(f"{datetime.now(UTC):%Y-%m-%d %H:%M} {command}\n")
    commands = [line.split(" ", 2)[2] for line in (args.out / "commands.txt").read_text().splitlines()]
    state = prepare_data(args)
    log(f"data: {state['split_sizes']} of {len(state['classes'])} classes; pre-training pool {state['pretrain_pool']}")
    if args.stage == "data":
        return
    if args.stage in ("pretrain", "all", "evaluate"):
        encoder = pretrain(args, state)
        if args.stage == "pretrain":
            return
        evaluate(args, state, encoder)
    if args.stage in ("ablation", "all"):
        ablate(args, state)
    if args.stage == "diagnose":
        diagnose(args, state, pretrain(args, state))
    if args.stage == "dense" or (args.stage == "all" and args.dubai is not None):
        dense(args, pretrain(args, state))
    results = args.out / "results.jsonl"
    report(args, state, results, commands)
    log(f"report written to {args.results_dir}/transfer.md")


if __name__ == "__main__":
    main()
