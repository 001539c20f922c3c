"""Writing outputs so that nothing already written is lost and nothing planted is followed.

Every output is first written inside a *staging folder*: a private folder (mode 0700, unique name, created
exclusively by ``mkdtemp``) next to its target, so temporary names cannot be predicted and no link planted in the
target folder is ever written through. Files there are created by their writers (torch, GDAL, matplotlib) and so get
the user's umask. Complete files take their final names by ``os.replace`` in the same folder (atomic, and it replaces
a link rather than following it), all outputs of one run together, under a lock on the target folder so that two runs
writing the same outputs never mix: the last complete run wins, or, without ``overwrite``, the later one fails
cleanly. A staging folder is removed when its run ends; one left by a killed run (its lock released with the process)
is removed by the next write into that folder. Only folders this module created are ever removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

try:
    import fcntl as _fcntl

    fcntl: ModuleType | None = _fcntl
except ImportError:  # Windows: no advisory locks; staging still protects against partial and planted files
    fcntl = None

#: Name prefix/suffix of staging folders (hidden): ``.rsvheat-<random>.tmp``.
STAGING_PREFIX, STAGING_SUFFIX = ".rsvheat-", ".tmp"


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """The check every command that writes an output makes first: an existing ``path`` is an error unless
    ``overwrite``; a folder is never replaced by a file."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"{path} is a folder: name an output file (nothing was replaced)")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")


def refuse_inputs_as_outputs(outputs: Sequence[str | os.PathLike | None], inputs: Sequence[str | os.PathLike]) -> None:
    """An output that is one of the inputs (same file, through any link or relative path) is an error: replacing it
    would destroy the data being read."""
    existing = [Path(p) for p in inputs if Path(p).exists()]
    for out in outputs:
        if out is None or not Path(out).exists():
            continue
        for source in existing:
            if os.path.samefile(out, source):
                raise ValueError(f"the output {out} is the input {source}: choose another output name")


