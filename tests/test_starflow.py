"""STARFlow architecture options pass TARFlow's properties: invertibility, exact log-det, causality, KV cache,
the classifier's class mixing, alignment features in spatial order; and each option does what it says."""

import pytest
import torch
from conftest import flow_images, random_flow

from flowback.alignment.reverse import naive_reverse_features
from flowback.alignment.strategies import AlignSpec, alignment_features
from flowback.alignment.strategies import detach_features
from flowback.metrics.classifier import classify
from flowback.models.guidance import Guidance
from flowback.models.sampling import reverse, sample
from flowback.models.tarflow import FlowConfig, TARFlow, latent_norm_penalty
from flowback.models.tarflow import INV_SOFTPLUS_1, STARFLOW_DEFAULTS

OPTIONS = {
    "rope": {"pos_embed": "rope"},
    "start_token": {"start_token": True},
    "final_norm": {"final_norm": True},
    "softplus": {"scale": "softplus"},
    "soft_clip": {"soft_clip": 0.5},
    "cond_token": {"cond_token": True},
    "all": {"pos_embed": "rope", "start_token": True, "final_norm": True, "scale": "softplus", "soft_clip": 2.0,
            "cond_token": True},
    "all_deep": {"pos_embed": "rope", "start_token": True, "final_norm": True, "scale": "softplus", "soft_clip": 2.0,
                 "cond_token": True, "layers": (1, 1, 3), "cond_blocks": "deep"},
}


def make_model(seed=0, std=0.1, **kw):
    return random_flow(seed, std, **kw)


def images(model, n=3, seed=1):
    return flow_images(model, n, seed)


Y = torch.tensor([0, 2, 4])


@pytest.mark.parametrize("name", OPTIONS)
def test_forward_then_reverse_reconstructs(name):
    model = make_model(**OPTIONS[name])
    x = images(model)
    with torch.no_grad():
        out = model(x, Y)
        assert out.logdet.abs().min() > 0.05  # a non-trivial map
        for use_cache in (True, False):
            assert (reverse(model, out.z, Y, use_cache=use_cache) - x).abs().max() < 1e-4


@pytest.mark.parametrize("name", OPTIONS)
def test_logdet_equals_autograd_jacobian(name):
    kw = dict(OPTIONS[name], channels=1, image_size=4, patch_size=2, layers=(1, 2), width=16)
    kw.pop("cond_blocks", None)
    model = make_model(**kw)
    x = images(model, n=1)[0]
    y = torch.tensor([3])

    def f(flat):
        return model(flat.reshape(1, *x.shape), y).z.reshape(-1)

    J = torch.autograd.functional.jacobian(f, x.reshape(-1))
    _, logabsdet = torch.linalg.slogdet(J.double())
    logdet = model(x[None], y).logdet[0].double()
    assert abs(logabsdet.item() - logdet.item()) < 1e-4
    assert abs(logdet.item()) > 1e-1


@pytest.mark.parametrize("name", OPTIONS)
def test_block_is_causal_in_its_own_order(name):
    model = make_model(**OPTIONS[name])
    blk = model.blocks[1]  # flipped
    T, D = model.cfg.num_tokens, model.cfg.token_dim
    u = torch.randn(2, T, D, generator=torch.Generator().manual_seed(3))
    cond = blk.condition(torch.tensor([0, 1]), None, 2)
    a, b, _ = blk.shifted_affine(u, cond)
    t = 7
    u2 = u.clone()
    u2[:, t] += 1.0
    a2, b2, _ = blk.shifted_affine(u2, cond)
    assert torch.equal(a[:, : t + 1], a2[:, : t + 1]) and torch.equal(b[:, : t + 1], b2[:, : t + 1])
    assert not torch.allclose(b[:, t + 1 :], b2[:, t + 1 :])
    if blk.sos is None:
        assert torch.equal(a[:, 0], torch.zeros_like(a[:, 0])) and torch.equal(b[:, 0], torch.zeros_like(b[:, 0]))
    else:  # with a start token, token 0 is transformed too
        assert b[:, 0].abs().min() > 0


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("guidance", [None, Guidance("tarflow", 1.5, attn_temp=0.7),
                                      Guidance("starflow", 1.5, anneal=True, blocks="all")])
def test_kv_cached_sampling_equals_uncached(name, guidance):
    model = make_model(std=0.05, **OPTIONS[name])
    z = torch.randn(3, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(2))
    cached = sample(model, Y, guidance=guidance, use_cache=True, z=z)
    uncached = sample(model, Y, guidance=guidance, use_cache=False, z=z)
    assert (cached - uncached).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["cond_token", "all"])
def test_class_weights_mix_embeddings_with_a_class_token(name):
    model = make_model(**OPTIONS[name])
    x = images(model)
    onehot = torch.nn.functional.one_hot(Y, 5).float()
    assert torch.allclose(model.log_prob(x, class_weights=onehot), model.log_prob(x, Y), atol=1e-5)
    uniform = torch.full((3, 5), 0.2)  # softmax(0): the mean embedding, the dropped-label / unconditional one
    assert torch.allclose(model.log_prob(x, class_weights=uniform), model.log_prob(x), atol=1e-5)
    assert not torch.allclose(model.log_prob(x, Y), model.log_prob(x), atol=1e-3)
    assert classify(model, x).shape == (3,)


