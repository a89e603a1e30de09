"""Sampling options from ml-tarflow / ml-starflow: attention temperature of the unconditional pass, guide_what,
STARFlow guidance over every conditioned block, redrawing non-finite samples, the denoising step multiplier."""

import math

import numpy as np
import pytest
import torch
from conftest import generate_flow, random_flow

import flowback.models.sampling as sampling
from flowback.models.guidance import Guidance
from flowback.models.sampling import NonFiniteSampleError, SampleStats, denoise, sample
from flowback.models.transformer import Attention


def make_model(seed=0, **kw):
    return random_flow(seed, class_std=0.5, **kw)


Y = torch.tensor([0, 3, 4])


def noise(model, n=3, seed=2):
    return torch.randn(n, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(seed))


# -- attention temperature --------------------------------------------------------------------------------------
def test_attention_temperature_divides_the_logits_of_its_row():
    torch.manual_seed(0)
    attn = Attention(16, 8)
    x = torch.randn(2, 5, 16)
    temp = torch.tensor([1.0, 0.3])
    out = attn(x, temp=temp)
    B, T, C = x.shape
    q, k, v = attn.qkv(attn.norm(x)).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) / temp.view(2, 1, 1, 1)
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(attn(x[:1], temp=temp[:1]), attn(x[:1]))  # temperature 1 is no change
    assert not torch.allclose(out[1], attn(x)[1], atol=1e-3)


def test_attn_temp_one_is_no_temperature_and_only_touches_guided_sampling():
    model = make_model()
    z = noise(model)
    g = Guidance("tarflow", 1.5)
    plain = sample(model, Y, guidance=g, z=z)
    assert torch.equal(sample(model, Y, guidance=Guidance("tarflow", 1.5, attn_temp=1.0), z=z), plain)
    assert g.uncond_temperature(3) is None
    assert not torch.allclose(sample(model, Y, guidance=Guidance("tarflow", 1.5, attn_temp=0.5), z=z), plain,
                              atol=1e-4)
    unguided = sample(model, Y, z=z)
    assert torch.equal(sample(model, Y, guidance=Guidance("tarflow", 0.0, attn_temp=0.5), z=z), unguided)
    temps = Guidance("tarflow", 1.5, attn_temp=0.5).uncond_temperature(3)
    assert temps.tolist() == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]  # the conditional half keeps temperature 1


def test_attn_temp_on_all_divides_every_pass():
    g = Guidance("starflow", 1.5, attn_temp=0.5, attn_temp_on="all")
    assert g.temperature(2, guided=True).tolist() == [0.5] * 4  # both halves of a guided batch
    assert g.temperature(2, guided=False).tolist() == [0.5] * 2  # and an unguided block
    assert Guidance("starflow", 1.5, attn_temp=0.5).temperature(2, guided=False) is None
    assert Guidance("starflow", 1.5, attn_temp_on="all").temperature(2, guided=True) is None  # attn_temp 1
    with pytest.raises(ValueError, match="attn_temp_on"):
        Guidance("starflow", 1.5, attn_temp_on="cond")
    model = make_model()
    z = noise(model)
    uncond_only = sample(model, Y, guidance=Guidance("starflow", 1.5, attn_temp=0.5), z=z)
    every = sample(model, Y, guidance=g, z=z)
    assert not torch.allclose(every, uncond_only, atol=1e-4)
    # unguided sampling (weight 0) keeps the temperature in every block, as ml-starflow's sampler does
    unguided = sample(model, Y, z=z)
    assert not torch.allclose(sample(model, Y, guidance=Guidance("none", 0.0, attn_temp=0.5, attn_temp_on="all"), z=z),
                              unguided, atol=1e-4)


# -- guide_what -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tarflow", "starflow"])
def test_guide_what_guides_only_the_named_parameters(method):
    g = torch.Generator().manual_seed(0)
    a_c, b_c, a_u, b_u = (torch.randn(4, 3, 2, generator=g) for _ in range(4))
    a_ab, b_ab = Guidance(method, 2.0).combine(a_c, b_c, a_u, b_u, 2.0)
    a_a, b_a = Guidance(method, 2.0, guide_what="a").combine(a_c, b_c, a_u, b_u, 2.0)
    a_b, b_b = Guidance(method, 2.0, guide_what="b").combine(a_c, b_c, a_u, b_u, 2.0)
    assert torch.equal(b_a, b_c) and torch.allclose(a_a, a_ab)
    assert torch.equal(a_b, a_c) and torch.allclose(b_b, b_ab)
    assert not torch.allclose(a_ab, a_c) and not torch.allclose(b_ab, b_c)
    if method == "tarflow":
        assert torch.allclose(a_ab, a_c + 2.0 * (a_c - a_u)) and torch.allclose(b_ab, b_c + 2.0 * (b_c - b_u))
    with pytest.raises(ValueError, match="guide_what"):
        Guidance(method, 1.0, guide_what="c")


def test_guide_what_changes_samples():
    model = make_model()
    z = noise(model)
    full = sample(model, Y, guidance=Guidance("tarflow", 2.0), z=z)
    for what in ("a", "b"):
        part = sample(model, Y, guidance=Guidance("tarflow", 2.0, guide_what=what), z=z)
        assert not torch.allclose(part, full, atol=1e-4) and not torch.allclose(part, sample(model, Y, z=z), atol=1e-4)


