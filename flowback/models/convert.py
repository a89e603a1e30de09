"""apple/ml-tarflow and apple/ml-starflow checkpoints in FlowBack's layout, so their models sample, score and probe
through the same stages as ours.

Both references save a plain state_dict (a block per flow step, forward order, as here). What differs:
- names: attn_blocks.l.attention / .mlp.main.0 / .mlp.main.2 are layers.l.attn / .mlp.fc1 / .mlp.fc2;
- ml-tarflow: class_embed is (K, 1, W), the prior variance `var` must be ones (its nvp mode; nvp 0 is not a flow
  FlowBack has);
- ml-starflow: tokens are patchified (p1 p2 c), FlowBack's and ml-tarflow's are (c p1 p2), so proj_in's columns,
  proj_out's rows and the start token are permuted; RoPE turns adjacent dimension pairs (2k, 2k+1), FlowBack's
  turns (k, k + d/2), so each head's query and key rows are permuted (q . k is unchanged); the label embedder is a
  one-hot of K + 1 entries (the last one the null class) through proj_txt, so class k's token is
  proj_txt.weight[:, k] + proj_txt.bias; its final RMSNorm scales by 1 + w where nn.RMSNorm scales by w; its gated
  MLP (gate_proj, up_proj) becomes one fc1 of [gate; up].
What the weights cannot show (seq_order, scale, soft_clip, head_dim) must be right in the params; what they show
(depths, widths, start token, final norm, conditioning, RoPE vs learned positions, the MLP) is checked, and the
first key or shape that does not fit is a one-line WeightMappingError.
"""

from __future__ import annotations

import torch

from ..errors import FlowBackError
from .tarflow import STARFLOW_DEFAULTS, FlowConfig, TARFlow

KINDS = ("ml-tarflow", "ml-starflow")
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class WeightMappingError(FlowBackError):
    """A reference checkpoint does not fit the params' model; the message names the first key that does not."""


class _Source:
    """A reference state dict read key by key with shape checks; remembers which keys were used."""

    def __init__(self, kind: str, state: dict):
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightMappingError(f"{kind} checkpoint: expected a state_dict of tensors")
        self.kind, self.used = kind, set()
        self.state = {}
        for k, v in state.items():
            for p in PREFIXES:
                k = k.removeprefix(p)
            self.state[k] = v

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.state:
            raise WeightMappingError(f"{self.kind} checkpoint has no {key} {tuple(shape)}, which the params' model "
                                     f"needs")
        t = self.state[key]
        if tuple(t.shape) != tuple(shape):
            raise WeightMappingError(f"{self.kind} checkpoint: {key} is {tuple(t.shape)}, the params' model needs "
                                     f"{tuple(shape)}")
        self.used.add(key)
        return t.float()

    def check_all_used(self, ignored) -> None:
        for key, t in self.state.items():
            if key not in self.used and not ignored(key):
                raise WeightMappingError(f"{self.kind} checkpoint: {key} {tuple(t.shape)} has no place in the params' "
                                         f"model")


def _require(kind: str, cfg: FlowConfig, **needed) -> None:
    for name, value in needed.items():
        if getattr(cfg, name) != value:
            raise WeightMappingError(f"{kind} checkpoints need model.{name}: {value} in the params (they have "
                                     f"{getattr(cfg, name)!r})")


def _shape(n: str, rows: int, cols: int) -> tuple[int, ...]:
    """A Linear's weight (rows, cols) or bias (rows,)."""
    return (rows, cols) if n == "weight" else (rows,)


