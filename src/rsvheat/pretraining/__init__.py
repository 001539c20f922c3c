"""Self-supervised pre-training: frequency-domain hierarchical masking and multi-domain reconstruction."""

from rsvheat.pretraining.masking import FrequencyMasking, FrequencySplit, normalised_radius
from rsvheat.pretraining.model import FrequencyPretrainer, PretrainOutput

__all__ = ["FrequencyMasking", "FrequencyPretrainer", "FrequencySplit", "PretrainOutput", "normalised_radius"]
