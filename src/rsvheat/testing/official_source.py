"""Importing the user's copy of an official source file (vHeat's ``classification/models/vHeat.py``, RS-vHeat's
``RS_vHeat.py``) by path: nothing of the official code is shipped with rsvheat. Used by
``scripts/check_against_official.py`` and by ``rsvheat bench --official-source``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_official(path: str | Path, name: str = "official_vheat") -> ModuleType:
    """The module of the Python file ``path``, imported as ``name`` (registered in ``sys.modules``, which the file's
    dataclasses and pickling need).

    A missing file is a ``FileNotFoundError``; a module the file imports but this environment lacks (the official
    files import ``einops`` and ``timm``) is a ``ValueError`` that names it, and nothing stays registered."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official source {path} not found (give the path of the official .py file)")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        del sys.modules[name]
        raise ValueError(
            f"{path} imports the module {err.name!r}, which is not installed in this environment "
            f"(install it, e.g. pip install {(err.name or '').split('.')[0]})"
        ) from err
    except BaseException:
        del sys.modules[name]
        raise
    return module
