"""TARFlow / STARFlow normalizing flows: the model, its guidance rules and its samplers."""

from .guidance import Guidance
from .sampling import denoise, reverse, sample
from .tarflow import FlowBlock, FlowConfig, FlowOutput, TARFlow, bits_per_dim, log_prob_from

__all__ = ["FlowBlock", "FlowConfig", "FlowOutput", "Guidance", "TARFlow", "bits_per_dim", "denoise",
           "log_prob_from", "reverse", "sample"]
