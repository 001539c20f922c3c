"""Many scenes with one fine-tuned checkpoint, over processes, GPUs and nodes: ``rsvheat predict-scenes``.

The scenes (paths, globs, or a list file) are split across the processes that ``torchrun`` starts (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``; one process when it is not used): a deterministic split that balances the scenes'
pixel counts, read from their headers. Each process reads the checkpoint once and maps its scenes one after another
with :func:`~rsvheat.inference.tasks.map_scene`, the code behind ``predict-scene``, so every scene's outputs appear
atomically, all together, as there. A scene that fails (missing, corrupt, wrong bands...) is recorded with its error
and the process moves on; when all are done the processes gather their records and the first writes
``<out>/summary.json`` (atomically): per scene its status (``ok``, ``skipped``, ``failed``), error, seconds and rank.
A re-run skips the scenes whose outputs are complete (present and readable: the atomic writes never leave a partial
file under a final name) unless ``overwrite``.

Outputs of a scene named ``<stem>.tif`` (its first raster's file name without suffix), in the output folder:
``<stem>.tif`` (class or change map), ``<stem>.probabilities.tif`` (when asked), ``<stem>.geojson`` or
``<stem>.boxes.json`` (detection). Run ``python -m rsvheat.inference.batch --help`` for the command line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rsvheat import arguments
from rsvheat.data.io import image_header
from rsvheat.files import write_atomic
from rsvheat.inference.scene import check_tile
from rsvheat.inference.tasks import load_task, map_scene, resolve_device, set_score_threshold
from rsvheat.models.precision import check_precision, compile_in_place

#: The summary's name in the output folder.
SUMMARY = "summary.json"
#: Separates the co-registered rasters of one scene (change detection's before|after, optical|SAR) in a scene
#: argument or a line of a list file; file names rarely hold it, unlike spaces or commas.
SEPARATOR = "|"
#: Side outputs' suffixes after the scene's stem.
PROBABILITIES, BOXES_JSON = arguments.PROBABILITIES, ".boxes.json"
#: How long a finished process waits for the others at the final gather (hours): the split balances pixels, not
#: seconds, and the collectives' defaults (10 to 30 minutes) are shorter than an archive's imbalance can be.
DEFAULT_TIMEOUT_HOURS = 24.0


@dataclass(frozen=True)
class SceneJob:
    """One scene: its co-registered rasters (one for most tasks, two for change detection or optical + SAR)."""

    images: tuple[Path, ...]

    @property
    def stem(self) -> str:
        return self.images[0].stem

    def label(self) -> str:
        return SEPARATOR.join(str(p) for p in self.images)

    def outputs(self, out_dir: Path, detection: bool, probabilities: bool, box_format: str) -> list[Path]:
        """The files this scene writes into ``out_dir``, the map (or boxes) first."""
        if detection:
            return [out_dir / (self.stem + (".geojson" if box_format == "geojson" else BOXES_JSON))]
        names = [self.stem + ".tif"] + ([self.stem + PROBABILITIES] if probabilities else [])
        return [out_dir / name for name in names]


def _scene_item(text: str, base: Path | None, origin: str) -> list[SceneJob]:
    """The scenes one argument or list line names: ``a.tif``, ``before.tif|after.tif`` or a glob (single rasters).
    Relative paths are taken relative to ``base`` (a list file's folder) when given."""
    parts = [part.strip() for part in text.split(SEPARATOR)]
    if any(not part for part in parts):
        raise ValueError(f"{origin}: an empty raster name in {text!r}")
    paths = [Path(part).expanduser() for part in parts]
    if base is not None:
        paths = [p if p.is_absolute() else base / p for p in paths]
    if len(paths) == 1 and glob.has_magic(str(paths[0])):
        found = sorted(Path(p) for p in glob.glob(str(paths[0]), recursive=True) if Path(p).is_file())
        if not found:
            raise ValueError(f"{origin}: {paths[0]} matches no file")
        return [SceneJob((p,)) for p in found]
    if len(paths) > 1 and any(glob.has_magic(str(p)) for p in paths):
        raise ValueError(f"{origin}: globs name single-raster scenes; list the rasters of {text!r} one scene a line")
    return [SceneJob(tuple(paths))]


def read_scene_list(path: str | Path) -> list[SceneJob]:
    """The scenes of a list file: one per line (``a.tif``, ``before.tif|after.tif`` or a glob); blank lines and
    lines starting with ``#`` skipped; relative paths relative to the file's folder."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise OSError(f"cannot read the scene list {path}: {err.strerror or err}") from err
    jobs = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            jobs += _scene_item(line, path.parent, f"{path}:{number}")
    return jobs


def collect_scenes(scenes: Sequence[str | Path], list_file: str | Path | None = None) -> list[SceneJob]:
    """The scenes of arguments (paths, ``a|b`` pairs, globs) and of an optional list file, in that order."""
    jobs = [job for item in scenes for job in _scene_item(str(item), None, "scene argument")]
    if list_file is not None:
        jobs += read_scene_list(list_file)
    if not jobs:
        raise ValueError("no scenes given: name rasters or globs, or a list file (--list)")
    return jobs


def check_scenes(jobs: Sequence[SceneJob], out_dir: Path, probabilities: bool, box_format: str) -> None:
    """Refuse, naming them, before any work: a scene listed twice, two scenes that would write an output of the same
    name (compared case-insensitively, as some file systems do), and an output that would replace one of the
    inputs. The names of both dense and detection outputs are compared: the model's task is not known yet."""
    first: dict[tuple[str, ...], int] = {}
    twice = []
    for i, job in enumerate(jobs):
        key = tuple(os.path.realpath(p) for p in job.images)
        if key in first:
            twice.append(f"{job.label()} (scenes {first[key] + 1} and {i + 1})")
        first.setdefault(key, i)
    if twice:
        raise ValueError(f"scenes listed more than once: {'; '.join(twice)}")
    writers: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        names = {
            p.name.casefold() for kind in (False, True) for p in job.outputs(out_dir, kind, probabilities, box_format)
        }
        for name in names:
            writers.setdefault(name, []).append(i)
    clashes = [
        f"{' and '.join(jobs[i].label() for i in who)} would both write {out_dir / jobs[who[0]].stem}.*"
        for who in writers.values()
        if len(who) > 1
    ]
    if clashes:
        raise ValueError(
            f"output names clash: {'; '.join(dict.fromkeys(clashes))} (rename a raster, or map them into different "
            "folders)"
        )
    inputs = {os.path.realpath(p): p for job in jobs for p in job.images}
    for job in jobs:
        for out in job.outputs(out_dir, False, probabilities, box_format) + job.outputs(
            out_dir, True, False, box_format
        ):
            if os.path.realpath(out) in inputs:
                raise ValueError(f"the output {out} would replace the input {inputs[os.path.realpath(out)]}")


def scene_pixels(job: SceneJob) -> int:
    """Height x width of the scene's first raster from its header (0 when it cannot be read: the scene will fail
    fast, wherever it goes)."""
    try:
        _, height, width = image_header(job.images[0])
    except (ValueError, OSError):
        return 0
    return height * width


def split_by_size(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``sizes`` in ``parts`` groups of about equal total size: largest first onto the least loaded group
    (ties: the lower index, the lower group), so the split depends on the list alone. Each group in list order."""
    loads = [0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        groups[part].append(i)
        loads[part] += sizes[i]
    return [sorted(group) for group in groups]


@dataclass
class World:
    """This process among those ``torchrun`` started (``size`` 1 without it); ``owned``: the process group was
    created here and is destroyed at the end."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        found = [None] * self.size
        dist.all_gather_object(found, value)
        return found

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def _device_for(name: str, local_rank: int, size: int) -> torch.device:
    """``auto`` and ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``, under torchrun (one process per GPU);
    other names are taken as given."""
    if size > 1 and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return resolve_device(f"cuda:{local_rank}")
    return resolve_device(name)


def join_world(device: str, timeout_hours: float = DEFAULT_TIMEOUT_HOURS) -> tuple[World, torch.device]:
    """This process's place among torchrun's (an existing default process group is used as it is) and its device.
    Backend: NCCL when the process has a CUDA device, else gloo."""
    if dist.is_available() and dist.is_initialized():
        world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return world, _device_for(device, world.local_rank, world.size)
    size, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    chosen = _device_for(device, local_rank, size)
    if size == 1:
        return World(), chosen
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # the object collectives of NCCL use the current device
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(hours=timeout_hours))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, owned=True), chosen


