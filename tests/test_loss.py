"""Target-grid rules (upsample | pool | dino448) and the reduction over positions."""

import pytest
import torch

from flowback.alignment.loss import Projector, alignment_loss, combine_positions, encoder_input_size, flow_tokens, match_grid, position_loss, target_tokens


def test_upsample_is_todays_rule_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(2, 2, 2, 5, generator=g)
    h = torch.randn(2, 16, 8, generator=g)
    proj = Projector(8, 12, 5)
    targets = target_tokens(enc, 4, "upsample")
    assert torch.equal(targets, match_grid(enc, 4))
    assert torch.equal(position_loss(proj, h, targets), alignment_loss(proj(h), match_grid(enc, 4)))


def test_pool_averages_each_cell_of_flow_tokens_in_row_major_order():
    h = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, row-major
    pooled = flow_tokens(h, 4)
    assert torch.equal(pooled.reshape(-1), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    enc = torch.randn(1, 2, 2, 3)
    assert torch.equal(target_tokens(enc, 4, "pool"), enc.reshape(1, 4, 3))  # the targets are left alone


def test_pool_loss_ignores_the_order_of_tokens_inside_a_cell():
    g = torch.Generator().manual_seed(1)
    h, target = torch.randn(2, 16, 8, generator=g), torch.randn(2, 4, 5, generator=g)
    proj = Projector(8, 12, 5)
    swapped = h.clone()
    swapped[:, [0, 1]] = h[:, [1, 0]]  # tokens (0,0) and (0,1) share the first 2x2 cell
    assert torch.allclose(position_loss(proj, h, target), position_loss(proj, swapped, target), atol=1e-6)
    moved = h.clone()
    moved[:, [0, 2]] = h[:, [2, 0]]  # token (0,2) is in the next cell: the loss changes
    assert not torch.allclose(position_loss(proj, h, target), position_loss(proj, moved, target))


def test_dino448_sizes_the_encoder_so_the_grids_match():
    assert encoder_input_size("dino448", 32, 14, 224) == 448
    assert encoder_input_size("upsample", 32, 14, 224) == 224 == encoder_input_size("pool", 32, 14, 224)
    enc = torch.randn(1, 32, 32, 3)
    assert torch.equal(target_tokens(enc, 32, "dino448"), enc.reshape(1, 1024, 3))
    with pytest.raises(ValueError, match="encoder grid is 16"):
        target_tokens(torch.randn(1, 16, 16, 3), 32, "dino448")
    with pytest.raises(ValueError, match="not a multiple"):
        target_tokens(torch.randn(1, 3, 3, 3), 4, "pool")
    with pytest.raises(ValueError, match="target_grid"):
        encoder_input_size("nearest", 32, 14, 224)


def test_positions_are_averaged_or_summed():
    losses = [torch.tensor(1.0), torch.tensor(3.0)]
    assert combine_positions(losses).item() == 2.0
    assert combine_positions(losses, "sum").item() == 4.0
    assert torch.equal(combine_positions(losses), torch.stack(losses).mean())  # today's reduction, bit for bit
    with pytest.raises(ValueError, match="position_reduce"):
        combine_positions(losses, "max")
