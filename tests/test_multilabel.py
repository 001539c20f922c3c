"""Multi-label scene classification: the BigEarthNet-S2 and CSV layouts, their errors, the metrics against values
computed by hand, a micro model overfitting a tiny multi-label set, ``rsvheat fit`` on the shipped config and the
checkpoint read back by the inference loader."""

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from rsvheat.cli import main as rsvheat_main
from rsvheat.data.io import ImageReadError
from rsvheat.data.multilabel import (
    BIGEARTHNET_19,
    BIGEARTHNET_43,
    BIGEARTHNET_S2_BANDS,
    rarest_label_strata,
    read_label_csv,
    scan_bigearthnet,
)
from rsvheat.datamodules import MultiLabelDataModule
from rsvheat.inference.tasks import load_task
from rsvheat.trainers import MultiLabelClassificationTask
from rsvheat.trainers.cli import task_cli
from rsvheat.trainers.multilabel import PresentClassAP
from tests.rasters import ramp, write

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/multilabel/bigearthnet_tiny_cpu.yaml"
EXAMPLE = REPO / "data/bigearthnet-example/BigEarthNet-S2-Example"
MICRO = dict(
    backbone="rsvheat_tiny",
    encoder_kwargs={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
    drop_path_rate=0.0,
    layer_decay=1.0,
    warmup_fraction=0.0,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVHEAT_CACHE", str(tmp_path / "cache"))


def bigearthnet(root: Path, patches: dict[str, list[str]], bands=BIGEARTHNET_S2_BANDS) -> Path:
    """BigEarthNet-S2 v1 patch folders: one GeoTIFF per band at its own resolution (10 m: 120 px, 20 m: 60 px,
    60 m: 20 px) and the labels' JSON."""
    side = {"B02": 120, "B03": 120, "B04": 120, "B08": 120, "B01": 20, "B09": 20}
    for i, (name, labels) in enumerate(patches.items()):
        folder = root / name
        for j, band in enumerate(bands):
            n = side.get(band, 60)
            write(folder / f"{name}_{band}.tif", (ramp(1, n, n, np.uint16) + 50 * i + 7 * j).astype(np.uint16))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}_labels_metadata.json").write_text(json.dumps({"labels": labels}))
    return root


PATCHES = {
    "S2A_a_1_1": ["Non-irrigated arable land", "Pastures"],
    "S2A_a_1_2": ["Coniferous forest", "Peatbogs", "Water bodies"],
    "S2A_a_1_3": ["Pastures", "Airports"],  # airports have no 19-class counterpart
    "S2A_a_1_4": ["Sea and ocean", "Estuaries"],
    "S2A_a_1_5": ["Non-irrigated arable land", "Rice fields"],  # both merge into "Arable land"
    "S2A_a_1_6": ["Coniferous forest", "Mixed forest"],
}


def labelled(classes, vector) -> list[str]:
    return [c for c, v in zip(classes, vector, strict=True) if v]


# -- data -------------------------------------------------------------------------------------------------------------


def test_bigearthnet_19_class_nomenclature():
    merged = [old for olds in BIGEARTHNET_19.values() for old in olds]
    assert len(BIGEARTHNET_19) == 19 and len(BIGEARTHNET_43) == 43
    assert len(merged) == len(set(merged)) and set(merged) <= set(BIGEARTHNET_43)  # each label merges at most once
    dropped = {
        "Road and rail networks and associated land",
        "Port areas",
        "Airports",
        "Mineral extraction sites",
        "Dump sites",
        "Construction sites",
        "Green urban areas",
        "Sport and leisure facilities",
        "Bare rock",
        "Burnt areas",
        "Intertidal flats",
    }
    assert set(BIGEARTHNET_43) - set(merged) == dropped


def test_bigearthnet_layout_labels_bands_and_split(tmp_path):
    root = bigearthnet(tmp_path / "ben", PATCHES)
    classes, samples = scan_bigearthnet(root)
    labels = {name: labelled(classes, v) for name, v in samples}
    assert labels["S2A_a_1_3"] == ["Pastures"]
    assert labels["S2A_a_1_5"] == ["Arable land"]
    assert labels["S2A_a_1_2"] == ["Coniferous forest", "Inland wetlands", "Inland waters"]
    classes43, samples43 = scan_bigearthnet(root, nomenclature=43)
    assert labelled(classes43, dict(samples43)["S2A_a_1_3"]) == ["Airports", "Pastures"]

    split_file = tmp_path / "split.json"
    dm = MultiLabelDataModule(
        str(root), channels={"optical": 12}, split_file=str(split_file), img_size=32, num_workers=0, batch_size=2
    )
    assert dm.num_classes == 19 and dm.bands == list(BIGEARTHNET_S2_BANDS)
    split = json.loads(split_file.read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(PATCHES)
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    assert sample["image"].shape == (12, 32, 32) and sample["label"].shape == (19,)
    assert sample["label"].dtype == torch.int64 and sample["path"].startswith(str(root))
    # the 20 m and 60 m bands come out on the 10 m grid of 120 px before resizing
    raw = dm.datasets["train"].read_raw(0)
    assert raw.shape == (12, 120, 120)
    # true colour by default for three channels; the same split file is read back
    rgb = MultiLabelDataModule(str(root), split_file=str(split_file), img_size=32, num_workers=0)
    assert rgb.bands == ["B04", "B03", "B02"] and rgb.split["train"] == split["train"]


def test_rarest_label_strata():
    # class counts 3, 2, 1: each sample falls in the group of its rarest class, no class -> group K
    labels = [(1, 0, 0), (1, 1, 0), (1, 1, 1), (0, 0, 0)]
    assert rarest_label_strata(labels) == [0, 1, 2, 3]


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_layout_list_and_one_hot_forms(tmp_path):
    images = tmp_path / "images"
    for i in range(4):
        write(images / f"img{i}.png", ramp(3, 24, 24) + 20 * i)
    listed = write_csv(
        tmp_path / "list.csv",
        [["filename", "labels"], ["img0.png", "sea;beach"], ["img1.png", "forest"], ["img2.png", "beach"]],
    )
    classes, samples = read_label_csv(listed, images)
    assert classes == ["beach", "forest", "sea"]
    assert samples == [("img0.png", (1, 0, 1)), ("img1.png", (0, 1, 0)), ("img2.png", (1, 0, 0))]
    hot = write_csv(
        tmp_path / "hot.csv",
        [["filename", "sea", "beach", "forest"], ["img0.png", "1", "1", "0"], ["img3.png", "0", "0", "0"]],
    )
    classes, samples = read_label_csv(hot, images)
    assert classes == ["sea", "beach", "forest"]  # the header's order
    assert samples == [("img0.png", (1, 1, 0)), ("img3.png", (0, 0, 0))]  # all-zero rows are explicit: kept

    dm = MultiLabelDataModule(
        str(images),
        labels=str(listed),
        bands=[1, 2, 3],
        train_ratio=1.0,
        val_ratio=0.0,
        split_file=str(tmp_path / "s.json"),
        img_size=16,
        num_workers=0,
        predict_dir=str(images),
    )
    dm.setup()
    assert dm.datasets["train"][0]["label"].tolist() == [1, 0, 1] and dm.datasets["train"][0]["image"].shape[0] == 3
    assert len(dm.datasets["predict"]) == 4 and "path" in dm.datasets["predict"][0]


def test_bad_inputs_are_named(tmp_path):
    images = tmp_path / "images"
    write(images / "a.png", ramp(3, 16, 16))
    write(images / "b.png", ramp(3, 16, 16))
    rows = [["filename", "labels"], ["a.png", "sea"], ["b.png", "sea;lava"]]
    with pytest.raises(ValueError, match=r"list\.csv line 3: label 'lava' is not in the class list \['sea'\]"):
        read_label_csv(write_csv(tmp_path / "list.csv", rows), images, classes=["sea"])
    with pytest.raises(ImageReadError, match=r"missing\.csv line 3: image not found: .*c\.png"):
        read_label_csv(write_csv(tmp_path / "missing.csv", [*rows[:2], ["c.png", "sea"]]), images)
    with pytest.raises(ValueError, match=r"empty\.csv line 3: no labels for 'b\.png'"):
        read_label_csv(write_csv(tmp_path / "empty.csv", [*rows[:2], ["b.png", ""]]), images)
    with pytest.raises(ValueError, match=r"twice\.csv line 3: 'a\.png' is listed twice \(first on line 2\)"):
        read_label_csv(write_csv(tmp_path / "twice.csv", [*rows[:2], ["a.png", "sea"]]), images)
    with pytest.raises(ValueError, match=r"hot\.csv line 2: expected 2 values of 0 or 1"):
        read_label_csv(write_csv(tmp_path / "hot.csv", [["filename", "sea", "sky"], ["a.png", "1", "yes"]]), images)
    with pytest.raises(FileNotFoundError, match="label CSV not found"):
        read_label_csv(tmp_path / "nope.csv", images)

    root = bigearthnet(tmp_path / "ben", {"S2A_b_1_1": ["Pastures", "Lava fields"]}, bands=("B04",))
    with pytest.raises(ValueError, match=r"S2A_b_1_1_labels_metadata\.json: label 'Lava fields' is not one of"):
        scan_bigearthnet(root)
    (root / "S2A_b_1_1" / "S2A_b_1_1_labels_metadata.json").write_text(json.dumps({"labels": ["Pastures"]}))
    with pytest.raises(ValueError, match="19-class nomenclature"):
        scan_bigearthnet(root, classes=["Pastures"])
    # a band file that is missing is named when the patch is read
    dm = MultiLabelDataModule(str(root), train_ratio=1.0, val_ratio=0.0, split_file=str(tmp_path / "s.json"))
    with pytest.raises(ImageReadError, match=r"image not found: .*S2A_b_1_1_B03\.tif"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="name the bands"):
        MultiLabelDataModule(str(root), channels={"optical": 4}, split_file=str(tmp_path / "s.json"))

    with pytest.raises(ValueError, match="one per class"):
        MultiLabelClassificationTask(num_classes=3, pos_weight=[1.0, 2.0], **MICRO)
    task = MultiLabelClassificationTask(num_classes=3, img_size=32, **MICRO)
    with pytest.raises(ValueError, match=r"\(B, 3\) multi-hot labels, got shape \(2,\)"):
        task.training_step({"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 2])}, 0)


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="run scripts/get_bigearthnet_example.py for the real patches")
def test_real_bigearthnet_example_patches():
    classes, samples = scan_bigearthnet(EXAMPLE)
    labels = {name: labelled(classes, v) for name, v in samples}
    assert len(labels) == 6
    # its JSON: "Non-irrigated arable land", "Land principally occupied by agriculture, with significant areas of ..."
    assert labels["S2A_MSIL2A_20170613T101031_87_48"] == [
        "Arable land",
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    ]
    # its JSON: "Coniferous forest", "Mixed forest", "Transitional woodland/shrub", "Peatbogs", "Water bodies"
    assert labels["S2B_MSIL2A_20170924T93020_69_24"] == [
        "Coniferous forest",
        "Mixed forest",
        "Transitional woodland, shrub",
        "Inland wetlands",
        "Inland waters",
    ]


# -- metrics and training ---------------------------------------------------------------------------------------------


def test_metrics_match_values_computed_by_hand():
    task = MultiLabelClassificationTask(num_classes=2, img_size=32, **MICRO)
    metrics = task.val_metrics
    target = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]])
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.1], [0.3, 0.8], [0.1, 0.7]])
    # at 0.5, class 0 is all right; class 1 predicts [0, 0, 1, 1] for [0, 1, 1, 1]: TP 2, FN 1, TN 1
    # accuracy: (4 + 3) / 8 decisions (OA), per class 1 and 3/4 (AA: the same, every class sees every image)
    # F1: class 0 = 1, class 1 = 2·1·(2/3) / (1 + 2/3) = 0.8 -> macro 0.9; micro: TP 4, FP 0, FN 1 -> 8/9
    # AP: class 0 ranks both positives first = 1; class 1 ranks 0.8+, 0.7+, 0.2-, 0.1+ -> (1 + 1 + 3/4) / 3 = 11/12
    # micro AP over 8 scores: four positives at precision 1, the fifth at 0.1 (tied with a negative) at 5/8:
    # (4 · 1 + 5/8) / 5 = 0.925
    metrics.update(probs, target)
    values = {k.removeprefix("val/"): float(v) for k, v in metrics.compute().items()}
    expected = {
        "OA": 7 / 8,
        "AA": (1 + 3 / 4) / 2,
        "F1_micro": 8 / 9,
        "F1_macro": 0.9,
        "mAP_macro": (1 + 11 / 12) / 2,
        "mAP_micro": 0.925,
    }
    assert values == pytest.approx(expected, abs=1e-6)

    # a class without any positive is left out of the macro mAP (torchmetrics' own macro would count it as 0)
    ap = PresentClassAP(3)
    ap.update(
        torch.cat([probs, torch.tensor([[0.1], [0.2], [0.3], [0.6]])], 1),
        torch.cat([target, torch.zeros(4, 1)], 1).long(),
    )
    assert float(ap.compute()) == pytest.approx((1 + 11 / 12) / 2)


