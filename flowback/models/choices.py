"""The samplers' named choices, defined once: the params schema and the code that implements them both import these
(this module imports nothing, so the schema stays cheap to load)."""

SOLVERS = ("sequential", "jacobi", "gs_jacobi")  # how a block is inverted (jacobi.py)
JACOBI_INITS = ("noise", "zeros")  # the first Jacobi iterate (jacobi.py)
POS_EMBEDS = ("learned", "sincos", "rope")  # added embeddings, or rotary positions in attention (tarflow.py)
COND_BLOCKS = ("all", "deep")  # which blocks see the class (deep: only block N, STARFlow)
SCALES = ("exp", "softplus")  # the affine scale's parametrisation
MLPS = ("gelu", "swiglu", "geglu")  # the feed-forward (transformer.py)
SEQ_ORDERS = ("R2L", "L2R")  # which blocks reverse the token order
ROPE_LAYOUTS = ("2d", "3d")  # 3d: ml-starflow's, with pairs held for the class/text axis
ROPE_ORDERS = ("spatial", "sequence")  # rotary angles by spatial token or by processing position
NULL_CLASSES = ("mean", "learned")  # the unconditional embedding
