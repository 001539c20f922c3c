"""Whole-scene inference (:mod:`~rsvheat.inference.scene`) and fine-tuned task checkpoints applied to scenes
(:mod:`~rsvheat.inference.tasks`). The sliding windows live in :mod:`rsvheat.models.sliding` (the trainers use them
too) and are re-exported here."""

from rsvheat.models.sliding import blend_weights, sliding_window, tile_starts

__all__ = ["blend_weights", "sliding_window", "tile_starts"]
