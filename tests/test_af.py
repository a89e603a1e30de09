"""Adversarial flow models: the objective's terms against their definitions, sampling, conditioning, resume."""

from __future__ import annotations

import math

import pytest
import torch

from flowback.af_training import load_af_state, step_rng, train_af, train_flow_classifier
from flowback.io import FlowBackFileError
from flowback.models.af import AFConfig, Discriminator, FlowClassifier, Generator, sample_af, time_grid, unpatchify
from flowback.models.af_objective import (
    AFState,
    AFTrainConfig,
    GradNorm,
    af_train_step,
    discriminator_update,
    draw_generator,
    finite_difference_penalty,
    gap_weight,
    generator_update,
    guidance_loss,
    interpolate,
    ot_loss,
    ot_weight,
    relativistic_loss,
    sample_times,
)
from flowback.models.transformer import Attention

TINY = dict(channels=1, image_size=8, patch_size=2, width=16, depth=2, head_dim=8, mlp_ratio=2, num_classes=3)


def cfg(**kw) -> AFConfig:
    return AFConfig(**{**TINY, **kw})


def perturbed(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its initial value (adaLN-Zero starts the conditioning paths at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


# --------------------------------------------------------------------------------------------- objective terms
def test_ot_loss_is_the_per_dimension_squared_distance_over_the_gap_weight():
    x_src = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    x_gen = torch.tensor([[[[1.0, 0.0], [3.0, 5.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    w = torch.tensor([1.0, 0.5])
    # sample 0: (0 + 4 + 0 + 1) / 4 / 1 = 1.25; sample 1: (4) / 4 / 0.5 = 2.0; mean 1.625
    assert ot_loss(x_gen, x_src, w).item() == pytest.approx(1.625)
    s, t = torch.tensor([1.0, 0.5, 0.3]), torch.tensor([0.0, 0.5, 0.1])
    assert gap_weight(s, t, 1e-3).tolist() == pytest.approx([1.0, 1e-3, 0.2])


def test_ot_weight_follows_a_cosine_from_start_to_end_then_stays():
    assert ot_weight(0, 0.2, 0.005, 101) == pytest.approx(0.2)
    assert ot_weight(50, 0.2, 0.005, 101) == pytest.approx((0.2 + 0.005) / 2)
    assert ot_weight(25, 0.2, 0.005, 101) == pytest.approx(0.005 + 0.195 * (1 + math.cos(math.pi / 4)) / 2)
    assert ot_weight(100, 0.2, 0.005, 101) == ot_weight(10**6, 0.2, 0.005, 101) == 0.005


def test_gradient_normalisation_matches_its_definition():
    """Forward is the identity; backward divides g by sqrt(nu) + eps, nu <- beta nu + (1 - beta) N |g|^2."""
    beta, eps = 0.9, 1e-8
    gn = GradNorm(beta, eps)
    x = torch.randn(4, 3, requires_grad=True)
    y = gn(x)
    assert torch.equal(y, x)
    c1 = torch.randn(4, 3)
    (y * c1).sum().backward()  # dL/dy = c1
    nu1 = (1 - beta) * 12 * c1.square().sum()
    torch.testing.assert_close(x.grad, c1 / (nu1.sqrt() + eps))
    torch.testing.assert_close(gn.square_avg, nu1)
    x.grad = None
    c2 = 5 * torch.randn(4, 3)
    (gn(x) * c2).sum().backward()
    nu2 = beta * nu1 + (1 - beta) * 12 * c2.square().sum()
    torch.testing.assert_close(x.grad, c2 / (nu2.sqrt() + eps))


def test_gradient_normalisation_removes_the_loss_scale_and_the_batch_size():
    """With no averaging (beta = 0) the gradient reaching x does not depend on how the adversarial loss is scaled,
    and N |g|^2 of a batch-mean loss is the same for a batch and for that batch repeated."""
    x = torch.randn(8, 5)
    lin = torch.nn.Linear(5, 1)
    grads = []
    for scale in (1.0, 1000.0):
        xx = x.clone().requires_grad_(True)
        (lin(GradNorm(0.0)(xx)).mean() * scale).backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1])
    nus = []
    for reps in (1, 3):
        gn = GradNorm(0.0)
        lin(gn(x.repeat(reps, 1).requires_grad_(True))).mean().backward()
        nus.append(gn.square_avg.item())
    assert nus[0] == pytest.approx(nus[1], rel=1e-5)


def test_finite_difference_penalty_is_the_squared_directional_derivative():
    """For a linear D(x) = a.x + b the penalty is w (a.n)^2 exactly, and its mean over n ~ N(0, I) is w |a|^2 = R1."""
    a, eps = torch.tensor([0.5, -2.0, 1.0]), 0.01
    x = torch.randn(4, 3, dtype=torch.float64)
    n = torch.randn(4, 3, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    D = lambda v: v @ a.double() + 0.3  # noqa: E731
    pen = finite_difference_penalty(D(x + eps * n), D(x), eps, w)
    torch.testing.assert_close(pen, (w * (n @ a.double()) ** 2).mean())
    n = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.zeros(200_000, 3, dtype=torch.float64)
    mc = finite_difference_penalty(D(x + eps * n), D(x), eps, torch.ones(200_000, dtype=torch.float64))
    assert mc.item() == pytest.approx(a.square().sum().item(), rel=0.02)


def test_relativistic_losses_compare_each_fake_with_its_real():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    assert relativistic_loss(real, fake).item() == pytest.approx(
        (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))) / 2)
    assert relativistic_loss(fake, real).item() == pytest.approx(
        (math.log1p(math.exp(2.0)) + math.log1p(math.exp(-2.0))) / 2)


def test_path_endpoints_and_training_times():
    x, z = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    assert torch.equal(interpolate(x, z, torch.ones(5)), z)
    assert torch.equal(interpolate(x, z, torch.zeros(5)), x)
    s, t = sample_times(6, cfg(), torch.Generator().manual_seed(0))
    assert s.tolist() == [1.0] * 6 and t.tolist() == [0.0] * 6
    s, t = sample_times(400, cfg(nfe=4, pred="v"), torch.Generator().manual_seed(0))
    assert set(s.tolist()) == {0.25, 0.5, 0.75, 1.0}
    torch.testing.assert_close(s - t, torch.full_like(s, 0.25))
    s, t = sample_times(400, cfg(any_step=True, pred="v"), torch.Generator().manual_seed(0))
    assert bool(((0 <= t) & (t <= s) & (s <= 1)).all())


def test_guidance_loss_reaches_the_generator_not_the_classifier():
    c = cfg()
    clf = perturbed(FlowClassifier(c)).requires_grad_(False)
    x_gen = torch.randn(6, 1, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    tc = AFTrainConfig(cg_weight=0.5)
    d = draw_generator(x_gen.detach(), c, tc, torch.Generator().manual_seed(0))
    assert bool(((d.t_cg >= 0) & (d.t_cg <= 0.1)).all()) and d.noise_cg.shape == x_gen.shape
    loss = guidance_loss(clf, x_gen, y, d.t_cg, d.noise_cg, tc)
    loss.backward()
    assert x_gen.grad is not None and x_gen.grad.abs().sum() > 0
    # flow form: C sees the sample noised back to t'
    expected = torch.nn.functional.cross_entropy(clf(interpolate(x_gen.detach(), d.noise_cg, d.t_cg), d.t_cg), y) * 0.5
    torch.testing.assert_close(guidance_loss(clf, x_gen.detach(), y, d.t_cg, d.noise_cg, tc), expected)
    # multi-step form: C sees G's output at its own target time, only inside [cg_t_min, cg_t_max]
    tc2 = AFTrainConfig(cg_weight=0.5, cg_flow=False, cg_t_min=0.0, cg_t_max=0.49)
    d2 = draw_generator(x_gen.detach(), cfg(nfe=2, pred="v"), tc2, torch.Generator().manual_seed(0))
    assert d2.noise_cg is None and torch.equal(d2.t_cg, d2.t)
    t_tgt = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0, 0.5])
    per = torch.nn.functional.cross_entropy(clf(x_gen.detach(), t_tgt), y, reduction="none") * 0.5
    expected = (per * (t_tgt <= 0.49)).mean()
    got = guidance_loss(clf, x_gen.detach(), y, t_tgt, None, tc2)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------------------- networks
def test_adaln_zero_blocks_start_as_identity_and_the_generator_at_zero():
    G = Generator(cfg())
    h, c = torch.randn(3, 16, 16), torch.randn(3, 16)
    for blk in G.trunk.blocks:
        torch.testing.assert_close(blk(h, c), h, rtol=0, atol=0)
    z = torch.randn(3, 1, 8, 8)
    assert torch.equal(G(z, torch.tensor([0, 1, 2])), torch.zeros_like(z))


def test_dit_attention_is_not_causal_and_the_default_stays_causal():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 16)
    for causal in (True, False):
        att = Attention(16, 8, causal=causal)
        x2 = x.clone()
        x2[:, -1] += torch.randn(16)  # not a constant: LayerNorm would remove it
        first_changes = not torch.allclose(att(x)[:, 0], att(x2)[:, 0])
        assert first_changes is not causal
    assert Attention(16, 8).causal


def test_generator_and_discriminator_follow_the_label():
    c = cfg()
    G, D = perturbed(Generator(c)), perturbed(Discriminator(c), seed=1)
    z = torch.randn(2, 1, 8, 8)
    out0, out1 = G(z, torch.tensor([0, 0])), G(z, torch.tensor([1, 1]))
    assert out0.shape == z.shape and not torch.allclose(out0, out1)
    l0, l1 = D(z, torch.tensor([0, 0])), D(z, torch.tensor([1, 1]))
    assert l0.shape == (2,) and not torch.allclose(l0, l1)


def test_time_conditioned_networks_run_in_float64():
    """bench/peer_af.py compares in float64: the float32 time features must meet a float64 embedding."""
    c = cfg(nfe=2, pred="v")
    G, D = Generator(c).double(), Discriminator(c).double()
    x, y, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor([1.0, 0.5])
    assert G(x, y, t, t - 0.5).dtype == D(x, y, t).dtype == torch.float64


def test_depth_repetition_reuses_the_same_blocks():
    G1, G3 = Generator(cfg(repeat=2)), Generator(cfg(repeat=3))
    assert sum(p.numel() for p in G1.parameters()) == sum(p.numel() for p in G3.parameters())
    G = perturbed(Generator(cfg(repeat=2)))
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    with torch.no_grad():
        c = G.class_embed(y, 2)
        h = G.trunk.tokens(z)
        for r in range(2):
            h = G.trunk.run(h, c + G.time_embed(torch.full((2,), 1.0 - r / 2)))
        manual = G.final(h, c)
        torch.testing.assert_close(G(z, y), unpatchify(G.cfg, manual))
    # gradients of one block come from both passes
    G(z, y).square().sum().backward()
    assert G.trunk.blocks[0].attn.qkv.weight.grad is not None


def test_config_round_trip_and_errors():
    c = cfg(nfe=2, pred="v", disc_width=24)
    assert AFConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        cfg(repeat=2, nfe=2)
    with pytest.raises(ValueError):
        cfg(pred="eps")
    tc = AFTrainConfig(lr_g=3e-4)
    assert AFTrainConfig.from_dict(tc.to_dict()) == tc


# --------------------------------------------------------------------------------------------------- sampling
def test_one_nfe_sampling_is_deterministic_and_a_pure_function_of_z():
    G = perturbed(Generator(cfg()))
    y = torch.tensor([0, 1, 2, 1])
    a = sample_af(G, y, torch.Generator().manual_seed(3))
    b = sample_af(G, y, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(sample_af(G, y, z=z), G(z, y))
    assert not torch.allclose(a, sample_af(G, y, torch.Generator().manual_seed(4)))


def test_multi_step_sampling_is_the_one_step_transport_repeated():
    G = perturbed(Generator(cfg(nfe=2, pred="v")))
    y, z = torch.tensor([0, 1]), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        manual = G.transport(G.transport(z, y, 1.0, 0.5), y, 0.5, 0.0)
        torch.testing.assert_close(sample_af(G, y, z=z), manual, rtol=0, atol=0)
        # v-prediction: a transport over no time is the identity
        torch.testing.assert_close(G.transport(z, y, 0.5, 0.5), z, rtol=0, atol=0)
    with pytest.raises(ValueError):
        sample_af(G, y, z=z, nfe=3)  # a fixed 2-step model knows only its own grid
    A = perturbed(Generator(cfg(any_step=True, pred="v")))
    with torch.no_grad():
        x = z
        for s, t in zip(time_grid(4)[:-1].tolist(), time_grid(4)[1:].tolist()):
            x = A.transport(x, y, s, t)
        torch.testing.assert_close(sample_af(A, y, z=z, nfe=4), x, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ training + resume
def _data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def _all_tensors(state: AFState) -> dict[str, torch.Tensor]:
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    walk("", state.state_dict())
    return out


def test_training_step_moves_both_networks_and_the_ema():
    c = cfg()
    st = AFState(c, AFTrainConfig(lr_g=1e-3, lr_d=1e-3, ema_decay=0.5))
    g0 = [p.clone() for p in st.generator.parameters()]
    d0 = [p.clone() for p in st.discriminator.parameters()]
    images, labels = _data(8)
    stats = af_train_step(st, images.float() / 127.5 - 1, labels, step_rng(0, 0))
    assert st.step == 1 and st.grad_norm.square_avg > 0
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, st.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, st.discriminator.parameters()))
    for pe, p0, pg in zip(st.ema.parameters(), g0, st.generator.parameters()):
        torch.testing.assert_close(pe, p0 + 0.5 * (pg - p0))


@pytest.mark.parametrize("variant, update", [(dict(), "joint"), (dict(nfe=2, pred="v"), "joint"),
                                             (dict(), "alternate")])
def test_resume_is_bit_identical_and_state_loads_with_weights_only(tmp_path, variant, update):
    c = cfg(**variant)
    tc = AFTrainConfig(lr_g=1e-3, lr_d=1e-3, ema_decay=0.9, ot_decay_steps=6, update=update)
    images, labels = _data()
    full = train_af(c, images, labels, steps=6, batch=8, seed=5, train=tc, show_progress=False, log_every=1)

    path = tmp_path / "state.pt"

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_af(c, images, labels, steps=6, batch=8, seed=5, train=tc, state_path=path, checkpoint_every=3,
                 show_progress=False, on_step=crash, log_every=1)
    saved = torch.load(path, weights_only=True)
    assert saved["state"]["step"] == 3
    resumed = train_af(c, images, labels, steps=6, batch=8, seed=5, train=tc, state_path=path, checkpoint_every=3,
                       show_progress=False, log_every=1)
    a, b = _all_tensors(full), _all_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in resumed.log] == [1, 2, 3, 4, 5, 6]
    drop_time = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert drop_time(resumed.log) == drop_time(full.log)
    # the saved file is the finished run, loadable without unpickling objects
    again = AFState(c, tc, seed=5)
    again.load_state_dict(torch.load(path, weights_only=True)["state"])
    assert again.step == 6 and torch.equal(_all_tensors(again)["/ema/final.linear.weight"],
                                           a["/ema/final.linear.weight"])


def test_alternate_update_gives_d_and_g_their_own_batches_in_stream_order():
    """update alternate: step k's D update reads batch 2k and its G update batch 2k + 1 (the reference's iterations);
    joint: both read batch k. Replayed by hand from the same initial state and step generators."""
    from flowback.data.batches import MemoryBatches

    c = cfg()
    images, labels = _data()
    runs = {}
    for update in ("joint", "alternate"):
        tc = AFTrainConfig(lr_g=1e-3, lr_d=1e-3, ema_decay=0.5, update=update)
        trained = train_af(c, images, labels, steps=2, batch=8, seed=4, train=tc, show_progress=False)
        by_hand, batches = AFState(c, tc, seed=4), MemoryBatches(images, labels, 8, 4)
        for k in range(2):
            bd, bg = (batches.get(2 * k), batches.get(2 * k + 1)) if update == "alternate" else (batches.get(k),) * 2
            rng = step_rng(4, k)
            discriminator_update(by_hand, bd.x, bd.y, rng)
            generator_update(by_hand, bg.x, bg.y, rng)
            by_hand.step += 1
        a, b = _all_tensors(trained), _all_tensors(by_hand)
        assert all(torch.equal(a[k], b[k]) for k in a if "/log" not in k)
        runs[update] = a["/ema/final.linear.weight"]
    assert not torch.equal(runs["joint"], runs["alternate"])
    with pytest.raises(ValueError):
        AFTrainConfig(update="interleaved")


def test_a_state_from_another_run_is_refused(tmp_path):
    c = cfg()
    images, labels = _data()
    path = tmp_path / "state.pt"
    train_af(c, images, labels, steps=1, batch=8, seed=0, state_path=path, show_progress=False)
    with pytest.raises(FlowBackFileError, match="state.pt"):
        load_af_state(path, AFState(c, AFTrainConfig()), {"seed": 1, "batch": 8, "images": 24})
    with pytest.raises(FlowBackFileError, match="state.pt"):
        train_af(cfg(width=24), images, labels, steps=2, batch=8, seed=0, state_path=path, show_progress=False)
    with pytest.raises(FlowBackFileError, match="state.pt"):  # another update order is another run
        train_af(c, images, labels, steps=2, batch=8, seed=0, state_path=path, show_progress=False,
                 train=AFTrainConfig(update="alternate"))


def test_af_bench_cases_sample():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import af as bench_af

    bench_af.CONFIGS["tiny"] = dict(bench_af.CONFIGS["quick"], batch=2)
    try:
        x = bench_af.setup_af("tiny", "cpu", "float32")()
        f = bench_af.setup_flow("tiny", "cpu", "float32")()
    finally:
        del bench_af.CONFIGS["tiny"]
    assert x.shape == f.shape == (2, 1, 16, 16) and torch.isfinite(x).all() and torch.isfinite(f).all()


def test_a_guided_step_trains_through_a_frozen_flow_classifier():
    c = cfg()
    images, labels = _data()
    clf = train_flow_classifier(c, images, labels, steps=2, batch=8, lr=1e-3, show_progress=False)
    assert not any(p.requires_grad for p in clf.parameters())
    before = [p.clone() for p in clf.parameters()]
    st = AFState(c, AFTrainConfig(cg_weight=0.5), classifier=clf)
    stats = af_train_step(st, images[:8].float() / 127.5 - 1, labels[:8], step_rng(0, 0))
    assert stats["cg"] > 0 and math.isfinite(stats["cg"])
    assert all(torch.equal(a, b) for a, b in zip(before, clf.parameters()))
    with pytest.raises(ValueError):
        AFState(c, AFTrainConfig(cg_weight=0.5))  # guidance needs the classifier


def test_af256_profile_is_the_released_1nfe_recipe():
    """profiles/af256.yaml against the released configs (train_afm_1nfe.yaml, dit/b2.yaml, dit/xl2.yaml at 519601d):
    what the reference trains with, counted in FlowBack steps (two released iterations each)."""
    from pathlib import Path

    from flowback.families.af import af_config, af_train_config
    from flowback.params import load_params

    p = load_params(Path(__file__).resolve().parents[1] / "profiles" / "af256.yaml")
    released = AFTrainConfig(lr_g=1e-4, lr_d=1e-4, betas=(0.0, 0.9), eps=1e-8, weight_decay=0.01, ema_decay=0.9999,
                             ot_start=0.2, ot_end=0.005, ot_decay_steps=1_000_000 // 2, gp_weight=0.25,
                             gp_fraction=0.25, gp_eps=0.01, cp_weight=0.01, grad_norm=True, grad_norm_decay=0.9,
                             grad_clip=50.0, min_gap=0.001, update="alternate")
    assert af_train_config(p) == released
    assert p.af.train.batch_size == 256 and p.train.flip and p.sample.per_class == 50
    b2, xl2 = af_config(p.run("af_b2-s0").params), af_config(p.run("af_xl2-s0").params)
    for c, (width, depth, heads) in ((b2, (768, 12, 12)), (xl2, (1152, 28, 16))):
        assert (c.width, c.depth, c.width // c.head_dim, c.patch_size, c.mlp_ratio) == (width, depth, heads, 2, 4)
        assert (c.channels, c.image_size, c.num_classes) == (4, 32, 1000)  # SD-VAE latents of 256 px ImageNet
        assert (c.nfe, c.pred, c.repeat, c.disc_width, c.disc_depth) == (1, "x", 1, None, None)  # D = G's size