def _outputs_state(outputs: list[Path], job: SceneJob) -> str | None:
    """``None`` when every output is there and readable (a GeoTIFF on the scene's grid size, a JSON that parses),
    ``""`` when none is there, else why the set is not complete."""
    from rsvheat.data.io import open_raster

    present = [p for p in outputs if os.path.lexists(p)]
    if not present:
        return ""
    if len(present) < len(outputs):
        missing = ", ".join(p.name for p in outputs if p not in present)
        return f"{', '.join(p.name for p in present)} exist(s) but {missing} not (an earlier run with other options?)"
    height: int | None
    width: int | None
    try:
        _, height, width = image_header(job.images[0])
    except (ValueError, OSError):
        height = width = None  # the scene cannot be read now; outputs written from it before still count
    for path in outputs:
        try:
            if path.suffix.lower() == ".tif":
                with open_raster(path, "output") as src:
                    if height is not None and (src.height, src.width) != (height, width):
                        return f"{path.name} is {src.height}×{src.width}, the scene {height}×{width}"
                    # the header survives a truncation, the last block (written last) does not
                    src.read(window=((src.height - 1, src.height), (src.width - 1, src.width)))
            else:
                json.loads(path.read_text())
        except (ValueError, OSError) as err:  # rasterio's read errors are OSErrors
            return f"{path.name} cannot be read: {err}"
    return None


