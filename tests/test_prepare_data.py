"""scripts/prepare_aid.py and scripts/prepare_dubai.py on tiny synthetic copies of the two datasets' layouts."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_prepare_aid_verifies_counts_and_subsamples(tmp_path):
    aid = load("prepare_aid")
    rng = np.random.default_rng(0)
    for c, n in (("Airport", 5), ("Beach", 3)):
        for i in range(n):
            path = tmp_path / "src/AID" / c / f"{c.lower()}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
    (tmp_path / "src/AID/Beach/beach_lfs.jpg").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    (tmp_path / "src/AID/Beach/beach_cut.jpg").write_bytes((tmp_path / "src/AID/Beach/beach_0.jpg").read_bytes()[:50])
    counts = aid.prepare(tmp_path / "src", tmp_path / "out")
    assert counts == {"Airport": 5, "Beach": 3}  # the LFS pointer and the truncated file are left out
    assert (tmp_path / "out/Beach/beach_0.jpg").is_symlink()
    assert json.loads((tmp_path / "out/counts.json").read_text())["skipped"] == 2
    sub = aid.prepare(tmp_path / "src", tmp_path / "sub", per_class=2, seed=1)
    aid.prepare(tmp_path / "src", tmp_path / "sub2", per_class=2, seed=1)
    assert sub == {"Airport": 2, "Beach": 2}
    assert sorted(p.name for p in (tmp_path / "sub").rglob("*.jpg")) == sorted(
        p.name for p in (tmp_path / "sub2").rglob("*.jpg")
    )
    from rsvheat.data.classification import scan_class_folders

    classes, samples = scan_class_folders(tmp_path / "sub")
    assert classes == ["Airport", "Beach"] and len(samples) == 4


def test_prepare_dubai_splits_by_tile_and_maps_colours(tmp_path):
    dubai = load("prepare_dubai")
    colours = [(0x84, 0x29, 0xF6), (0xE2, 0xA9, 0x29), (0x3C, 0x10, 0x98), (0xFE, 0xDD, 0x3A), (0x6E, 0xC1, 0xE4)]
    root = tmp_path / "src/Semantic segmentation dataset"
    for t in (1, 2, 3):
        (root / f"Tile {t}/images").mkdir(parents=True)
        (root / f"Tile {t}/masks").mkdir(parents=True)
        for i in (1, 2):
            Image.fromarray(np.full((40, 50, 3), 10 * t, np.uint8)).save(root / f"Tile {t}/images/image_part_00{i}.jpg")
            mask = np.zeros((40, 50, 3), np.uint8)  # black: ignored
            for k, colour in enumerate(colours):
                mask[:, 10 * k : 10 * k + 8] = colour
            mask[:, 48:] = (0x9B, 0x9B, 0x9B)  # Unlabeled
            Image.fromarray(mask).save(root / f"Tile {t}/masks/image_part_00{i}.png")
    counts = dubai.prepare(tmp_path / "src", tmp_path / "out", {"train": [1], "val": [2], "test": [3]})
    assert {k: v["images"] for k, v in counts.items()} == {"train": 2, "val": 2, "test": 2}
    mask = np.asarray(Image.open(tmp_path / "out/test/masks/tile3_image_part_001.png"))
    assert mask.shape == (40, 50)
    assert mask[0, :10].tolist() == [0] * 8 + [255] * 2
    assert mask[0, 40:50].tolist() == [4] * 8 + [255] * 2
    assert set(np.unique(mask)) == {0, 1, 2, 3, 4, 255}
    patched = dubai.prepare(tmp_path / "src", tmp_path / "patches", {"train": [1, 2], "val": [3], "test": []}, 32)
    assert patched["train"]["images"] == 2 * 2 * 4  # 40×50 -> windows y {0, 8} × x {0, 18}
    assert dubai.parse_tiles("1-3,5") == [1, 2, 3, 5]
    assert dubai.windows(50, 32) == [0, 18]
    from rsvheat.data.segmentation import SegmentationFolder

    stats = {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}}
    folder = tmp_path / "patches/train"
    ds = SegmentationFolder(folder / "images", folder / "masks", 5, {"optical": 3}, stats)
    assert len(ds) == 16 and ds[0]["mask"].shape == (32, 32) and int(ds[0]["mask"].max()) == 255
