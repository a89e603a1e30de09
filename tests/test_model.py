"""TARFlow: block order, guidance, conditioning, denoising, the bits/dim convention (invertibility, exact log-det,
causality and the KV cache, for TARFlow and every STARFlow option: tests/test_starflow.py)."""

import torch
from conftest import flow_images, random_flow

from flowback.models.guidance import Guidance
from flowback.models.sampling import denoise, sample
from flowback.models.tarflow import bits_per_dim


def make_model(seed=0, **kw):
    return random_flow(seed, **kw)


def images(model, n=4, seed=1):
    return flow_images(model, n, seed)


def test_order_flips_between_blocks():
    model = make_model(layers=(1, 1, 1, 1))
    assert [blk.flip for blk in model.blocks] == [False, True, False, True]
    x = torch.arange(6.0).reshape(1, 6, 1)
    assert torch.equal(model.blocks[1].permute(model.blocks[1].permute(x)), x)


def test_guidance_weight_zero_equals_unguided():
    model = make_model()
    y = torch.tensor([1, 2])
    z = torch.randn(2, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(3))
    plain = sample(model, y, z=z)
    for method in ("tarflow", "starflow"):
        assert torch.equal(sample(model, y, guidance=Guidance(method, 0.0), z=z), plain)
    assert not torch.allclose(sample(model, y, guidance=Guidance("tarflow", 2.0), z=z), plain)


def test_starflow_guidance_only_guides_the_deep_block():
    g = Guidance("starflow", 2.0)
    assert [g.applies_to(t, 4) for t in (1, 2, 3, 4)] == [False, False, False, True]
    a = torch.randn(5, 3, 2)
    b = torch.randn(5, 3, 2)
    a_g, b_g = g.combine(a, b, a, b, 2.0)  # identical conditionals: guidance changes nothing
    assert torch.allclose(a_g, a, atol=1e-6) and torch.allclose(b_g, b, atol=1e-6)


def test_deep_only_conditioning_ignores_labels_in_shallow_blocks():
    model = make_model(layers=(1, 1, 3), cond_blocks="deep")
    assert [blk.class_embed is not None for blk in model.blocks] == [False, False, True]
    x = images(model, n=2)
    a, b = (model(x, torch.tensor([k, k]), keep_inputs=True) for k in (0, 1))
    assert torch.equal(a.block_inputs[2], b.block_inputs[2])  # blocks 1 and 2 never see the label
    assert not torch.allclose(a.z, b.z)  # the deep block does


def test_class_weights_mix_embeddings():
    model = make_model()
    x = images(model, n=2)
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 4]), 5).float()
    assert torch.allclose(model.log_prob(x, class_weights=onehot), model.log_prob(x, torch.tensor([2, 4])), atol=1e-5)


def test_denoise_moves_along_the_score():
    model = make_model()
    x = images(model, n=2)
    y = torch.tensor([0, 1])
    sigma = 0.1
    out = denoise(model, x, y, sigma)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(xg, y).sum(), xg)
    assert torch.allclose(out, x + sigma**2 * grad, atol=1e-6)
    assert torch.equal(denoise(model, x, y, 0.0), x)


def test_bits_per_dim_of_uniform_density():
    # a uniform density on [-1, 1]^D has nll/dim = log 2 nats, i.e. exactly 8 bits/dim for 8-bit data
    assert abs(bits_per_dim(torch.log(torch.tensor(2.0))).item() - 8.0) < 1e-6


def test_paper_imagenet64_config_is_expressible():
    from flowback.builders import flow_config
    from flowback.params import validate

    p = validate({"data": {"dataset": "digits", "image_size": 64},
                  "model": {"patch_size": 2, "width": 768, "blocks": 8, "layers": 8, "head_dim": 64, "mlp_ratio": 4,
                            "noise_std": 0.05}})
    cfg = flow_config(p)
    assert cfg.layers == (8,) * 8 and cfg.num_tokens == 1024 and cfg.width == 768


def test_position_embeddings_follow_spatial_tokens_in_flipped_blocks():
    model = make_model(pos_embed="sincos")
    flipped = model.blocks[1]
    T = model.cfg.num_tokens
    full = flipped.position(0, T)
    assert torch.equal(full, flipped.pos.flip(0))  # block-order position i is spatial token T-1-i
    assert torch.equal(flipped.position(5, 1), full[5:6]) and torch.equal(model.blocks[0].position(3, 2),
                                                                          model.blocks[0].pos[3:5])
