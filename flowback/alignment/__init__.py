"""Representation alignment (REPA) for flows: frozen encoders, projector and loss, and the gradient strategies."""

from .encoder import EncoderConfig, FrozenEncoder, load_encoder, save_encoder
from .loss import Projector, alignment_loss, match_grid
from .strategies import AlignSpec, alignment_features, naive_reverse_features, pseudo_reverse_features

__all__ = ["AlignSpec", "EncoderConfig", "FrozenEncoder", "Projector", "alignment_features", "alignment_loss",
           "load_encoder", "match_grid", "naive_reverse_features", "pseudo_reverse_features", "save_encoder"]
