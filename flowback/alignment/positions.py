"""Alignment positions: one grammar, parsed for training and labelled for the tables.

Text: "all" | "1&2" | "7&8" | "7&8 layer 6" (case-insensitive). Blocks are numbered 1..N in the forward (x -> z)
direction, as the paper does ("Block 7&8" of 8 only makes sense counting from 1). Two choices the paper leaves open
are arguments here, not hidden in the parser:

- base: whether "layer 6" counts layers from 1 (the residual stream after the 6th layer; FlowBack's default) or
  from 0 (after the 7th).
- default_layer: the layer a position without one means: "last" (FlowBack's default: the block's output, before
  its affine head) or a layer number in the same base as the text.

Parsed positions are (block, layer) pairs, both counted from 1 whatever the text's base (AlignSpec's numbering).
"""

from __future__ import annotations

import re

from ..errors import FlowBackError

GRAMMAR = re.compile(r"^\s*(?P<blocks>all|\d+(?:\s*&\s*\d+)*)\s*(?:layer\s*(?P<layer>\d+))?\s*$", re.IGNORECASE)
LAYER_BASES = (0, 1)


class PositionError(FlowBackError, ValueError):
    """A position string that does not parse or names a block or layer the model does not have."""


def _layer_index(number: int, base: int, depth: int, block: int, position: str) -> int:
    layer = number - base + 1
    if not 1 <= layer <= depth:
        raise PositionError(f"position {position!r}: layer {number} is out of range, block {block} has layers "
                            f"{base}..{depth - 1 + base}")
    return layer


def parse_position(position: str, layers_per_block: list[int], default_layer: str | int = "last",
                   base: int = 1) -> list[tuple[int, int]]:
    """Position text -> [(block, layer)], both counted from 1. Raises PositionError naming what is wrong."""
    if base not in LAYER_BASES:
        raise PositionError(f"layer base must be 0 or 1, got {base!r}")
    if default_layer != "last" and (isinstance(default_layer, bool) or not isinstance(default_layer, int)):
        raise PositionError(f"default layer must be 'last' or a layer number, got {default_layer!r}")
    m = GRAMMAR.match(position)
    if not m:
        raise PositionError(f"cannot parse position {position!r}; expected 'all', '7&8' or '7&8 layer 6'")
    n_blocks = len(layers_per_block)
    if m["blocks"].lower() == "all":
        blocks = list(range(1, n_blocks + 1))
    else:
        blocks = [int(b) for b in m["blocks"].split("&")]
    if len(set(blocks)) != len(blocks):
        raise PositionError(f"position {position!r} repeats a block")
    out = []
    for b in blocks:
        if not 1 <= b <= n_blocks:
            raise PositionError(f"position {position!r}: block {b} is out of range, the model has blocks 1..{n_blocks}")
        depth = layers_per_block[b - 1]
        if m["layer"] is not None:
            out.append((b, _layer_index(int(m["layer"]), base, depth, b, position)))
        elif default_layer == "last":
            out.append((b, depth))
        else:
            out.append((b, _layer_index(default_layer, base, depth, b, f"{position} (default layer)")))
    return out


def format_position(positions: list[tuple[int, int]], layers_per_block: list[int], default_layer: str | int = "last",
                    base: int = 1) -> str:
    """The shortest text that parses back to `positions` (one layer number shared by every block, or none)."""
    blocks = sorted(b for b, _ in positions)
    text = "all" if blocks == list(range(1, len(layers_per_block) + 1)) else "&".join(map(str, blocks))
    if sorted(parse_position(text, layers_per_block, default_layer, base)) == sorted(positions):
        return text
    layers = {l for _, l in positions}
    if len(layers) != 1:
        raise PositionError(f"positions {positions} use different layers in different blocks; the grammar has one")
    return f"{text} layer {layers.pop() - 1 + base}"


def position_label(position: str | None, base: int = 1) -> str:
    """The paper's wording: 'all' -> 'All blocks', '7&8' -> 'Block 7&8', '7&8 layer 6' -> 'Block 7&8, L6'.

    With base 0 the label says so ('Block 7&8, L5 (from 0)'); text that does not parse is returned unchanged."""
    if position is None:
        return "-"
    m = GRAMMAR.match(position)
    if not m:
        return position
    blocks = "All blocks" if m["blocks"].lower() == "all" else "Block " + re.sub(r"\s+", "", m["blocks"])
    if m["layer"] is None:
        return blocks
    return f"{blocks}, L{int(m['layer'])}" + (" (from 0)" if base == 0 else "")
