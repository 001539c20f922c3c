"""What every ``rsvheat`` command line shares: option types checked before anything runs, and the guard that turns a
user-fixable error into one line and exit status 2 (``RSVHEAT_DEBUG=1`` shows the traceback instead)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from rsvheat import STRIDE

DEBUG_ENV = "RSVHEAT_DEBUG"


def bands(text: str) -> list[int]:
    """An argparse ``type``: 1-based band numbers separated by commas (``3,2,1``)."""
    try:
        numbers = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bands are 1-based integers separated by commas, got {text!r}") from None
    if min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"bands are 1-based (the first band is 1), got {text!r}")
    return numbers


def at_least(low: int | float, kind: type = int) -> Callable[[str], int | float]:
    """An argparse ``type``: a number of ``kind`` that is at least ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not value >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def probability(text: str) -> float:
    """An argparse ``type``: a number in [0, 1]."""
    value = at_least(0.0, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text}")
    return value


def add_score_threshold(parser: argparse.ArgumentParser) -> None:
    """``--score-threshold`` of the commands that map scenes with a detector."""
    parser.add_argument(
        "--score-threshold",
        type=probability,
        default=None,
        help="detection: keep boxes scoring at least this (default: the model's own, 0.05 unless trained otherwise)",
    )


def add_checkpoint(
    parser: argparse.ArgumentParser, help: str, required: bool = True, positional_alias: str | None = None
) -> None:
    """``--checkpoint``, the trained model of every command that reads one (the Lightning commands keep Lightning's
    ``--ckpt_path``: there ``--checkpoint.*`` configures the checkpoint callback). ``positional_alias``: the command
    used to take the checkpoint as its first positional argument, before the positional argument of this name; that
    spelling still works (hidden from --help), resolved by :func:`resolve_checkpoint`."""
    parser.add_argument("--checkpoint", type=Path, default=None, help=f"{help} (required)" if required else help)
    if positional_alias:
        parser.add_argument("legacy_checkpoint", nargs="?", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(checkpoint_required=required, checkpoint_parser=parser, checkpoint_rest=positional_alias)


def resolve_checkpoint(args: argparse.Namespace) -> None:
    """``--checkpoint`` or the old first positional. Given ``--checkpoint``, a first positional belongs to the
    positional argument that follows it (a list, or a single value not given yet), which argparse cannot tell apart."""
    legacy = getattr(args, "legacy_checkpoint", None)
    if legacy is not None:
        rest = args.checkpoint_rest
        following = getattr(args, rest) if rest is not None else None
        if args.checkpoint is None:
            args.checkpoint = Path(legacy)
        elif rest is not None and isinstance(following, list):  # in the list's own type (paths, or patterns)
            setattr(args, rest, [type(following[0])(legacy) if following else legacy, *following])
        elif rest is not None and following is None:
            setattr(args, rest, Path(legacy))
        else:
            args.checkpoint_parser.error("give the checkpoint once, as --checkpoint")
    if args.checkpoint_required and args.checkpoint is None:
        args.checkpoint_parser.error("the following arguments are required: --checkpoint")


def add_mapping(parser: argparse.ArgumentParser, device_help: str) -> None:
    """The options of the commands that map whole scenes tile by tile (predict-scene, predict-scenes)."""
    parser.add_argument(
        "--bands", type=bands, nargs="+", default=None, help="1-based bands per raster of a scene, e.g. 3,2,1"
    )
    parser.add_argument("--tile", type=at_least(STRIDE), default=512, help="tile size in pixels (default 512)")
    parser.add_argument("--overlap", type=at_least(0), default=None, help="overlap between tiles (default tile / 4)")
    parser.add_argument("--batch-size", type=at_least(1), default=4, help="tiles per forward pass (default 4)")
    parser.add_argument("--device", default="auto", help=device_help)
    add_precision(parser)
    add_score_threshold(parser)
    parser.add_argument("--no-cog", action="store_true", help="plain tiled GeoTIFF instead of Cloud Optimized")
    for name in ("mean", "std"):
        parser.add_argument(
            f"--{name}",
            type=float,
            nargs="+",
            default=None,
            help=f"input {name} per band, or one for all (required for a TorchGeo checkpoint, which stores none)",
        )
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="BACKEND",
        help="run the network through torch.compile (default backend inductor, weights frozen into the graph), "
        "compiled on the first tiles",
    )