def tiny_multilabel_set(size: int = 32) -> list[dict]:
    """Eight noisy images, one per subset of three classes: class k present = an 8 x 8 patch of bright stripes of
    period k + 2 somewhere in the image (all bands). A random micro model ranks them barely above chance."""
    rng = np.random.default_rng(0)
    samples = []
    for code in range(8):
        label = [(code >> k) & 1 for k in range(3)]
        image = rng.normal(0, 0.5, (3, size, size)).astype(np.float32)
        for k in range(3):
            if label[k]:
                top, left = rng.integers(0, size - 8, 2)
                stripes = (np.arange(8) % (k + 2) == 0).astype(np.float32)
                image[:, top : top + 8, left : left + 8] += 2.0 * stripes[None, :, None]
        samples.append({"image": torch.from_numpy(image), "label": torch.tensor(label)})
    return samples


def test_micro_model_overfits_a_tiny_multilabel_set(tmp_path):
    torch.manual_seed(0)
    data = tiny_multilabel_set()
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    task = MultiLabelClassificationTask(num_classes=3, img_size=32, lr=3e-3, weight_decay=0.0, **MICRO)

    def score() -> dict[str, float]:
        evaluation = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        return evaluation.validate(task, torch.utils.data.DataLoader(data, batch_size=8), verbose=False)[0]

    before = score()
    task.configure_callbacks = list  # no best/last checkpoints written every epoch (tested with the CLI below)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=12,  # one step per epoch: mAP reaches 1 within about 5 steps
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(task, loader)
    after = score()
    assert after["val/loss"] < 0.3 * before["val/loss"]
    assert before["val/mAP_macro"] < 0.9 and after["val/mAP_macro"] > 0.99
    assert after["val/F1_macro"] > 0.9


