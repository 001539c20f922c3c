"""Inference on images larger than a training crop: sliding windows with blended overlaps."""

from rsvheat.inference.sliding import blend_weights, sliding_window, tile_starts

__all__ = ["blend_weights", "sliding_window", "tile_starts"]
