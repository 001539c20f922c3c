"""What every ``rsvheat`` command line shares: option types checked before anything runs, and the guard that turns a
user-fixable error into one line and exit status 2 (``RSVHEAT_DEBUG=1`` shows the traceback instead)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

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


def first_line(err: BaseException, empty: str | None = None) -> str:
    """The first line of an error's message (``empty``, by default its type's name, when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else empty or type(err).__name__


def one_line(err: BaseException) -> str:
    """An error's message on one line (its type's name when it has none)."""
    return " ".join(the_problem(str(err)).split()) or type(err).__name__


def the_problem(message: str) -> str:
    """jsonargparse wraps an error raised while building a class in a "Union subtypes" report (each subtype tried,
    the given Namespace dumped): the problem is the first listed error that is not the ``None`` alternative."""
    if "Union subtypes" not in message or "Errors:" not in message:
        return message
    errors = [line.strip()[2:] for line in message.split("Errors:", 1)[1].splitlines() if line.strip().startswith("- ")]
    errors = [e for e in errors if "NoneType" not in e]
    return errors[0] if errors else message


def guarded(command: str, run: Callable, *args) -> None:
    """Run ``run(*args)``; a user-fixable error (``ValueError``, ``OSError``) ends the process with one line
    ``rsvheat <command>: error: <message>`` and exit status 2, or with its traceback when ``RSVHEAT_DEBUG`` is set."""
    try:
        run(*args)
    except (ValueError, OSError) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"rsvheat {command}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