def check_output(
    path: str | os.PathLike, overwrite: bool, suffixes: Sequence[str] | None = None, what: str = ""
) -> Path:
    """:func:`refuse_existing` plus a check that ``path`` ends in one of ``suffixes`` (e.g. ``(".tif", ".tiff")``),
    since the format written is decided by the model, not by the name (``what``: that format, for the message)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: {what or 'this output'} must be named {' or '.join(suffixes)}")
    refuse_existing(path, overwrite)
    return path


def _lock(fd: int, blocking: bool = True) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))


def sweep_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that killed runs left in ``folder`` (those whose lock no live process holds).
    Returns what was removed. Links, files and folders of other names are never touched."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for candidate in folder.glob(f"{STAGING_PREFIX}*{STAGING_SUFFIX}"):
        try:
            fd = _open_dir(candidate)  # O_NOFOLLOW: a planted link named like a staging folder is skipped
        except OSError:
            continue
        try:
            if fcntl is not None and os.fstat(fd).st_uid == os.getuid() and _lock(fd, blocking=False):
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _staging_folder(folder: Path) -> Iterator[Path]:
    """A new private folder in ``folder``, locked while this context runs, removed (with all in it) at its end;
    ``folder`` is created if needed, and removed again if the run fails and it was created for nothing."""
    with created_folder(folder), _new_staging_folder(folder) as staging:
        yield staging


@contextlib.contextmanager
def _new_staging_folder(folder: Path) -> Iterator[Path]:
    sweep_staging(folder)
    while True:
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX, suffix=STAGING_SUFFIX))
        fd = _open_dir(staging)
        _lock(fd)
        # a concurrent sweep could have taken it between mkdtemp and the lock: then it is gone; make another
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(staging)):
                break
        os.close(fd)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


@contextlib.contextmanager
def _folder_locks(folders: Sequence[Path]) -> Iterator[None]:
    fds = []
    try:
        for folder in sorted(set(folders)):  # one order for every run: no deadlock between two
            fds.append(_open_dir(folder))
            _lock(fds[-1])
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing releases the lock


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (``os.umask`` sets while it reads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_outputs(targets: Sequence[str | os.PathLike], overwrite: bool = True) -> Iterator[list[Path]]:
    """Yield one temporary path per target (same name and suffix, in a private staging folder next to the target);
    write them all in the ``with`` block. When it ends without an error, they take the targets' names together: all
    or none (a failure restores the targets that were there). Without ``overwrite``, a target that appeared meanwhile
    (another run) is an error and nothing is replaced. Scratch files may be put next to the temporary paths; they are
    removed with the staging folder."""
    paths = [Path(t) for t in targets]
    if len({t.resolve() for t in paths}) != len(paths):
        raise ValueError(f"two outputs have the same name: {', '.join(map(str, paths))}")
    with contextlib.ExitStack() as stack:
        staging = {}
        for folder in dict.fromkeys(t.parent for t in paths):
            staging[folder] = stack.enter_context(_staging_folder(folder))
        temporaries = [staging[t.parent] / t.name for t in paths]
        yield temporaries
        missing = [str(t) for t in temporaries if not os.path.lexists(t)]
        if missing:
            raise RuntimeError(f"nothing was written to {', '.join(missing)}")
        mode = 0o666 & ~_umask()
        for tmp in temporaries:  # some writers (safetensors) create 0600 files: give the mode a plain open() gives
            if tmp.is_file() and not tmp.is_symlink():
                os.chmod(tmp, mode)
                _fsync(tmp)  # the data on disk before the name: a crash never leaves a complete-looking short file
        with _folder_locks(list(staging)):
            if not overwrite:
                for target in paths:
                    refuse_existing(target, overwrite=False)
            _replace_together(list(zip(temporaries, paths, strict=True)), staging)
        for folder in staging:
            _fsync(folder)  # the renames themselves


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = _open_dir(path) if path.is_dir() else os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_together(moves: list[tuple[Path, Path]], staging: dict[Path, Path]) -> None:
    """Rename each complete temporary file onto its target, all or none. Existing targets are first moved into the
    staging folder (removed with it on success); if any rename fails, the new files already in place are removed and
    the old ones put back."""
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for i, (_, target) in enumerate(moves):
            if target.is_dir() and not target.is_symlink():
                raise IsADirectoryError(errno.EISDIR, "a folder is never replaced by an output file", str(target))
            if os.path.lexists(target):
                old = staging[target.parent] / f"previous-{i}"
                os.replace(target, old)
                aside.append((old, target))
        for tmp, target in moves:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        for old, target in aside:
            # keep restoring the others if one fails
            with contextlib.suppress(OSError):
                os.replace(old, target)
        raise


def write_bytes_to(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` with Python's file I/O, whose failures (a full disk) are ``OSError`` s naming the file: C++
    writers (torch's zip writer, safetensors) abort the process or raise their own types there instead."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as err:
        raise OSError(err.errno, f"could not write {path} (the disk may be full): {err.strerror}") from err


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = True) -> Path:
    """Call ``write(temporary_path)`` (a private path with ``path``'s name), then rename it onto ``path`` (see
    :func:`staged_outputs`). A write that fails (full disk, kill) leaves ``path`` as it was."""
    path = Path(path)
    with staged_outputs([path], overwrite=overwrite) as (tmp,):
        write(tmp)
    return path


def write_json_atomic(data: object, path: str | os.PathLike) -> Path:
    """``data`` as indented JSON at ``path``, all or nothing."""
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


@contextlib.contextmanager
def created_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create ``path`` (and parents) for a command's outputs; if the command fails and the folders it created are
    still empty, remove them again (only those: a folder that existed or holds anything stays)."""
    path = Path(path)
    new = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        new.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in new:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # fails, and keeps it, when not empty
        raise


def claim_folder(folder: str | os.PathLike, command: str, owned: Sequence[str], overwrite: bool) -> Path:
    """Make ``folder`` the output folder of ``command`` (e.g. ``demo``): a non-empty folder without the command's
    marker file (``.rsvheat-<command>``, left by an earlier run) is refused unless ``overwrite``; then the folder is
    marked and the subfolders ``owned`` of an earlier run are removed, so a re-run starts clean. Nothing else in the
    folder is touched, and a link planted under an owned name is removed, never followed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    marker = folder / f".rsvheat-{command}"
    names = ", ".join(f"{name}/" for name in owned)
    if folder.is_dir() and not marker.is_file() and not overwrite and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} is not empty and was not written by `rsvheat {command}` (no {marker.name} file): choose another "
            f"folder, or pass --overwrite to let it replace its {names} there"
        )
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"Written by `rsvheat {command}`: a re-run into this folder replaces {names}.\n")
    for name in owned:
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    return folder
