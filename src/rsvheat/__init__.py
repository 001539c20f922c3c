"""rsvheat: RS-vHeat, a heat-conduction remote-sensing foundation model, for PyTorch, timm, SMP and TorchGeo.

Importing the package registers ``rsvheat_{tiny,small,base}`` and ``vheat_{tiny,small,base}`` with timm.
"""

from rsvheat.models import (
    VARIANTS,
    CheckpointError,
    RSVHeat,
    adapt_stem_weight,
    create_model_from_weights,
    load_checkpoint,
    save_weights,
)


def create_model(name: str, **kwargs) -> RSVHeat:
    """``timm.create_model`` restricted to our variants.

    Example: ``create_model("rsvheat_base", modalities={"optical": 3, "sar": 1})``.
    """
    import timm

    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(VARIANTS)}")
    return timm.create_model(name, **kwargs)


__version__ = "0.1.0"
__all__ = [
    "VARIANTS",
    "CheckpointError",
    "RSVHeat",
    "adapt_stem_weight",
    "create_model",
    "create_model_from_weights",
    "load_checkpoint",
    "save_weights",
]
