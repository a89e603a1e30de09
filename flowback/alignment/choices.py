"""The alignment's named choices, defined once: the params schema and the code that implements them both import these
(this module imports nothing, so the schema stays cheap to load)."""

STRATEGIES = ("forward", "detach", "reverse")  # where alignment gradients flow (strategies.py)
REVERSE_GRADS = ("paper", "exact", "newest")  # the reverse strategy's gradient graph (reverse.py)
TARGET_GRIDS = ("upsample", "pool", "dino448")  # how encoder patches meet flow tokens (loss.py)
POSITION_REDUCE = ("mean", "sum")  # the alignment term over several positions (loss.py)
ENCODER_OBJECTIVES = ("supervised", "simclr")  # how the default profile's encoder is trained (pretrain.py)