# -- STARFlow guidance in every conditioned block ---------------------------------------------------------------
def test_starflow_guidance_blocks():
    assert [Guidance("starflow", 1.0, blocks="all").applies_to(t, 4) for t in (1, 2, 3, 4)] == [True] * 4
    assert [Guidance("starflow", 1.0).applies_to(t, 4) for t in (1, 2, 3, 4)] == [False, False, False, True]
    assert [Guidance("tarflow", 1.0, blocks="deep").applies_to(t, 4) for t in (1, 2, 3, 4)] == [False] * 3 + [True]
    with pytest.raises(ValueError, match="blocks"):
        Guidance("starflow", 1.0, blocks="some")


def test_starflow_guidance_over_all_conditioned_blocks():
    model = make_model()  # every block conditioned
    z = noise(model)
    deep = sample(model, Y, guidance=Guidance("starflow", 2.0, blocks="deep"), z=z)
    every = sample(model, Y, guidance=Guidance("starflow", 2.0, blocks="all"), z=z)
    assert not torch.allclose(every, deep, atol=1e-4)
    only_deep = make_model(layers=(1, 1, 2), cond_blocks="deep")  # unconditioned blocks have nothing to guide
    z = noise(only_deep)
    assert torch.equal(sample(only_deep, Y, guidance=Guidance("starflow", 2.0, blocks="all"), z=z),
                       sample(only_deep, Y, guidance=Guidance("starflow", 2.0, blocks="deep"), z=z))


# -- redrawing non-finite samples -------------------------------------------------------------------------------
@pytest.fixture
def nan_when_noise_is_large(monkeypatch):
    """The flow's inverse, made to return NaN for every sample whose first noise value exceeds 0.4."""
    real = sampling.reverse

    def fake(model, z, *args, **kw):
        x = real(model, z, *args, **kw)
        x[z[:, 0, 0] > 0.4] = float("nan")
        return x

    monkeypatch.setattr(sampling, "reverse", fake)


def test_non_finite_samples_are_redrawn_deterministically(nan_when_noise_is_large):
    model = make_model()
    y = torch.arange(12) % 5
    first = sample(model, y, torch.Generator().manual_seed(0))  # no redraws: NaN rows pass through
    bad = ~torch.isfinite(first).flatten(1).all(1)
    assert 0 < int(bad.sum()) < 12  # the fake makes some rows NaN, so the test tests something
    stats = SampleStats()
    x = sample(model, y, torch.Generator().manual_seed(0), max_redraws=20, stats=stats)
    assert torch.isfinite(x).all()
    assert torch.equal(x[~bad], first[~bad])  # only the bad rows are drawn again
    assert stats.redraws >= int(bad.sum())
    again = sample(model, y, torch.Generator().manual_seed(0), max_redraws=20)
    assert torch.equal(x, again)


def test_samples_still_non_finite_after_the_redraws_are_an_error(monkeypatch):
    monkeypatch.setattr(sampling, "reverse", lambda model, z, *a, **k: torch.full((len(z), 2, 8, 8), float("nan")))
    model = make_model()
    stats = SampleStats()
    with pytest.raises(NonFiniteSampleError, match="3 of 3 samples .* after 4 redraws"):
        sample(model, Y, torch.Generator().manual_seed(0), max_redraws=4, stats=stats)
    assert stats.redraws == 12


def test_generate_records_redraws_per_chunk_and_names_a_failing_chunk(tmp_path, nan_when_noise_is_large, monkeypatch):
    model = make_model()
    labels = np.arange(10) % 5
    stats = SampleStats()
    images, _ = generate_flow(model, labels, tmp_path / "chunks", 4, seed=3, max_redraws=20,
                         stats=stats)
    assert images.shape == (10, 8, 8, 2) and stats.redraws > 0
    resumed = SampleStats()  # a re-run loads the chunks from disk and still counts their redraws
    images2, seconds = generate_flow(model, labels, tmp_path / "chunks", 4, seed=3, max_redraws=20,
                                stats=resumed)
    assert seconds == 0 and np.array_equal(images, images2) and resumed.redraws == stats.redraws
    monkeypatch.setattr(sampling, "reverse", lambda model, z, *a, **k: torch.full((len(z), 2, 8, 8), float("nan")))
    with pytest.raises(NonFiniteSampleError, match=r"000000\.npz: chunk 0"):
        generate_flow(model, labels, tmp_path / "other", 4, seed=3, max_redraws=2)


# -- denoising step multiplier ----------------------------------------------------------------------------------
def test_denoise_scale_multiplies_the_score_step():
    model = make_model()
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    y = torch.tensor([0, 1])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(xg, y).sum(), xg)
    assert torch.allclose(denoise(model, x, y, 0.1, scale=2.5), x + 2.5 * 0.01 * grad, atol=1e-6)
    assert torch.equal(denoise(model, x, y, 0.1, scale=1.0), denoise(model, x, y, 0.1))
    z = noise(model, n=2)
    assert torch.equal(sample(model, y, denoise_sigma=0.1, z=z, denoise_scale=1.0), sample(model, y, denoise_sigma=0.1,
                                                                                             z=z))
    assert torch.equal(sample(model, y, denoise_sigma=0.1, z=z, denoise_scale=0.0), sample(model, y, z=z))
