"""Writing files atomically: the content goes to a hidden temporary file next to the target, which is renamed onto it
only when complete, so a crash, a kill or a full disk never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """The check every command that writes an output makes first: an existing ``path`` is an error unless
    ``overwrite``."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` (same folder and suffix as ``path``), then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def replace_together(moves: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Rename each complete temporary file onto its target (``[(temporary, target), ...]``), all or none.

    Outputs that belong together (a class map and its probabilities) must never mix runs: the existing targets are
    first moved aside, and if any rename fails, the new files already in place are removed and the old ones restored.
    On success the old ones are deleted.
    """
    moves = [(Path(tmp), Path(target)) for tmp, target in moves]
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for _, target in moves:
            if os.path.lexists(target):
                old = target.with_name(f".{target.name}.{os.getpid()}.old")
                os.replace(target, old)
                aside.append((old, target))
        for tmp, target in moves:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        for old, target in aside:
            # keep restoring the others if one fails: that one stays under its hidden name, not lost
            with contextlib.suppress(OSError):
                os.replace(old, target)
        raise
    for old, _ in aside:
        old.unlink(missing_ok=True)
