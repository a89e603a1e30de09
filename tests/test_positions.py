"""One grammar for alignment positions: parsing (with the layer base and default layer as arguments), formatting
back, and the tables' labels."""

import pytest

from flowback.alignment.positions import PositionError, format_position, parse_position, position_label
from flowback.errors import FlowBackError

EIGHT = [8] * 8


def test_the_paper_numbering_counts_blocks_and_layers_from_one():
    assert parse_position("all", [2, 3]) == [(1, 2), (2, 3)]
    assert parse_position("1&2", EIGHT) == [(1, 8), (2, 8)]
    assert parse_position("7&8 layer 6", EIGHT) == [(7, 6), (8, 6)]
    assert parse_position(" 7 & 8  LAYER 6 ", EIGHT) == [(7, 6), (8, 6)]


def test_layer_base_zero_shifts_the_layer_but_not_the_blocks():
    assert parse_position("7&8 layer 5", EIGHT, base=0) == [(7, 6), (8, 6)]
    assert parse_position("7&8 layer 0", EIGHT, base=0) == [(7, 1), (8, 1)]
    with pytest.raises(PositionError, match="layer 8 is out of range, block 7 has layers 0..7"):
        parse_position("7&8 layer 8", EIGHT, base=0)
    with pytest.raises(PositionError, match="layer 0 is out of range"):
        parse_position("7&8 layer 0", EIGHT, base=1)


def test_default_layer_applies_only_where_the_text_names_none():
    assert parse_position("7&8", EIGHT, default_layer=6) == [(7, 6), (8, 6)]
    assert parse_position("7&8", EIGHT, default_layer=5, base=0) == [(7, 6), (8, 6)]
    assert parse_position("7&8 layer 2", EIGHT, default_layer=6) == [(7, 2), (8, 2)]
    assert parse_position("all", [2, 4], default_layer="last") == [(1, 2), (2, 4)]
    with pytest.raises(PositionError, match="default layer"):
        parse_position("all", [2, 4], default_layer=3)  # block 1 has 2 layers
    with pytest.raises(PositionError, match="default layer must be"):
        parse_position("all", [2, 4], default_layer="first")


@pytest.mark.parametrize("text, message", [("9&10", "block 9 is out of range"), ("1&1", "repeats a block"),
                                           ("blocks 7", "cannot parse"), ("7&8 layer 9", "layer 9")])
def test_bad_positions_name_what_is_wrong(text, message):
    with pytest.raises(PositionError, match=message) as err:
        parse_position(text, EIGHT)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FlowBackError)  # pydantic and stages


@pytest.mark.parametrize("base", [0, 1])
@pytest.mark.parametrize("positions", [[(7, 8), (8, 8)], [(7, 6), (8, 6)], [(b, 8) for b in range(1, 9)],
                                       [(b, 3) for b in range(1, 9)], [(1, 1)]])
def test_format_parses_back(positions, base):
    text = format_position(positions, EIGHT, base=base)
    assert parse_position(text, EIGHT, base=base) == positions


def test_format_is_the_shortest_text():
    assert format_position([(b, 8) for b in range(1, 9)], EIGHT) == "all"
    assert format_position([(7, 8), (8, 8)], EIGHT) == "7&8"
    assert format_position([(7, 6), (8, 6)], EIGHT) == "7&8 layer 6"
    assert format_position([(7, 6), (8, 6)], EIGHT, base=0) == "7&8 layer 5"
    assert format_position([(7, 6), (8, 6)], EIGHT, default_layer=6) == "7&8"
    with pytest.raises(PositionError, match="different layers"):
        format_position([(7, 6), (8, 5)], EIGHT)


def test_labels_follow_the_paper():
    assert position_label(None) == "-"
    assert position_label("all") == "All blocks"
    assert position_label("7&8") == "Block 7&8"
    assert position_label("7 & 8 layer 6") == "Block 7&8, L6"
    assert position_label("7&8 layer 5", base=0) == "Block 7&8, L5 (from 0)"
    assert position_label("not a position") == "not a position"
