"""The choices the paper leaves open reach training: align.layer_base / default_layer change the aligned layers,
reverse_grad / reverse_tol the reverse gradient, position_reduce and target_grid the alignment term."""

import pytest
import timm
import torch

from flowback.alignment.encoder import EncoderConfig, FrozenEncoder
from flowback.alignment.objective import AlignTargets, Objective, align_spec
from flowback.params import ParamsError, validate
from flowback.training import TrainState

CPU = torch.device("cpu")
NO_AUTOCAST = {"device_type": "cpu", "enabled": False}


def experiment(position="7&8", strategy="reverse", **align):
    raw = {
        "model": {"patch_size": 4, "width": 16, "blocks": 8, "layers": 2, "head_dim": 8, "mlp_ratio": 1},
        "align": {"weight": 0.5, "projector_dim": 16, **align},
        "runtime": {"threads": 1},
        "experiments": {"e": {"strategy": strategy, "position": position}},
    }
    return validate(raw).run("e-s0")


def encoder(patch=4, input_size=16):
    cfg = EncoderConfig(arch="vit_small_patch14_dinov2", kwargs={"img_size": input_size, "patch_size": patch,
                        "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0},
                        input_size=input_size, mean=(0.5,), std=(0.5,))
    torch.manual_seed(3)
    return FrozenEncoder(timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs), cfg)


def images(n=4):
    return torch.randint(0, 256, (n, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_layer_base_and_default_layer_choose_the_aligned_layer():
    assert experiment("7&8 layer 1").positions == [(7, 1), (8, 1)]
    assert experiment("7&8 layer 0", layer_base=0).positions == [(7, 1), (8, 1)]
    assert experiment("7&8").positions == [(7, 2), (8, 2)]  # default: the block's last layer
    assert experiment("7&8", default_layer=1).positions == [(7, 1), (8, 1)]
    assert experiment("7&8", default_layer=0, layer_base=0).positions == [(7, 1), (8, 1)]


def test_a_layer_the_block_does_not_have_is_a_one_line_error_naming_the_experiment():
    with pytest.raises(ParamsError, match=r"experiments\.e\.position.*layer 3"):
        experiment("7&8", default_layer=3)
    with pytest.raises(ParamsError, match="align.default_layer"):
        experiment("7&8", default_layer="first")


@pytest.mark.parametrize("grad", ["paper", "exact", "newest"])
def test_reverse_grad_and_tolerance_reach_the_alignment_spec(grad):
    spec = align_spec(experiment(reverse_grad=grad, reverse_tol=1e-3))
    assert (spec.reverse_grad, spec.reverse_tol) == (grad, 1e-3)


def alignment_term(exp, enc, rule="upsample"):
    state = TrainState(exp, enc.dim, CPU)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    y = torch.arange(4)
    targets = AlignTargets(enc, state.model.cfg.grid, CPU, NO_AUTOCAST, images(), rule)
    batch_targets = targets.cache
    obj = Objective(state.model, state.projectors, align_spec(exp), exp.params.align.weight,
                    reduce=exp.params.align.position_reduce)
    _, _, align = obj(x, y, batch_targets)
    return align, batch_targets


def test_position_reduce_sum_is_the_mean_times_the_number_of_positions(one_thread):
    mean, _ = alignment_term(experiment("7&8", position_reduce="mean"), encoder())
    total, _ = alignment_term(experiment("7&8", position_reduce="sum"), encoder())
    torch.testing.assert_close(total, 2 * mean)


def test_target_grids_give_the_token_counts_they_promise(one_thread):
    exp = experiment("7&8", strategy="forward")  # flow: 16 px / patch 4 = a 4 x 4 grid
    _, up = alignment_term(exp, encoder(patch=8), "upsample")  # encoder 2 x 2, upsampled to 4 x 4
    _, pool = alignment_term(exp, encoder(patch=8), "pool")  # flow tokens pooled onto 2 x 2
    assert up.shape[1] == 16 and pool.shape[1] == 4
    enc = encoder(patch=4, input_size=8)  # 2 x 2 at its own size; dino448 reads it at 4 x 4 patch = 16 px
    align, dino = alignment_term(exp, enc, "dino448")
    assert dino.shape[1] == 16 and enc.cfg.input_size == 16 and torch.isfinite(align)
