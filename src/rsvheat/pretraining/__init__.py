"""Self-supervised pre-training: frequency-domain hierarchical masking (more to come: issue B)."""

from rsvheat.pretraining.masking import FrequencyMasking, FrequencySplit, normalised_radius

__all__ = ["FrequencyMasking", "FrequencySplit", "normalised_radius"]
