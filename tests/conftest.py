import pytest
import torch

import rsvheat  # noqa: F401  (registers the timm models)
from rsvheat.models.rsvheat import RSVHeat


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def micro_model(**kwargs) -> RSVHeat:
    """A 4-stage RS-vHeat small enough for unit tests (same code paths as the real variants)."""
    cfg = dict(
        depths=(1, 1, 2, 1),
        dims=(16, 32, 64, 128),
        img_size=64,
        num_classes=5,
        post_norm=True,
        layer_scale=1e-5,
        use_sce=True,
        drop_path_rate=0.0,
    )
    cfg.update(kwargs)
    return RSVHeat(**cfg)


@pytest.fixture
def micro():
    return micro_model