# -- command line and checkpoints -------------------------------------------------------------------------------------


def cli_args(tmp_path: Path, root: Path) -> list[str]:
    """The shipped config on tiny data with a micro backbone."""
    return [
        "--config",
        str(CONFIG),
        "--data.root",
        str(root),
        "--data.predict_dir",
        str(root),
        "--data.split_file",
        str(tmp_path / "split.json"),
        "--data.img_size",
        "32",
        "--model.init_args.img_size",
        "32",
        "--model.init_args.encoder_kwargs",
        json.dumps(MICRO["encoder_kwargs"]),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]


def test_rsvheat_fit_fast_dev_run_on_the_shipped_config(tmp_path):
    root = bigearthnet(tmp_path / "ben", PATCHES)
    rsvheat_main(["fit", *cli_args(tmp_path, root), "--trainer.fast_dev_run", "true"])
    assert (tmp_path / "split.json").is_file()
    config = yaml.safe_load(CONFIG.read_text())
    assert config["model"]["class_path"] == "rsvheat.trainers.MultiLabelClassificationTask"


def test_checkpoint_round_trip_test_report_and_predictions(tmp_path):
    root = bigearthnet(tmp_path / "ben", PATCHES)
    args = cli_args(tmp_path, root)
    task_cli(["fit", *args, "--trainer.max_epochs", "1"])
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    task, meta = load_task(ckpt)
    assert task.spec.name == "multilabel" and not task.model.training
    assert meta["classes"] == list(BIGEARTHNET_19) and len(meta["stats"]["optical"]["mean"]) == 12
    # the rebuilt task holds the trained weights: the same outputs as the checkpoint's state dict in a fresh task
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    fresh = MultiLabelClassificationTask(num_classes=19, modalities={"optical": 12}, img_size=32, **MICRO)
    fresh.load_state_dict(state)
    x = torch.randn(2, 12, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task.model(x), fresh.eval()(x))

    task_cli(["test", *args, "--ckpt_path", "last"])
    report = max((tmp_path / "run/logs").glob("version_*/per_class_metrics.csv"))
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == list(BIGEARTHNET_19)
    assert all(r["AP"] == "" for r in rows if r["positives"] == "0")  # no positives, no AP
    task_cli(["predict", *args, "--ckpt_path", "last"])
    with open(tmp_path / "run/predictions/multilabel.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(PATCHES) and all(0 <= float(r["Pastures"]) <= 1 for r in table)
    assert all(set(filter(None, r["labels"].split(";"))) <= set(BIGEARTHNET_19) for r in table)


# -- TorchGeo ----------------------------------------------------------------------------------------------------------


def torchgeo_bigearthnet_root(root: Path, s2_folder: Path) -> Path:
    """TorchGeo's BigEarthNet layout around an S2 folder: ``BigEarthNet-v1.0`` and the split CSVs of
    ``s2 patch,s1 patch`` lines (every patch in every split; only the S2 side is read with ``bands="s2"``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "BigEarthNet-v1.0").symlink_to(s2_folder.resolve(), target_is_directory=True)
    (root / "BigEarthNet-S1-v1.0").mkdir()
    lines = "".join(f"{p.name},s1_{p.name}\n" for p in sorted(s2_folder.iterdir()) if p.is_dir())
    for split in ("train", "val", "test"):
        (root / f"bigearthnet-{split}.csv").write_text(lines)
    return root


def test_labels_agree_with_torchgeo_bigearthnet(tmp_path):
    """Every one of the 43 labels, alone and in sets, gives the same 19- and 43-class vectors as TorchGeo's dataset
    (its labels JSON is all either reads here)."""
    datasets = pytest.importorskip("torchgeo.datasets")
    s2 = tmp_path / "s2"
    patches = {f"p{i:02d}": [name] for i, name in enumerate(BIGEARTHNET_43)}
    patches.update(
        {"x01": [BIGEARTHNET_43[0], BIGEARTHNET_43[1], BIGEARTHNET_43[42]], "x02": list(PATCHES.values())[1]}
    )
    for name, labels in patches.items():
        (s2 / name).mkdir(parents=True)
        (s2 / name / f"{name}_labels_metadata.json").write_text(json.dumps({"labels": labels}))
    root = torchgeo_bigearthnet_root(tmp_path / "tg", s2)
    for k in (19, 43):
        theirs = datasets.BigEarthNet(str(root), split="train", bands="s2", num_classes=k)
        classes, ours = scan_bigearthnet(s2, nomenclature=k)
        assert classes == theirs.class_sets[k]
        order = {Path(f["s2"]).name: i for i, f in enumerate(theirs.folders)}
        for name, vector in ours:
            assert theirs._load_target(order[name]).tolist() == list(vector), (k, name)


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="run scripts/get_bigearthnet_example.py for the real patches")
def test_task_trains_on_torchgeo_bigearthnet_samples(tmp_path):
    """TorchGeo's BigEarthNet samples (12 bands, 120 x 120, multi-hot ``label``) train the task as they are."""
    datasets = pytest.importorskip("torchgeo.datasets")
    root = torchgeo_bigearthnet_root(tmp_path / "tg", EXAMPLE)
    ds = datasets.BigEarthNet(str(root), split="train", bands="s2", num_classes=19)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 12, 120, 120) and batch["label"].shape == (2, 19)
    batch["image"] = (batch["image"] - 1500.0) / 1500.0  # roughly the example's scale (no transforms given)
    task = MultiLabelClassificationTask(num_classes=19, modalities={"optical": 12}, img_size=120, **MICRO)
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and task.model.stems.optical.conv1.weight.grad is not None


