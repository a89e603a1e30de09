"""TARFlow and every STARFlow architecture option pass the flow's properties: invertibility, exact log-det, causality, KV cache,
the classifier's class mixing, alignment features in spatial order; and each option does what it says. The same
for the gated feed-forwards and the options that make the model ml-starflow's exactly."""

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
    "tarflow": {},  # the plain model: every property below holds for it first
    "deep_shallow": {"layers": (1, 1, 4), "cond_blocks": "deep"},
    "sincos": {"pos_embed": "sincos"},
    "patch1": {"patch_size": 1, "image_size": 4},
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
    "swiglu": {"mlp": "swiglu"},
    "geglu": {"mlp": "geglu"},
    "seq_l2r": {"seq_order": "L2R"},
    "rope_3d": {"pos_embed": "rope", "rope_layout": "3d", "cond_token": True, "width": 40, "head_dim": 20},
    "rope_sequence": {"pos_embed": "rope", "rope_order": "sequence", "cond_token": True},
    "null_learned": {"null_class": "learned"},
    "ml_starflow": {"pos_embed": "rope", "start_token": True, "final_norm": True, "scale": "softplus", "soft_clip": 2.0,
                    "cond_token": True, "layers": (1, 1, 3), "cond_blocks": "deep", "mlp": "geglu", "seq_order": "L2R",
                    "rope_layout": "3d", "rope_order": "sequence", "null_class": "learned", "width": 40,
                    "head_dim": 20},
}
NEW = ("swiglu", "geglu", "seq_l2r", "rope_3d", "rope_sequence", "null_learned", "ml_starflow")


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
    kw = dict(OPTIONS[name], channels=1, image_size=4, patch_size=2, layers=(1, 2))
    kw.setdefault("width", 16)
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


@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "patch1"])  # patch 1's random inverse overflows
@pytest.mark.parametrize("guidance", [None, Guidance("tarflow", 1.5, attn_temp=0.7),
                                      Guidance("starflow", 1.5, anneal=True, blocks="all"),
                                      Guidance("starflow", 1.5, attn_temp=0.8, attn_temp_on="all")])
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
    assert torch.allclose(forward[(2, 1)], blk.permute(h_block_order), atol=1e-6)
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


@pytest.mark.parametrize("name", [n for n in OPTIONS if n not in ("tarflow", "patch1", "all", "all_deep", "ml_starflow",
                                                                  *NEW)])
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


# -- the gated feed-forwards and the options that reproduce ml-starflow -----------------------------------------
OFF = {"mlp": "gelu", "seq_order": "R2L", "rope_layout": "2d", "rope_order": "spatial", "null_class": "mean"}


@pytest.mark.parametrize("name", ["seq_l2r", "rope_3d", "rope_sequence"])
def test_each_ml_starflow_option_changes_the_map_of_the_same_weights(name):
    """The option toggled on a model with the same weights (these options add no parameters)."""
    base = {k: v for k, v in OPTIONS[name].items() if k not in OFF}
    plain, option = make_model(**base), make_model(**OPTIONS[name])
    option.load_state_dict(plain.state_dict())
    x = images(plain)
    assert not torch.allclose(option(x, Y).z, plain(x, Y).z, atol=1e-3)


def test_gated_mlps_compute_their_formula():
    from flowback.models.transformer import MLP

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for kind, act in [("swiglu", torch.nn.functional.silu),
                      ("geglu", lambda g: torch.nn.functional.gelu(g, approximate="tanh"))]:
        mlp = MLP(16, 3, kind)
        assert mlp.fc1.weight.shape == (2 * 48, 16) and mlp.fc2.weight.shape == (16, 48)  # hidden = width * ratio
        gate, up = mlp.fc1(mlp.norm(x)).chunk(2, dim=-1)
        assert torch.allclose(mlp(x), mlp.fc2(act(gate) * up), atol=1e-6)
    with pytest.raises(ValueError, match="mlp"):
        FlowConfig(channels=1, image_size=4, patch_size=2, width=16, layers=(1,), mlp="relu")


def test_seq_order_picks_the_flipped_blocks():
    assert [b.flip for b in make_model(layers=(1, 1, 1, 1, 1)).blocks] == [False, True, False, True, False]
    assert [b.flip for b in make_model(layers=(1, 1, 1, 1, 1), seq_order="L2R").blocks] == [True, False, True, False,
                                                                                             True]