def add_precision(parser: argparse.ArgumentParser) -> None:
    # the choices are spelled here: importing torch (through rsvheat.models) would slow every `rsvheat --help`
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default) or bf16: bfloat16 autocast, spectral transforms kept in float32",
    )


#: The suffix of the probability map written beside a class or change map (``--probabilities`` without a path).
PROBABILITIES = ".probabilities.tif"


def normalisation(args: argparse.Namespace) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` of :func:`add_mapping`'s ``--mean``/``--std`` (both or neither), or ``None``."""
    if (args.mean is None) != (args.std is None):
        raise ValueError("give --mean and --std together")
    return None if args.mean is None else (args.mean, args.std)


def probabilities_beside(output: Path) -> Path:
    """Where ``--probabilities`` without a path writes: ``<map stem>.probabilities.tif`` beside the map."""
    return output.with_name(output.stem + PROBABILITIES)


def first_line(err: BaseException, empty: str | None = None) -> str:
    """The first line of an error's message (``empty``, by default its type's name, when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else empty or type(err).__name__


def one_line(err: BaseException | str) -> str:
    """An error's (or a warning's) message on one line (its type's name when it has none)."""
    return " ".join(the_problem(str(err)).split()) or type(err).__name__


def the_problem(message: str) -> str:
    """jsonargparse reports a wrong value of a class-typed option (a typo in ``model.init_args``, an error raised
    while building the class) as a "Union subtypes" report: each subtype tried, the given values dumped. The problem is
    the first listed error that is not the ``None`` alternative (with its indented detail), after the option's key."""
    if "Union subtypes" not in message or "Errors:" not in message:
        return message
    key = re.match(r'\s*Parser key "([^"]+)":', message)
    errors: list[str] = []
    for line in message.split("Errors:", 1)[1].splitlines():
        text = line.strip()
        if text.startswith("Given value"):
            break
        if text.startswith("- "):
            errors.append(text[2:])
        elif text and errors:
            errors[-1] += " " + text
    errors = [e for e in errors if "NoneType" not in e]
    if not errors:
        return message
    return (f"{key.group(1)}: " if key else "") + errors[0]


#: The optional packages, by the pyproject.toml extra that installs them (``pip install "rsvheat[train]"``); the core
#: (the backbone with timm and safetensors) needs none of them.
EXTRA_OF = {
    **dict.fromkeys(
        ("lightning", "jsonargparse", "torchmetrics", "segmentation_models_pytorch", "matplotlib", "psutil"),
        "train",
    ),
    "rasterio": "geo",
    "pycocotools": "detection",
    **dict.fromkeys(("onnx", "onnxruntime", "onnxscript"), "export"),
    **dict.fromkeys(("torchgeo", "terratorch"), "integrations"),
}


def missing_extra(err: ImportError) -> str | None:
    """What to install when ``err`` is an optional package's absence, else ``None``."""
    package = (err.name or "").split(".")[0]
    if not isinstance(err, ModuleNotFoundError) or package not in EXTRA_OF:
        return None
    return f"this needs {package}, from the extra '{EXTRA_OF[package]}': pip install \"rsvheat[{EXTRA_OF[package]}]\""


def guarded(command: str, run: Callable, *args) -> None:
    """Run ``run(*args)``; a user-fixable error (``ValueError``, ``OSError``, an optional package not installed) ends
    the process with one line ``rsvheat <command>: error: <message>`` and exit status 2, or with its traceback when
    ``RSVHEAT_DEBUG`` is set."""
    try:
        run(*args)
    except (ValueError, OSError, ModuleNotFoundError) as err:
        message = missing_extra(err) if isinstance(err, ModuleNotFoundError) else one_line(err)
        if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"rsvheat {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