def test_fixed_split_from_lists_like_bigearthnets_official_ones(tmp_path):
    root = bigearthnet(tmp_path / "ben", PATCHES, bands=("B04", "B03", "B02"))
    names = sorted(PATCHES)
    lists = {}
    for key, part in (("train", names[:3]), ("val", names[3:4]), ("test", names[4:5])):  # names[5]: in no list
        lists[key] = str(tmp_path / f"{key}.csv")
        Path(lists[key]).write_text("".join(f"{n},S1_{n}\n" for n in part))  # official lines: s2 patch,s1 patch
    dm = MultiLabelDataModule(str(root), split_lists=lists, split_file=str(tmp_path / "unused.json"), num_workers=0)
    assert dm.split == {"train": names[:3], "val": names[3:4], "test": names[4:5]} and dm.has_validation
    assert not (tmp_path / "unused.json").exists()
    Path(lists["test"]).write_text(f"{names[4]},x\nS2A_nowhere,x\n")
    with pytest.raises(ValueError, match=r"test\.csv line 2: 'S2A_nowhere' is not a sample"):
        MultiLabelDataModule(str(root), split_lists=lists)
    Path(lists["test"]).write_text(f"{names[0]},x\n")
    with pytest.raises(
        ValueError, match=r"test\.csv line 1: 'S2A_a_1_1' is listed twice \(first at .*train\.csv line 1"
    ):
        MultiLabelDataModule(str(root), split_lists=lists)
