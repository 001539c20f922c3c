"""Whole-scene segmentation of very large rasters on the CPU: peak memory and pixels per second.

Builds N × N 3-band GeoTIFFs from the embedded CC0 Landsat scene (mirrored tiles, written strip by strip), saves an
RS-vHeat-T UPerNet segmentation checkpoint (random weights: memory and speed do not depend on them), then runs
``rsvheat predict-scene`` on each scene in a fresh process and records its peak RSS (``VmHWM``) and wall time.

    python benchmarks/scene_memory.py [--sizes 10000 20000] [--tile 512] [--overlap 64]

Writes ``benchmarks/results/scene_memory.{csv,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rsvheat.apps.bench import machine_description, write_results

CHILD = """
import json, sys, time
from rsvheat.apps.bench import peak_rss_mb
from rsvheat.inference.tasks import predict_scene
start = time.perf_counter()
predict_scene(sys.argv[1], [sys.argv[2]], sys.argv[3], tile=int(sys.argv[4]), overlap=int(sys.argv[5]),
              batch_size=int(sys.argv[6]), device="cpu", overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def make_scene(path: Path, size: int) -> Path:
    """``size``² px, 3 bands, uint8: the Landsat scene mirrored to fill the square, georeferenced like it."""
    import rasterio
    from rasterio.windows import Window

    from rsvheat.apps.samples import read_scene

    if path.exists():
        return path
    image, profile = read_scene()
    image = image.copy()
    image[image == 0] = 1  # the copies tile the plane: no nodata inside the big scene
    h, w = image.shape[1:]
    tile = np.concatenate([image, image[:, :, ::-1]], 2)
    tile = np.concatenate([tile, tile[:, ::-1]], 1)  # (3, 2h, 2w), seamless by reflection
    out = dict(
        profile,
        width=size,
        height=size,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        nodata=None,
        BIGTIFF="IF_SAFER",
    )
    tmp = path.with_name(path.name + ".partial")
    with rasterio.open(tmp, "w", **out) as dst:
        for top in range(0, size, 512):
            rows = min(512, size - top)
            ys = (np.arange(top, top + rows) % (2 * h))[:, None]
            xs = (np.arange(size) % (2 * w))[None, :]
            dst.write(tile[:, ys, xs], window=Window(0, top, size, rows))
    tmp.replace(path)
    return path


def make_checkpoint(path: Path) -> Path:
    import torch

    from rsvheat.trainers import SegmentationTask

    task = SegmentationTask(num_classes=6, backbone="rsvheat_tiny", img_size=512, decoder_width=128)
    checkpoint = {  # what `rsvheat fit` writes, minus the optimiser state
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "rsvheat": {
            "task": "rsvheat.trainers.segmentation.SegmentationTask",
            "stats": {"optical": {"mean": [60.0, 60.0, 60.0], "std": [40.0, 40.0, 40.0]}},
            "classes": [str(k) for k in range(6)],
        },
    }
    torch.save(checkpoint, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/scene_memory"))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.work / "segmentation_tiny.ckpt")
    rows = []
    for size in args.sizes:
        start = time.perf_counter()
        scene = make_scene(args.work / f"scene_{size}.tif", size)
        built = time.perf_counter() - start
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(ckpt),
                str(scene),
                str(args.work / f"classes_{size}.tif"),
                str(args.tile),
                str(args.overlap),
                str(args.batch_size),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "size": size,
                "megapixels": size * size / 1e6,
                "tile": args.tile,
                "overlap": args.overlap,
                "batch": args.batch_size,
                "seconds": round(measured["seconds"], 1),
                "pixels_per_s": round(size * size / measured["seconds"]),
                "peak_rss_mb": round(measured["peak_rss_mb"]),
                "scene_build_s": round(built, 1),
            }
        )
        print(rows[-1], flush=True)
    lines = [
        "# Whole-scene segmentation memory and speed (CPU)",
        "",
        f"Command: `python benchmarks/scene_memory.py --sizes {' '.join(map(str, args.sizes))} --tile {args.tile} "
        f"--overlap {args.overlap} --batch-size {args.batch_size}`. Machine: {machine_description('cpu')}.",
        "RS-vHeat-T + UPerNet (decoder width 128, 6 classes), `rsvheat predict-scene` in a fresh process; peak RSS of "
        "that process (Python, PyTorch, the model and the strip buffers). Target: < 3 GB at 10 000², the same bound "
        "at 20 000².",
        "",
        "| scene | Mpx | tile / overlap | wall time | px/s | peak RSS |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {r['megapixels']:.0f} | {r['tile']} / {r['overlap']} | {r['seconds'] / 60:.1f} min | "
            f"{r['pixels_per_s']:,} | {r['peak_rss_mb'] / 1024:.2f} GB |"
        )
    write_results(args.out_dir, "scene_memory", rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