def _layer(src: _Source, ref: str, fb: str, cfg: FlowConfig, out: dict, gated: str | None,
           qk_rows: torch.Tensor | None) -> None:
    """One transformer layer: attention (with qk_rows: the query/key rows in FlowBack's RoPE pair order) and MLP."""
    W, hidden = cfg.width, cfg.width * cfg.mlp_ratio
    for n in ("weight", "bias"):
        out[f"{fb}.attn.norm.{n}"] = src.take(f"{ref}.attention.norm.{n}", (W,))
        qkv = src.take(f"{ref}.attention.qkv.{n}", _shape(n, 3 * W, W))
        out[f"{fb}.attn.qkv.{n}"] = qkv if qk_rows is None else qkv[qk_rows]
        out[f"{fb}.attn.proj.{n}"] = src.take(f"{ref}.attention.proj.{n}", _shape(n, W, W))
        out[f"{fb}.mlp.norm.{n}"] = src.take(f"{ref}.mlp.norm.{n}", (W,))
        if gated is None:
            out[f"{fb}.mlp.fc1.{n}"] = src.take(f"{ref}.mlp.main.0.{n}", _shape(n, hidden, W))
            out[f"{fb}.mlp.fc2.{n}"] = src.take(f"{ref}.mlp.main.2.{n}", _shape(n, W, hidden))
        else:
            out[f"{fb}.mlp.fc1.{n}"] = torch.cat([src.take(f"{ref}.mlp.gate_proj.{n}", _shape(n, hidden, W)),
                                                  src.take(f"{ref}.mlp.up_proj.{n}", _shape(n, hidden, W))])
            out[f"{fb}.mlp.fc2.{n}"] = src.take(f"{ref}.mlp.down_proj.{n}", _shape(n, W, hidden))


# ---------------------------------------------------------------------------------------------------- ml-tarflow
def from_ml_tarflow(state: dict, cfg: FlowConfig) -> dict[str, torch.Tensor]:
    """FlowBack state_dict of an ml-tarflow transformer_flow.Model state_dict (cfg: the params' model)."""
    kind = "ml-tarflow"
    _require(kind, cfg, pos_embed="learned", cond_blocks="all", **STARFLOW_DEFAULTS)
    src = _Source(kind, state)
    T, D, W, K = cfg.num_tokens, cfg.token_dim, cfg.width, cfg.num_classes
    out = {}
    for t, depth in enumerate(cfg.layers):
        ref, fb = f"blocks.{t}", f"blocks.{t}"
        out[f"{fb}.pos"] = src.take(f"{ref}.pos_embed", (T, W))
        if K:
            out[f"{fb}.class_embed"] = src.take(f"{ref}.class_embed", (K, 1, W)).reshape(K, W)
        out[f"{fb}.proj_in.weight"] = src.take(f"{ref}.proj_in.weight", (W, D))
        out[f"{fb}.proj_in.bias"] = src.take(f"{ref}.proj_in.bias", (W,))
        for l in range(depth):
            _layer(src, f"{ref}.attn_blocks.{l}", f"{fb}.layers.{l}", cfg, out, None, None)
        out[f"{fb}.proj_out.weight"] = src.take(f"{ref}.proj_out.weight", (2 * D, W))
        out[f"{fb}.proj_out.bias"] = src.take(f"{ref}.proj_out.bias", (2 * D,))
    if src.has("var"):
        var = src.take("var", (T, D))
        if not torch.equal(var, torch.ones_like(var)):
            raise WeightMappingError(f"{kind} checkpoint: var is not all ones (a volume-preserving, nvp 0, model's "
                                     f"learned prior, which FlowBack does not have)")
    src.check_all_used(lambda k: k.endswith(".attn_mask"))
    return out


# --------------------------------------------------------------------------------------------------- ml-starflow
def token_feature_order(channels: int, patch: int) -> torch.Tensor:
    """Index into an ml-starflow token (p1 p2 c) of each FlowBack token feature (c p1 p2)."""
    c, i, j = torch.meshgrid(torch.arange(channels), torch.arange(patch), torch.arange(patch), indexing="ij")
    return ((i * patch + j) * channels + c).reshape(-1)


