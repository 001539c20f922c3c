"""rsvheat.evaluation: k-NN and the linear probe on separable synthetic features, stratified label fractions, the
fraction split file read by the classification data module, and the TransferMonitor in a tiny pre-training run."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rsvheat.evaluation import (
    TransferMonitor,
    extract_features,
    fraction_split_file,
    knn_accuracy,
    linear_probe,
    stratified_fraction,
)
from rsvheat.models.rsvheat import RSVHeat

MICRO = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVHEAT_CACHE", str(tmp_path / "cache"))


def blobs(n_per_class: int, num_classes: int = 5, dim: int = 32, seed: int = 0):
    """Gaussian clusters around random centres, far apart relative to their spread: ``(N, dim)``, ``(N,)``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 5
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def test_knn_and_linear_probe_separate_separable_features():
    train, val, test = blobs(20, seed=0), blobs(10, seed=1), blobs(10, seed=2)
    assert knn_accuracy(train, test, 5, k=10) == 1.0
    result = linear_probe(train, val, test, 5)
    assert result.test_accuracy == 1.0 and result.val_accuracy[result.weight_decay] == 1.0
    assert set(result.val_accuracy) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0}
    # chance on labels unrelated to the features
    shuffled = (train[0], train[1][torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(0))])
    assert knn_accuracy(shuffled, test, 5) < 0.6


def test_stratified_fraction_keeps_every_class_and_is_seeded():
    labels = [0] * 200 + [1] * 50 + [2] * 3
    one = stratified_fraction(labels, 0.01, seed=0)
    assert sorted({labels[i] for i in one}) == [0, 1, 2]  # at least one of each class
    assert [sum(labels[i] == c for i in one) for c in range(3)] == [2, 1, 1]
    assert one == stratified_fraction(labels, 0.01, seed=0)
    assert one != stratified_fraction(labels, 0.01, seed=1)
    ten = stratified_fraction(labels, 0.1, seed=0)
    assert [sum(labels[i] == c for i in ten) for c in range(3)] == [20, 5, 1]
    assert stratified_fraction(labels, 1.0, seed=3) == list(range(len(labels)))
    with pytest.raises(ValueError):
        stratified_fraction(labels, 0.0)


def make_classes(root, n: int = 12, size: int = 40, classes=("dark", "light", "stripes")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8) + 100 * c
            if name == "stripes":
                img[::4] = 0
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")


