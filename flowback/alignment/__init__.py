"""Representation alignment (REPA) for flows: frozen encoders, projector and loss, and the gradient strategies."""

from .encoder import EncoderConfig, FrozenEncoder, load_encoder, save_encoder
from .loss import (POSITION_REDUCE, TARGET_GRIDS, Projector, alignment_loss, combine_positions, encoder_input_size,
                   flow_tokens, match_grid, position_loss, target_tokens)
from .positions import PositionError, format_position, parse_position, position_label
from .reverse import (REVERSE_GRADS, exact_reverse_features, naive_reverse_features, newest_reverse_features,
                      pseudo_reverse_features)
from .strategies import AlignSpec, alignment_features

__all__ = ["AlignSpec", "EncoderConfig", "FrozenEncoder", "POSITION_REDUCE", "PositionError", "Projector",
           "REVERSE_GRADS", "TARGET_GRIDS", "alignment_features", "alignment_loss", "combine_positions",
           "encoder_input_size", "exact_reverse_features", "flow_tokens", "format_position", "load_encoder",
           "match_grid", "naive_reverse_features", "newest_reverse_features", "parse_position", "position_label",
           "position_loss", "pseudo_reverse_features", "save_encoder", "target_tokens"]