@pytest.mark.parametrize("name", OPTIONS)
def test_alignment_features_are_spatial_and_pseudo_reverse_reads_the_block_inputs(name):
    model = make_model(**OPTIONS[name])
    x = images(model)
    positions = ((2, 1), (3, 1))
    out = model(x, Y, keep={2: {1}, 3: {1}}, keep_inputs=True)
    conds = model.conditions(Y, None, 3)
    forward = {p: out.hidden[p] for p in positions}
    detach = detach_features(model, out, conds, AlignSpec("detach", positions))
    pseudo = alignment_features(model, out, conds, AlignSpec("reverse", positions))
    T, W = model.cfg.num_tokens, model.cfg.width
    for p in positions:
        assert forward[p].shape == detach[p].shape == pseudo[p].shape == (3, T, W)
        assert torch.allclose(forward[p], detach[p], atol=1e-5) and torch.allclose(pseudo[p], detach[p], atol=1e-4)
    # spatial order: the flipped block 2's features of a flipped-back input are its own, token for token
    blk = model.blocks[1]
    h_block_order = blk.run(blk.sequence(blk.permute(out.block_inputs[1])), 0, conds[1], keep={1})[1][1]
    assert torch.allclose(forward[(2, 1)], h_block_order.flip(1), atol=1e-6)
    if not model.cfg.start_token:  # the naive reverse reference passes token 0 unchanged (TARFlow's layout)
        naive = naive_reverse_features(model, model(x, Y, keep_inputs=True), conds, AlignSpec("reverse", positions))
        for p in positions:
            assert torch.allclose(naive[p], pseudo[p], atol=1e-4)


def test_options_default_off_and_checkpoints_unchanged():
    cfg = FlowConfig(channels=1, image_size=8, patch_size=2, width=32, layers=(1, 1), head_dim=8)
    d = cfg.to_dict()
    assert not set(STARFLOW_DEFAULTS) & set(d)  # a TARFlow config is written as before the options existed
    assert FlowConfig.from_dict(d) == cfg
    star = FlowConfig(**{**d, **OPTIONS["all"]})
    assert FlowConfig.from_dict(star.to_dict()) == star
    names = set(TARFlow(cfg).state_dict())
    assert not any("sos" in n or "final_norm" in n for n in names)


@pytest.mark.parametrize("name", [n for n in OPTIONS if n not in ("all", "all_deep")])
def test_each_option_changes_the_map(name):
    x = images(make_model())
    base = make_model()(x, Y).z
    assert not torch.allclose(make_model(**OPTIONS[name])(x, Y).z, base, atol=1e-3)


def test_softplus_scale_starts_at_the_identity_and_soft_clip_bounds_the_outputs():
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(channels=1, image_size=4, patch_size=2, width=16, layers=(1,), head_dim=8,
                               scale="softplus"))
    x = images(model)
    out = model(x)
    assert torch.allclose(model.unpatchify(out.z), x, atol=1e-6) and out.logdet.abs().max() < 1e-5
    assert abs(torch.nn.functional.softplus(torch.tensor(INV_SOFTPLUS_1)).item() - 1) < 1e-7
    clipped = make_model(soft_clip=0.5)
    blk = clipped.blocks[0]
    h, _ = blk.transformer(torch.randn(2, 16, 8) * 10, None)
    a, b = blk.affine(h)
    raw_a, raw_b = blk.proj_out(h).chunk(2, dim=-1)
    assert a.abs().max() <= 0.5 and b.abs().max() <= 0.5 and raw_b.abs().max() > 0.5
    assert torch.allclose(a, 0.5 * torch.tanh(raw_a / 0.5))


def test_latent_norm_penalty_is_the_mean_square_of_intermediate_outputs():
    model = make_model()
    x = images(model)
    out = model(x, Y, keep_inputs=True)
    inner = out.block_inputs[1:]  # outputs of blocks 1..N-1
    expected = torch.stack([h.pow(2).mean() for h in inner]).mean()
    assert torch.allclose(latent_norm_penalty(out), expected, atol=1e-6)
    assert len(out.block_sq) == len(model.blocks)
    assert torch.allclose(out.block_sq[-1], out.z.pow(2).mean(dim=(1, 2)))
    latent_norm_penalty(out).backward()
    assert model.blocks[0].proj_out.weight.grad.abs().sum() > 0


def test_rope_positions_follow_spatial_tokens():
    model = make_model(pos_embed="rope")
    assert model.blocks[0].pos is None
    flipped = model.blocks[1]
    cos, sin = flipped.rotary(0, model.cfg.num_tokens, lead=1)
    assert torch.equal(cos[1:], flipped.rope_cos.flip(0)) and torch.equal(sin[1:], flipped.rope_sin.flip(0))
    assert torch.equal(cos[0], torch.ones_like(cos[0])) and torch.equal(sin[0], torch.zeros_like(sin[0]))
    # 2-D RoPE: a query-key score depends only on the two tokens' offset (dy, dx), not on where they are
    from flowback.models.transformer import apply_rope, rope_2d

    grid, d = 4, 8
    cos, sin = rope_2d(grid, d)
    q, k = torch.randn(2, d, generator=torch.Generator().manual_seed(0))

    def score(p, r):  # p, r: (row, col) of query and key
        i, j = p[0] * grid + p[1], r[0] * grid + r[1]
        qr = apply_rope(q.view(1, 1, 1, d), (cos[i : i + 1], sin[i : i + 1]))
        kr = apply_rope(k.view(1, 1, 1, d), (cos[j : j + 1], sin[j : j + 1]))
        return (qr * kr).sum().item()

    assert abs(score((2, 3), (1, 1)) - score((3, 2), (2, 0))) < 1e-5  # same offset (1, 2)
    assert abs(score((2, 3), (1, 1)) - score((2, 3), (1, 2))) > 1e-3  # another offset
    assert abs(score((1, 1), (1, 1)) - (q * k).sum().item()) < 1e-5
