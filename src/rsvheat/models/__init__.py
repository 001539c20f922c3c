"""Models: the RS-vHeat / vHeat backbone (registered with timm on import), checkpoints, counting."""

from rsvheat.models.checkpoint import CheckpointError, adapt_stem_weight, load_checkpoint, save_weights
from rsvheat.models.hub import save_pretrained
from rsvheat.models.rsvheat import VARIANTS, RSVHeat, create_model, create_model_from_weights
from rsvheat.models.weights import NAMED_WEIGHTS, load_weights

__all__ = [
    "NAMED_WEIGHTS",
    "VARIANTS",
    "CheckpointError",
    "RSVHeat",
    "adapt_stem_weight",
    "create_model",
    "create_model_from_weights",
    "load_checkpoint",
    "load_weights",
    "save_pretrained",
    "save_weights",
]
