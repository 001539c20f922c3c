"""Prepare AID (Aerial Image Dataset, Xia et al. 2017: 30 scene classes) for rsvheat's classification layout.

    python scripts/prepare_aid.py SRC DST [--per-class N] [--seed S] [--copy]

SRC holds AID's class folders (``SRC/<Class>/*.jpg``, or one level above them); DST becomes ``DST/<Class>/<image>``,
the layout :class:`rsvheat.datamodules.ClassificationDataModule` reads. Every file is opened and decoded first: a Git
LFS pointer (a small text naming the real file by its hash) or a truncated image is reported and left out. Files are
symlinked (``--copy`` copies them). ``--per-class N`` keeps N images per class, drawn with ``--seed`` from the sorted
file list, so the same arguments always give the same subset. The per-class counts are printed and written to
``DST/counts.json``.

Where the data come from: the repository ``zlima/testtensor`` at commit ``f6a0f74645eab10754425bff50747e508290dee1``,
folder ``AID/`` (10 000 JPEGs, 30 classes, downsampled to 150×150 px; a sparse checkout of ``AID/`` is enough).
Licence: AID is released for research use (cite Xia et al., "AID: A Benchmark Data Set for Performance Evaluation of
Aerial Scene Classification", IEEE TGRS 2017); that repository has no licence file. Do not commit the images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
LFS_HEADER = b"version https://git-lfs"


def check_image(path: Path) -> str | None:
    """``None`` if ``path`` decodes as an image, otherwise why not (LFS pointer, unreadable)."""
    with open(path, "rb") as f:
        if f.read(len(LFS_HEADER)) == LFS_HEADER:
            return "Git LFS pointer, not an image"
    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: a truncated file raises here
            if min(im.size) < 8:
                return f"image of {im.size} px"
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError ...)
        return f"unreadable ({type(err).__name__}: {err})"
    return None


def class_root(src: Path) -> Path:
    """The folder holding the class folders: ``src`` itself or its single sub-folder (``AID/``)."""
    subdirs = [p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and not any(p.suffix.lower() in SUFFIXES for p in subdirs[0].iterdir()):
        return subdirs[0]
    return src


def prepare(
    src: str | Path, dst: str | Path, per_class: int | None = None, seed: int = 0, copy: bool = False
) -> dict[str, int]:
    """Link or copy the verified images of every class folder of ``src`` to ``dst``; returns ``{class: count}``."""
    src, dst = class_root(Path(src)), Path(dst)
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"{src}: no class folders (expected SRC/<Class>/<image>)")
    counts, bad = {}, []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        good = []
        for path in files:
            reason = check_image(path)
            (bad.append(f"{path}: {reason}") if reason else good.append(path))
        if per_class is not None and len(good) > per_class:
            # a per-class generator: one class's subset does not depend on the other classes' file counts
            rng = np.random.default_rng([seed, sum(folder.name.encode())])
            good = [good[i] for i in sorted(rng.choice(len(good), per_class, replace=False))]
        if not good:
            continue
        out = dst / folder.name
        out.mkdir(parents=True, exist_ok=True)
        for path in good:
            target = out / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.unlink()
            if copy:
                shutil.copy2(path, target)
            else:
                target.symlink_to(path.resolve())
        counts[folder.name] = len(good)
    for line in bad:
        print(f"skipped {line}", file=sys.stderr)
    (dst / "counts.json").write_text(json.dumps({"counts": counts, "skipped": len(bad)}, indent=1))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--per-class", type=int, default=None, help="keep N images per class (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy", action="store_true", help="copy instead of symlinking")
    args = parser.parse_args(argv)
    counts = prepare(args.src, args.dst, args.per_class, args.seed, args.copy)
    for name, n in counts.items():
        print(f"{name:24s} {n:5d}")
    print(f"{len(counts)} classes, {sum(counts.values())} images -> {args.dst}")


if __name__ == "__main__":
    main()