def rope_pair_order(head_dim: int) -> torch.Tensor:
    """Index into an ml-starflow head (pairs (2k, 2k+1)) of each FlowBack head dimension (pairs (k, k + d/2))."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def qk_row_order(width: int, head_dim: int) -> torch.Tensor:
    """Rows of an ml-starflow qkv projection in FlowBack's order: each head's query and key rows re-paired."""
    pairs = rope_pair_order(head_dim)
    heads = torch.cat([h * head_dim + pairs for h in range(width // head_dim)])
    return torch.cat([heads, width + heads, torch.arange(2 * width, 3 * width)])


def _text_tokens(src: _Source, cfg: FlowConfig) -> int | None:
    """How many condition tokens the reference attends to (from its attention-mask buffer), None if not saved."""
    key = "blocks.0.attn_mask"
    if not src.has(key):
        return None
    return src.state[key].shape[0] - cfg.num_tokens


def from_ml_starflow(state: dict, cfg: FlowConfig, gradients: bool = False) -> dict[str, torch.Tensor]:
    """FlowBack state_dict of an ml-starflow transformer_flow.Model state_dict (image model, class labels through
    its one-hot label embedder or none; cfg: the params' model). gradients=True maps the reference's parameter
    gradients instead: the same map without its constant parts (proj_txt's bias, the RMSNorm's 1 +)."""
    kind = "ml-starflow"
    src = _Source(kind, state)
    T, D, W, K = cfg.num_tokens, cfg.token_dim, cfg.width, cfg.num_classes
    if cfg.pos_embed == "sincos":
        raise WeightMappingError(f"{kind} has learned or rotary positions; the params' model has pos_embed sincos")
    rope = cfg.pos_embed == "rope"
    if rope:
        _require(kind, cfg, rope_order="sequence")
        texts = _text_tokens(src, cfg)
        if texts is not None and texts > 1:
            raise WeightMappingError(f"{kind} checkpoint conditions on {texts} text tokens; FlowBack's class token is "
                                     f"one")
        if texts is not None:
            _require(kind, cfg, rope_layout="3d" if texts else "2d")
    if cfg.mlp == "swiglu":
        raise WeightMappingError(f"{kind}'s gated MLP (use_swiglu) gates with tanh-GELU: set model.mlp: geglu")
    gated = "geglu" if cfg.mlp == "geglu" else None
    feat = token_feature_order(cfg.channels, cfg.patch_size)
    out_rows = torch.cat([feat, D + feat])
    qk_rows = qk_row_order(W, cfg.head_dim) if rope else None
    n, out = len(cfg.layers), {}
    for t, depth in enumerate(cfg.layers):
        ref, fb = f"blocks.{t}", f"blocks.{t}"
        if not rope:
            out[f"{fb}.pos"] = src.take(f"{ref}.pos_embed", (T, W))
        conditioned = K and (cfg.cond_blocks == "all" or t == n - 1)
        if conditioned:
            _require(kind, cfg, cond_token=True, null_class="learned")
            table = src.take(f"{ref}.proj_txt.weight", (W, K + 1)).T
            bias = src.take(f"{ref}.proj_txt.bias", (W,))
            table = table if gradients else table + bias
            out[f"{fb}.class_embed"] = table[:K]
        out[f"{fb}.proj_in.weight"] = src.take(f"{ref}.proj_in.weight", (W, D))[:, feat]
        out[f"{fb}.proj_in.bias"] = src.take(f"{ref}.proj_in.bias", (W,))
        for l in range(depth):
            _layer(src, f"{ref}.attn_blocks.{l}", f"{fb}.layers.{l}", cfg, out, gated, qk_rows)
        out[f"{fb}.proj_out.weight"] = src.take(f"{ref}.proj_out.weight", (2 * D, W))[out_rows]
        out[f"{fb}.proj_out.bias"] = src.take(f"{ref}.proj_out.bias", (2 * D,))[out_rows]
        if cfg.start_token:
            out[f"{fb}.sos"] = src.take(f"{ref}.sos_embed", (1, 1, D)).reshape(D)[feat]
        if cfg.final_norm:
            out[f"{fb}.final_norm.weight"] = src.take(f"{ref}.final_norm.weight", (W,)) + (0 if gradients else 1)
        if conditioned:
            out[f"{fb}.null_embed"] = table[K]
    src.check_all_used(lambda k: k.endswith(".attn_mask") or k == "var" or k.startswith("feat_rope"))  # unused buffers
    return out


# ---------------------------------------------------------------------------------------------------------- both
def convert(kind: str, state: dict, cfg: FlowConfig) -> TARFlow:
    """A FlowBack TARFlow of config cfg holding a reference checkpoint's weights (eval mode)."""
    if kind not in KINDS:
        raise WeightMappingError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
    weights = (from_ml_tarflow if kind == "ml-tarflow" else from_ml_starflow)(state, cfg)
    model = TARFlow(cfg)
    expected = model.state_dict()
    for key in expected:  # a mapping that misses a key is a bug here, not in the checkpoint
        if key not in weights:
            raise AssertionError(f"{kind} mapping produced no {key}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    return model.eval()
