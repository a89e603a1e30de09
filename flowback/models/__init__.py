"""TARFlow / STARFlow normalizing flows: the model, its guidance rules and its samplers (sequential and Jacobi)."""

from .guidance import Guidance
from .jacobi import BlockMetrics, JacobiFallbackWarning, Solver, block_metrics, gs_plan, jacobi_block
from .sampling import NonFiniteSampleError, SampleStats, denoise, reverse, sample
from .tarflow import FlowBlock, FlowConfig, FlowOutput, TARFlow, bits_per_dim, latent_norm_penalty, log_prob_from

__all__ = ["BlockMetrics", "FlowBlock", "FlowConfig", "FlowOutput", "Guidance", "JacobiFallbackWarning",
           "NonFiniteSampleError", "SampleStats", "Solver", "TARFlow", "bits_per_dim", "block_metrics", "denoise",
           "gs_plan", "jacobi_block", "latent_norm_penalty", "log_prob_from", "reverse", "sample"]
