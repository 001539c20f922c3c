"""Progress on long work: tqdm bars with elapsed time and ETA on stderr.

Shown only when stderr is a terminal and the caller did not pass ``progress=False``: logs, pipes and CI stay free of
bar redraws, and code that runs these functions inside its own loop can turn them off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

__all__ = ["Steps", "bar", "shown", "step_header"]


def shown(progress: bool = True) -> bool:
    """Whether progress is displayed: ``progress`` and stderr is a terminal."""
    stream = sys.stderr
    try:
        return bool(progress) and stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str,
    progress: bool = True,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr (elapsed, rate, ETA), disabled unless :func:`shown`."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not shown(progress), dynamic_ncols=True, **kwargs)


class Steps:
    """Work made of a few named steps of unequal length, shown as one bar: ``export: 2/4 [00:31<00:40, trace]``.

    ``next(name)`` closes the running step and starts ``name``; ``close()`` (or leaving the ``with`` block) closes
    the last one. The ETA assumes steps of equal length: a rough figure, but the elapsed time and the current step's
    name are exact."""

    def __init__(self, total: int, desc: str, progress: bool = True) -> None:
        self.bar = bar(
            total=total,
            desc=desc,
            unit="step",
            progress=progress,
            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )
        self.running = False

    def next(self, name: str) -> None:
        if self.running:
            self.bar.update(1)
        self.running = True
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self.running:
            self.bar.update(1)
            self.running = False
        self.bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def step_header(index: int, total: int, name: str, started: float, prefix: str, progress: bool = True) -> None:
    """One line on stderr before a long step: ``[demo] step 3/6: fine-tuning (0:02:41 elapsed)``, when
    :func:`shown`. ``started``: the ``time.perf_counter()`` of the whole run's start."""
    if not shown(progress):
        return
    elapsed = int(time.perf_counter() - started)
    clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
    print(f"{prefix} step {index}/{total}: {name} ({clock} elapsed)", file=sys.stderr, flush=True)