def test_rope_3d_keeps_eight_still_pairs_and_rope_sequence_turns_by_processing_position():
    from flowback.models.transformer import rope_2d

    grid, d = 4, 24
    cos, sin = rope_2d(grid, d, still_pairs=8)
    n = (d // 2 - 8) // 2  # row pairs = column pairs = head_dim/4 - 4
    assert n == d // 4 - 4 == 2
    assert torch.equal(cos[:, 2 * n :], torch.ones(grid * grid, 8)) and torch.equal(sin[:, 2 * n :], torch.zeros(16, 8))
    token = 1 * grid + 2  # row 1, column 2
    freq = 10000.0 ** (-torch.arange(n, dtype=torch.float64) / n)  # 10000^(-2j / (head_dim/2 - 8))
    assert torch.allclose(sin[token, :n].double(), (1 * freq).sin(), atol=1e-7)
    assert torch.allclose(sin[token, n : 2 * n].double(), (2 * freq).sin(), atol=1e-7)
    with pytest.raises(ValueError, match="head_dim"):
        FlowConfig(channels=1, image_size=4, patch_size=2, width=16, layers=(1,), head_dim=16, pos_embed="rope",
                   rope_layout="3d")
    model = make_model(**OPTIONS["rope_sequence"])
    flipped = model.blocks[1]
    cos, sin = flipped.rotary(0, model.cfg.num_tokens, lead=1)
    assert torch.equal(cos[1:], flipped.rope_cos) and torch.equal(sin[1:], flipped.rope_sin)  # raster, not flipped
    assert torch.equal(cos[0], torch.ones_like(cos[0]))  # the class token does not turn
    assert torch.equal(flipped.rotary(3, 2, lead=0)[0], flipped.rope_cos[3:5])  # a cached step reads its position


def test_learned_null_class_is_the_unconditional_embedding():
    model = make_model(null_class="learned", class_std=0.5)
    blk = model.blocks[0]
    assert blk.null_embed is not None and blk.null_embed.shape == (model.cfg.width,)
    y = torch.tensor([0, -1, 4])
    cond = blk.condition(y, None, 3)
    assert torch.equal(cond[1], blk.null_embed) and torch.equal(cond[0], blk.class_embed[0])
    assert torch.equal(blk.condition(None, None, 2), blk.null_embed.expand(2, -1))
    assert not torch.allclose(blk.null_embed, blk.class_embed.mean(0))
    x = images(model)
    assert torch.allclose(model.log_prob(x), model.log_prob(x, torch.full((3,), -1)), atol=1e-6)
    onehot = torch.nn.functional.one_hot(Y, 5).float()  # class_weights still mix the K class embeddings
    assert torch.allclose(model.log_prob(x, class_weights=onehot), model.log_prob(x, Y), atol=1e-5)
    assert "null_embed" not in " ".join(make_model().state_dict())


def test_ml_starflow_options_default_off():
    cfg = FlowConfig(channels=1, image_size=8, patch_size=2, width=32, layers=(1, 1), head_dim=8)
    assert all(getattr(cfg, k) == v for k, v in OFF.items()) and not set(OFF) & set(cfg.to_dict())
    star = FlowConfig(**{**cfg.to_dict(), **OPTIONS["ml_starflow"]})
    assert FlowConfig.from_dict(star.to_dict()) == star


def test_latent_norm_in_ml_starflow_form_sums_input_and_inner_outputs():
    model = make_model()
    x = images(model)
    out = model(x, Y, keep_inputs=True)
    terms = [h.pow(2).mean() for h in out.block_inputs]  # the input, then the outputs of blocks 1..N-1
    assert torch.allclose(latent_norm_penalty(out, "starflow"), torch.stack(terms).sum(), atol=1e-6)
    # the input's term is a constant: same gradient as the mean form with the weight times N - 1
    g_star = torch.autograd.grad(latent_norm_penalty(out, "starflow"), model.blocks[0].proj_out.weight,
                                 retain_graph=True)[0]
    g_mean = torch.autograd.grad(latent_norm_penalty(out, "mean"), model.blocks[0].proj_out.weight)[0]
    assert torch.allclose(g_star, (len(model.blocks) - 1) * g_mean, atol=1e-6)