def _map_one(job: SceneJob, outputs: list[Path], run, overwrite: bool) -> dict:
    """Map one scene with ``run(images, outputs)`` unless its outputs are complete; never raises for the scene's own
    problems (those are the record's ``error``)."""
    record: dict[str, Any] = {"scene": job.label(), "outputs": [str(p) for p in outputs], "status": "ok", "error": None}
    record["warnings"] = []
    start = time.perf_counter()
    try:
        state = None if overwrite else _outputs_state(outputs, job)
        if state is None and not overwrite:
            record["status"] = "skipped"
        elif state:
            raise FileExistsError(f"{state}: pass --overwrite to map the scene again")
        else:
            # the warnings (no CRS, statistics far from the training data) belong to this scene's record
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    run(job.images, outputs)
                except FileExistsError:
                    # another run writing into the same folder mapped the scene meanwhile: complete is complete
                    if overwrite or _outputs_state(outputs, job) is not None:
                        raise
                    record["status"] = "skipped"
            record["warnings"] = list(dict.fromkeys(arguments.one_line(w.message) for w in caught))
            if record["status"] == "skipped":
                record["warnings"].append("mapped by another run meanwhile")
    except Exception as err:  # any scene's failure, corrupt file or model error, must not stop the others
        record.update(status="failed", error=f"{type(err).__name__}: {arguments.one_line(err)}")
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def predict_scenes(
    checkpoint: str | Path,
    scenes: Sequence[str | Path],
    out_dir: str | Path,
    list_file: str | Path | None = None,
    probabilities: bool = False,
    box_format: str = "geojson",
    bands: Sequence[Sequence[int] | None] | None = None,
    tile: int = 512,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    overwrite: bool = False,
    cog: bool = True,
    precision: str = "fp32",
    progress: bool = True,
    timeout_hours: float = DEFAULT_TIMEOUT_HOURS,
    score_threshold: float | None = None,
    compile: bool | str = False,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict:
    """Map every scene of ``scenes`` (paths, ``before|after`` pairs, globs) and ``list_file`` into ``out_dir`` with
    ``checkpoint``, spread over the processes of ``torchrun`` (or in this one), and return the summary written to
    ``out_dir/summary.json`` (on every process): ``{"counts": {ok, skipped, failed}, "scenes": [{scene, outputs,
    status, error, warnings, seconds, rank}, ...] (in list order), ...}``.

    Problems with the request itself (options, duplicate scenes, clashing output names, an unreadable checkpoint)
    raise before any scene is mapped, on every process; a scene's own failure is only recorded. ``overlap``: default
    ``tile // 4``; the other options as in :func:`~rsvheat.inference.tasks.predict_scene`, applied to every scene.
    ``progress``: a line per scene (with the rank when there are several processes) on stdout."""
    out_dir = Path(out_dir)
    overlap = tile // 4 if overlap is None else overlap
    check_precision(precision)
    check_tile(tile, "--tile")
    if not 0 <= overlap < tile or batch_size < 1:
        raise ValueError(f"need 0 <= overlap < tile and batch size >= 1, got {overlap}, {tile}, {batch_size}")
    if box_format not in ("geojson", "json"):
        raise ValueError(f"box format {box_format!r}: use geojson or json")
    started = time.perf_counter()
    world, torch_device = join_world(device, timeout_hours)
    try:
        plan: tuple[list[SceneJob], list[list[int]]] | ValueError | OSError | None = None
        if world.rank == 0:  # one process reads the list and the headers, so that all follow the same plan
            try:
                jobs = collect_scenes(scenes, list_file)
                check_scenes(jobs, out_dir, probabilities, box_format)
                plan = (jobs, split_by_size([scene_pixels(job) for job in jobs], world.size))
            except (ValueError, OSError) as err:
                plan = err  # sent to the others, so that every process stops with the same message
        plan = world.broadcast(plan)
        if isinstance(plan, Exception):
            raise plan
        jobs, groups = plan
        # the checkpoint, once per process; a process that cannot read it stops them all (none waits forever)
        try:
            task, meta, problem = *load_task(checkpoint, torch_device, normalisation), None
        except (ValueError, OSError) as err:
            task, meta, problem = None, None, arguments.one_line(err)
        problems = [p for p in world.gather(problem) if p]
        if problems:
            raise ValueError(problems[0])
        if task is None:  # a process that could not load it reported a problem
            raise RuntimeError(f"{checkpoint}: the model was not loaded")
        detection = task.spec.output == "boxes"
        if detection and probabilities:
            raise ValueError(f"{checkpoint} is a detection model: it writes boxes only, drop --probabilities")
        set_score_threshold(task, score_threshold, checkpoint)  # a request error: before any scene is mapped
        compile_in_place(task.model, compile, dynamic=False, frozen=True)  # once per process, for every scene

        def run(images, outputs):
            map_scene(
                task,
                meta,
                images,
                outputs[0],
                outputs[1] if len(outputs) > 1 else None,
                bands,
                tile,
                overlap,
                batch_size,
                torch_device,
                overwrite=overwrite,
                cog=cog,
                progress=progress and world.size == 1,  # bars of several processes would overwrite each other
                precision=precision,
                checkpoint=checkpoint,
                score_threshold=score_threshold,
            )

        mine = groups[world.rank]
        ranked: list[tuple[int, dict]] = []  # (the scene's index in the list, its record)
        prefix = f"[rank {world.rank}/{world.size}] " if world.size > 1 else ""
        for n, i in enumerate(mine, start=1):
            job = jobs[i]
            record = _map_one(job, job.outputs(out_dir, detection, probabilities, box_format), run, overwrite)
            ranked.append((i, {**record, "rank": world.rank}))
            if progress:
                what = f"failed: {record['error']}" if record["error"] else record["status"]
                print(f"{prefix}{n}/{len(mine)} {job.label()}: {what} ({record['seconds']:.1f} s)", flush=True)
                for warning in record["warnings"]:
                    print(f"{prefix}  warning: {warning}", flush=True)
        gathered = sorted((pair for part in world.gather(ranked) for pair in part), key=lambda pair: pair[0])
        records = [record for _, record in gathered]
        summary = _summary(checkpoint, out_dir, world.size, records, time.perf_counter() - started)
        if world.rank == 0:
            write_atomic(out_dir / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
            if progress:
                _report(summary, out_dir)
        return summary
    finally:
        world.close()


def _summary(checkpoint, out_dir: Path, processes: int, records: list[dict], seconds: float) -> dict:
    """The summary's content: the run (``seconds`` of wall time, ``scene_seconds`` summed over the scenes: their ratio
    is the speed-up the processes gave) and every scene's record in list order."""
    counts = {status: sum(r["status"] == status for r in records) for status in ("ok", "skipped", "failed")}
    return {
        "checkpoint": str(checkpoint),
        "out": str(out_dir),
        "processes": processes,
        "counts": counts,
        "seconds": round(seconds, 3),
        "scene_seconds": round(sum(r["seconds"] for r in records), 3),
        "scenes": records,
    }


def _report(summary: dict, out_dir: Path) -> None:
    counts = summary["counts"]
    total = sum(counts.values())
    print(
        f"{total} scene(s): {counts['ok']} mapped, {counts['skipped']} skipped (complete), {counts['failed']} "
        f"failed; summary: {out_dir / SUMMARY}",
        flush=True,
    )
    for record in summary["scenes"]:
        if record["status"] == "failed":
            print(f"  failed: {record['scene']}: {record['error']}", file=sys.stderr, flush=True)


HELP = "map many scenes with a fine-tuned checkpoint, over processes, GPUs and nodes (torchrun)"
EXAMPLES = (
    "  rsvheat predict-scenes --checkpoint runs/seg/checkpoints/best.ckpt 'archive/*.tif' -o maps\n"
    "  rsvheat predict-scenes --checkpoint runs/cd/checkpoints/best.ckpt 'before.tif|after.tif' -o change\n"
    "  # scenes.txt: one scene a line (before.tif|after.tif for pairs), # comments, paths relative to the file\n"
    "  torchrun --nproc-per-node 4 -m rsvheat.inference.batch --checkpoint best.ckpt --list scenes.txt -o maps\n"
    "  # several nodes: torchrun --nnodes 2 --node-rank N --rdzv-backend c10d --rdzv-endpoint HOST:29500 ...\n"
    "outputs: <out>/<scene stem>.tif (and .probabilities.tif), or .geojson / .boxes.json (detection), and\n"
    "<out>/summary.json; a re-run skips the scenes whose outputs are complete (--overwrite maps them again).\n"
    "exit status 1 when a scene failed (all others are mapped), 2 for a bad request."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``rsvheat predict-scenes`` on ``parser``; its handler is :func:`main`."""
    arguments.add_checkpoint(
        parser, "a `rsvheat fit` checkpoint (e.g. runs/.../checkpoints/best.ckpt)", positional_alias="scenes"
    )
    parser.add_argument(
        "scenes",
        nargs="*",
        help="rasters, globs (quoted: 'archive/**/*.tif'), or co-registered rasters of one scene as 'a.tif|b.tif'",
    )
    parser.add_argument(
        "--list",
        dest="list_file",
        type=Path,
        default=None,
        help="a text file of scenes, one a line (# comments; relative paths relative to the file)",
    )
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (created; shared by all nodes)")
    parser.add_argument(
        "--probabilities", action="store_true", help="also write per-class probabilities to <stem>.probabilities.tif"
    )
    parser.add_argument(
        "--boxes",
        choices=("geojson", "json"),
        default="geojson",
        help="detection: <stem>.geojson (lon/lat; needs a CRS) or <stem>.boxes.json (pixels, any scene)",
    )
    arguments.add_mapping(
        parser, "auto (CUDA when present; under torchrun each process's cuda:LOCAL_RANK), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument("--overwrite", action="store_true", help="map every scene again, replacing its outputs")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_HOURS,
        help=f"hours a finished process waits for the others (default {DEFAULT_TIMEOUT_HOURS:g})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines (the summary is still written)")
    return parser


def main(args: argparse.Namespace) -> None:
    """Handler of ``rsvheat predict-scenes``: exits with status 1 when a scene failed (after all others ran)."""
    arguments.resolve_checkpoint(args)
    summary = predict_scenes(
        args.checkpoint,
        args.scenes,
        args.out,
        list_file=args.list_file,
        probabilities=args.probabilities,
        box_format=args.boxes,
        bands=args.bands,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        cog=not args.no_cog,
        precision=args.precision,
        progress=not args.quiet,
        timeout_hours=args.timeout,
        score_threshold=args.score_threshold,
        compile=args.compile,
        normalisation=arguments.normalisation(args),
    )
    if summary["counts"]["failed"]:
        raise SystemExit(1)


def build_parser(prog: str = "rsvheat predict-scenes") -> argparse.ArgumentParser:
    """A stand-alone parser of the command (``python -m rsvheat.inference.batch``, the one torchrun starts)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=HELP,
        epilog="examples:\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_arguments(parser)


def run(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and run; a bad request ends with one line ``rsvheat predict-scenes: error: ...`` and status 2
    (``RSVHEAT_DEBUG=1``: the traceback), as the other commands do."""
    args = build_parser().parse_args(argv)
    arguments.guarded("predict-scenes", main, args)


if __name__ == "__main__":
    run()
