"""Prepare the Dubai aerial segmentation set (Humans in the Loop / MBRSC: 8 tiles, 72 images, RGB-coded masks) for
rsvheat's segmentation layout.

    python scripts/prepare_dubai.py SRC DST [--train-tiles 1-6] [--val-tiles 7] [--test-tiles 8] [--patch 256]

SRC is the folder holding ``Tile 1`` .. ``Tile 8`` (each with ``images/*.jpg`` and ``masks/*.png``; the dataset's
folder ``Semantic segmentation dataset`` or the repository root above it). DST gets ``{train,val,test}/{images,masks}``
as :class:`rsvheat.datamodules.SegmentationDataModule` reads it (``num_classes: 5``, ``ignore_index: 255``, no
palette). The split is by tile, so no image of a test tile is seen in training; neighbouring images of one tile
overlap in content, which is why a split by image would flatter the scores.

Masks are converted from colours to class ids: 0 land ``#8429F6``, 1 water ``#E2A929``, 2 building ``#3C1098``,
3 vegetation ``#FEDD3A``, 4 road ``#6EC1E4``; ``Unlabeled`` ``#9B9B9B``, pure black and any other colour become 255
(ignored; the repository's ``classes.json`` palette does not match the masks, these colours are the masks' own).
``--patch N`` cuts images and masks into non-overlapping N×N patches (the last row/column aligned to the border, so
every pixel is covered); patches that are all ignored are dropped. Images are written as PNG.

Where the data come from: the repository ``smp0714/Semantic-Segmentation-of-Satellite-Imager`` at commit
``86da6fb9d3343381942952f2b78924df38a96feb``, folder ``Semantic segmentation dataset``. Licence: the dataset is
published by Humans in the Loop as CC0 1.0 (public domain) on its dataset page; the repository has no licence file.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("land", "water", "building", "vegetation", "road")
COLOURS = {0x8429F6: 0, 0xE2A929: 1, 0x3C1098: 2, 0xFEDD3A: 3, 0x6EC1E4: 4}  # Unlabeled 0x9B9B9B, black: ignored
IGNORE = 255


def parse_tiles(text: str) -> list[int]:
    """``"1-6"`` / ``"1,3,5"`` / ``"7"`` -> tile numbers."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def rgb_to_index(mask: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 colour mask -> ``(H, W)`` uint8 class ids (255 for unlabelled/unknown colours)."""
    code = mask[..., 0].astype(np.int64) << 16 | mask[..., 1].astype(np.int64) << 8 | mask[..., 2]
    out = np.full(code.shape, IGNORE, dtype=np.uint8)
    for colour, index in COLOURS.items():
        out[code == colour] = index
    return out


def tile_folders(src: Path) -> dict[int, Path]:
    """``{tile number: folder}`` of ``Tile N`` folders in ``src`` or in its ``Semantic segmentation dataset``."""
    for root in (src, src / "Semantic segmentation dataset"):
        found = {int(m.group(1)): p for p in root.glob("Tile *") if (m := re.fullmatch(r"Tile (\d+)", p.name))}
        if found:
            return found
    raise SystemExit(f"{src}: no 'Tile N' folders")


def windows(size: int, patch: int | None) -> list[int]:
    """Start offsets of patches along one side (the last one ends at the border)."""
    if not patch or size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, patch))
    return starts if starts[-1] + patch == size else [*starts, size - patch]


def prepare(
    src: str | Path,
    dst: str | Path,
    splits: dict[str, list[int]] | None = None,
    patch: int | None = None,
) -> dict[str, dict[str, int]]:
    """Write the split folders; returns ``{split: {"images": n, "pixels_<class>": n, ...}}`` (also in
    ``DST/counts.json``)."""
    splits = splits or {"train": list(range(1, 7)), "val": [7], "test": [8]}
    tiles, dst = tile_folders(Path(src)), Path(dst)
    counts: dict[str, dict[str, int]] = {}
    for split, numbers in splits.items():
        (dst / split / "images").mkdir(parents=True, exist_ok=True)
        (dst / split / "masks").mkdir(parents=True, exist_ok=True)
        stats = {"images": 0, **{f"pixels_{c}": 0 for c in CLASSES}, "pixels_ignored": 0}
        for t in numbers:
            if t not in tiles:
                raise SystemExit(f"tile {t} not found in {src} (found {sorted(tiles)})")
            for image_path in sorted((tiles[t] / "images").glob("*.jpg")):
                mask_path = tiles[t] / "masks" / f"{image_path.stem}.png"
                if not mask_path.is_file():
                    print(f"skipped {image_path}: no mask {mask_path.name}")
                    continue
                image = np.asarray(Image.open(image_path).convert("RGB"))
                mask = rgb_to_index(np.asarray(Image.open(mask_path).convert("RGB")))
                if image.shape[:2] != mask.shape:
                    print(f"skipped {image_path}: image {image.shape[:2]} and mask {mask.shape} differ")
                    continue
                h, w = mask.shape
                for y in windows(h, patch):
                    for x in windows(w, patch):
                        m = mask[y : y + (patch or h), x : x + (patch or w)]
                        if (m == IGNORE).all():
                            continue
                        name = f"tile{t}_{image_path.stem}" + (f"_y{y}_x{x}" if patch else "")
                        Image.fromarray(image[y : y + (patch or h), x : x + (patch or w)]).save(
                            dst / split / "images" / f"{name}.png"
                        )
                        Image.fromarray(m).save(dst / split / "masks" / f"{name}.png")
                        stats["images"] += 1
                        for i, c in enumerate(CLASSES):
                            stats[f"pixels_{c}"] += int((m == i).sum())
                        stats["pixels_ignored"] += int((m == IGNORE).sum())
        counts[split] = stats
    (dst / "counts.json").write_text(json.dumps({"classes": CLASSES, "splits": splits, "counts": counts}, indent=1))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--train-tiles", default="1-6")
    parser.add_argument("--val-tiles", default="7")
    parser.add_argument("--test-tiles", default="8")
    parser.add_argument("--patch", type=int, default=None, help="cut into N×N patches")
    args = parser.parse_args(argv)
    splits = {k: parse_tiles(getattr(args, f"{k}_tiles")) for k in ("train", "val", "test")}
    counts = prepare(args.src, args.dst, splits, args.patch)
    for split, stats in counts.items():
        print(split, stats)


if __name__ == "__main__":
    main()