def make_dubai(root, size: int = 64) -> None:
    """Eight ``Tile N`` folders of the Dubai layout, one image each, masks in the set's own colours."""
    rng = np.random.default_rng(0)
    colours = [(0x84, 0x29, 0xF6), (0xE2, 0xA9, 0x29), (0x3C, 0x10, 0x98), (0xFE, 0xDD, 0x3A), (0x6E, 0xC1, 0xE4)]
    for t in range(1, 9):
        (root / f"Tile {t}/images").mkdir(parents=True)
        (root / f"Tile {t}/masks").mkdir(parents=True)
        classes = rng.integers(0, 5, (size // 16, size // 16)).repeat(16, 0).repeat(16, 1)
        mask = np.array(colours, dtype=np.uint8)[classes]
        image = (classes[..., None] * 40 + rng.integers(0, 30, (size, size, 3))).astype(np.uint8)
        Image.fromarray(image).save(root / f"Tile {t}/images/image_part_001.jpg")
        Image.fromarray(mask).save(root / f"Tile {t}/masks/image_part_001.png")


def test_fraction_split_file_is_read_by_the_classification_data_module(tmp_path):
    from rsvheat.datamodules import ClassificationDataModule

    make_classes(tmp_path / "scenes")
    base = tmp_path / "split.json"
    kwargs = dict(train_ratio=0.5, val_ratio=0.2, seed=0, img_size=32, num_workers=0, batch_size=4)
    dm = ClassificationDataModule(str(tmp_path / "scenes"), split_file=str(base), **kwargs)
    out = fraction_split_file(base, 0.1, seed=1, out=tmp_path / "f10.json")
    small = ClassificationDataModule(str(tmp_path / "scenes"), split_file=str(out), **kwargs)
    assert len(small.split["train"]) == 3 and {p.split("/")[0] for p in small.split["train"]} == set(dm.classes)
    assert small.split["test"] == dm.split["test"] and small.split["val"] == dm.split["val"]
    assert json.loads(out.read_text())["label_fraction"] == 0.1
    small.setup("fit")
    encoder = RSVHeat(img_size=32, num_classes=0, **MICRO).train()
    x, y = extract_features(encoder, small.datasets["train"], batch_size=2)
    assert x.shape == (3, 64) and y.tolist() == [0, 1, 2] and encoder.training


def test_monitor_logs_knn_and_linear_accuracy_in_a_tiny_pretraining_run(tmp_path):
    from rsvheat.trainers.pretrain import pretrain_cli
    from tests.rasters import ramp, write

    make_classes(tmp_path / "labelled")
    rng = np.random.default_rng(0)
    for i in range(4):
        write(tmp_path / f"data/opt/{i}.png", ramp(3, 48, 48) + rng.integers(0, 20, (3, 48, 48)).astype(np.uint8))
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {"variant": "rsvheat_tiny", "encoder_kwargs": MICRO, "decoder_width": 16, "proj_dim": 8},
        "data": {"optical_dirs": [str(tmp_path / "data/opt")], "crop_size": 32, "batch_size": 2, "num_workers": 0},
        "monitor": {
            "train_root": str(tmp_path / "labelled"),
            "every_n_steps": 2,
            "per_class_train": 8,
            "per_class_val": 4,
            "img_size": 32,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    pretrain_cli(["--config", str(path)])
    rows = list(csv.DictReader((tmp_path / "run/logs/version_0/metrics.csv").open()))
    logged = [
        (int(r["step"]), float(r["monitor/knn_acc"]), float(r["monitor/linear_acc"]))
        for r in rows
        if r.get("monitor/knn_acc")
    ]
    assert [s for s, _, _ in logged] == [0, 2, 4]
    assert all(0 <= a <= 1 and 0 <= b <= 1 for _, a, b in logged)
    # the classes differ in brightness: even a random micro encoder separates them better than chance (1/3)
    assert max(a for _, a, _ in logged) > 0.5


def test_monitor_is_off_by_default():
    monitor = TransferMonitor()
    assert not monitor.enabled
    assert not TransferMonitor(train_root="x").enabled


@pytest.mark.slow  # ~30 s: eight fine-tuning runs, each a Lightning fit and test
def test_transfer_benchmark_smoke_run_resumes(tmp_path):
    """benchmarks/transfer.py --smoke end to end; a second run finds every unit recorded and only rewrites the
    report."""
    import importlib.util
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("transfer_bench", repo / "benchmarks/transfer.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["transfer_bench"] = bench
    spec.loader.exec_module(bench)
    make_classes(tmp_path / "AID", n=6, size=40)
    args = ["--aid", str(tmp_path / "AID"), "--out", str(tmp_path / "out"), "--results-dir", str(tmp_path / "res")]
    args += ["--smoke", "--seeds", "0", "1", "--fractions", "0.5", "1.0", "--ablations", "paper"]
    args += ["--ft-lrs", "5e-4", "1e-3", "--protocols", "knn", "linear", "finetune", "lpft", "--ft-head-steps", "2"]
    bench.main(args)
    results = tmp_path / "out/results.jsonl"
    lines = results.read_text().splitlines()
    # seeds × inits × frozen protocols × fractions, then each fine-tuning protocol (plain, LP-FT) × inits × fractions:
    # the first seed at both rates, the second at the one chosen
    assert len(lines) == 2 * 2 * 2 * 2 + 2 * 2 * 2 * (2 + 1)
    rows = [json.loads(line) for line in lines]
    assert {r["protocol"] for r in rows} == {"knn", "linear", "finetune", "lpft"}
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    for key in itertools.product(("finetune", "lpft"), ("pretrained", "random"), (0.5, 1.0)):
        tuned = [r for r in rows if (r["protocol"], r["init"], r["fraction"]) == key]
        first = {r["lr"]: r["val_accuracy"] for r in tuned if r["seed"] == 0}
        best = max(first, key=lambda lr: (first[lr], lr == 5e-4))  # ties: the rate listed first
        assert [r["lr"] for r in tuned if r["seed"] == 1] == [best]
    assert (tmp_path / "out/pretrain/encoder.safetensors").is_file()
    md = (tmp_path / "res/transfer.md").read_text()
    assert "| finetune | 50 % |" in md and "(**partial**)" not in md and "Monitor during pre-training" in md
    assert "## Fine-tuning rate, chosen on validation (seed 0)" in md and md.count("**") >= 2 * 2 * 2 * 2
    assert all("(2)" in line for line in md.splitlines() if line.startswith(("| finetune |", "| lpft |")))
    assert "| lpft | 100 % |" in md and "steps of the head alone" in md
    assert (tmp_path / "res/transfer.png").stat().st_size > 0
    # the ablation stage: its own pre-training, frozen probes at 10 % and 100 % for each seed, a table row
    ablation = [json.loads(line) for line in (tmp_path / "out/ablation/results.jsonl").read_text().splitlines()]
    assert len(ablation) == 2 * 2 * 2 and {r["init"] for r in ablation} == {"paper"}
    assert "| paper | " in md and "| con_only | not run |" in md
    assert "Collapse monitors during pre-training" in md and "optical/optical InfoNCE/ln B" in md
    assert len(list(csv.DictReader((tmp_path / "res/transfer.csv").open()))) == 4 * 2 * 2
    bench.main(args)  # resumed: nothing re-measured
    assert results.read_text().splitlines() == lines
    assert len((tmp_path / "out/ablation/results.jsonl").read_text().splitlines()) == len(ablation)
    # the diagnosis stage: a fine-tuning pair per layer decay, scored on validation and test, its own table
    bench.main([*args, "--stage", "diagnose", "--diagnose-layer-decays", "1.0"])
    diag = [json.loads(line) for line in results.read_text().splitlines()[len(lines) :]]
    assert {(r["init"], r["protocol"]) for r in diag} == {("pretrained", "diag_ld1"), ("random", "diag_ld1")}
    assert all(0 <= r["val_accuracy"] <= 1 and r["layer_decay"] == 1.0 for r in diag)
    md = (tmp_path / "res/transfer.md").read_text()
    assert "## Diagnosis" in md and "| 1 | pretrained |" in md and "Status: 32 of 32 units" in md
    # the dense protocol: Dubai segmentation (split by tile), one fine-tuning per init, its own table
    make_dubai(tmp_path / "dubai")
    bench.main([*args, "--stage", "dense", "--dubai", str(tmp_path / "dubai")])
    dense = [json.loads(line) for line in results.read_text().splitlines() if "dubai_miou" in line]
    assert {r["init"] for r in dense} == {"pretrained", "random"} and all(0 <= r["accuracy"] <= 1 for r in dense)
    md = (tmp_path / "res/transfer.md").read_text()
    assert "## Dense protocol: Dubai" in md and "| pretrained | 1 |" in md
