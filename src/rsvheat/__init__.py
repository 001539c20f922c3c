"""rsvheat: RS-vHeat, a heat-conduction remote-sensing foundation model, for PyTorch, timm, SMP and TorchGeo.

Importing the package registers ``rsvheat_{tiny,small,base}`` and ``vheat_{tiny,small,base}`` with timm: at once
when timm is already imported, otherwise the moment timm is (so ``import rsvheat`` alone stays cheap: the command
line starts without loading torch). The names below are loaded on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

#: The backbone's total downsampling (four stages at strides 4, 8, 16, 32): its output stride and the smallest image
#: side it takes. Here, where the command line reads it without loading torch.
STRIDE = 32

#: Public name -> the module that defines it (imported on first access).
_EXPORTS = {
    "VARIANTS": "rsvheat.models",
    "CheckpointError": "rsvheat.models",
    "RSVHeat": "rsvheat.models",
    "adapt_stem_weight": "rsvheat.models",
    "create_model": "rsvheat.models",
    "create_model_from_weights": "rsvheat.models",
    "load_checkpoint": "rsvheat.models",
    "load_weights": "rsvheat.models",
    "save_pretrained": "rsvheat.models",
    "save_weights": "rsvheat.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rsvheat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers our models with timm right after timm itself is imported, wherever that import happens (timm,
    segmentation-models-pytorch, TorchGeo): timm keeps no plugin list to read them from."""

    def find_spec(self, name, path, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # find timm's real spec without coming back here
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module) -> None:
            run_timm(module)
            importlib.import_module("rsvheat.models")  # its @register_model decorators run against the loaded timm

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("rsvheat.models")
elif not any(isinstance(finder, _RegisterWithTimm) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())
