"""Jacobi and GS-Jacobi inversion: the same samples as the sequential solver (same noise, within tolerance), with
guidance too; the sequential fallback of a segment that does not converge; pass counts; GS-Jacobi's metrics."""

import warnings

import pytest
import torch
from conftest import random_flow

from flowback.models.guidance import Guidance
from flowback.models.jacobi import BlockMetrics, JacobiFallbackWarning, Solver, block_metrics, gs_plan
from flowback.models.sampling import SampleStats, sample
from flowback.models.tarflow import FlowConfig, TARFlow
from flowback.models.jacobi import segment_bounds

STAR = {"pos_embed": "rope", "start_token": True, "final_norm": True, "scale": "softplus", "soft_clip": 2.0,
        "cond_token": True}
SOLVERS = {
    "jacobi": Solver("jacobi", tol=1e-6, max_iters=64),
    "jacobi_zeros": Solver("jacobi", tol=1e-6, max_iters=64, init="zeros"),
    "gs_segments": Solver("gs_jacobi", tol=1e-6, segments=(3, 1, 4), max_iters=64, init=("noise", "zeros", "noise")),
    "gs_window": Solver("gs_jacobi", tol=1e-6, window=5, max_iters=64),
}
ML_STARFLOW = {**STAR, "mlp": "geglu", "seq_order": "L2R", "rope_layout": "3d", "rope_order": "sequence",
               "null_class": "learned", "width": 40, "head_dim": 20}
GUIDANCE = [None, Guidance("tarflow", 1.5, anneal=True, attn_temp=0.6), Guidance("starflow", 1.0, blocks="all"),
            Guidance("starflow", 1.0, attn_temp=0.8, attn_temp_on="all")]


def make_model(seed=0, **kw):
    return random_flow(seed, **{"layers": (2, 1, 2), **kw})


def noise(model, n=3, seed=2):
    return torch.randn(n, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(seed))


Y = torch.tensor([0, 3, 4])


@pytest.mark.parametrize("arch", [{}, STAR, ML_STARFLOW], ids=["tarflow", "starflow", "ml_starflow"])
@pytest.mark.parametrize("guidance", GUIDANCE, ids=["unguided", "tarflow", "starflow", "temp_all"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_parallel_solvers_equal_the_sequential_sample(arch, guidance, solver):
    model = make_model(**arch)
    z = noise(model)
    sequential = sample(model, Y, guidance=guidance, z=z)
    stats = SampleStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error", JacobiFallbackWarning)  # these converge without the fallback
        parallel = sample(model, Y, guidance=guidance, z=z, solver=SOLVERS[solver], stats=stats)
    assert (parallel - sequential).abs().max() < 1e-4
    assert sum(stats.fallbacks.values()) == 0
    # a non-trivial flow: its blocks need several passes (an identity flow converges in one)
    assert min(stats.passes.values()) > 2 and set(stats.passes) == {1, 2, 3}


def test_identity_flow_converges_in_one_pass_and_passes_are_bounded_by_the_tokens():
    torch.manual_seed(0)
    identity = TARFlow(FlowConfig(channels=1, image_size=8, patch_size=2, width=16, layers=(1, 1), head_dim=8)).eval()
    z = noise(identity)
    stats = SampleStats()
    x = sample(identity, torch.zeros(3, dtype=torch.long), z=z, solver=Solver("jacobi"),
               stats=stats)
    assert dict(stats.passes) == {1: 1, 2: 1} and torch.allclose(identity.patchify(x), z)
    model = make_model()
    stats = SampleStats()
    sample(model, Y, z=noise(model), solver=Solver("jacobi", tol=1e-30, max_iters=10**6), stats=stats)
    T = model.cfg.num_tokens
    assert all(p <= T for p in stats.passes.values())  # a triangular system: exact after T passes
    assert max(stats.passes.values()) > T // 2


@pytest.mark.parametrize("solver", [Solver("jacobi", tol=1e-6, max_iters=3),
                                    Solver("gs_jacobi", tol=1e-6, segments=2, max_iters=2),
                                    Solver("gs_jacobi", tol=1e-6, window=6, max_iters=2)],
                         ids=["jacobi", "segments", "window"])
@pytest.mark.parametrize("guidance", GUIDANCE[:2], ids=["unguided", "tarflow"])
def test_a_block_that_does_not_converge_falls_back_to_sequential_and_says_so(solver, guidance):
    model = make_model(**STAR)
    z = noise(model)
    sequential = sample(model, Y, guidance=guidance, z=z)
    stats = SampleStats()
    with pytest.warns(JacobiFallbackWarning, match="sequential solver"):
        x = sample(model, Y, guidance=guidance, z=z, solver=solver, stats=stats)
    assert (x - sequential).abs().max() < 1e-5
    assert sum(stats.fallbacks.values()) > 0 and sum(stats.sequential_steps.values()) > 0
    assert sum(stats.sequential_steps.values()) < 3 * model.cfg.num_tokens  # it resumed, it did not start over


def test_segment_bounds_cover_the_tokens_in_order():
    assert segment_bounds(16, 1) == [(0, 16)]
    assert segment_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert segment_bounds(4, 9) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_solver_settings_are_checked():
    with pytest.raises(ValueError, match="solver"):
        Solver("newton")
    with pytest.raises(ValueError, match="segments"):
        Solver("jacobi", segments=4)
    with pytest.raises(ValueError, match="init"):
        Solver("gs_jacobi", init="random")
    with pytest.raises(ValueError, match="entries"):
        Solver("gs_jacobi", segments=(1, 2)).block(1, 3)
    assert Solver("gs_jacobi", segments=(1, 2, 3), max_iters=9).block(3, 3) == {
        "tol": 1e-5, "segments": 3, "max_iters": 9, "init": "noise", "window": 0}


def test_gs_metrics_rank_blocks_and_pick_the_initial_guess():
    model = make_model()
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(4)).clamp(-1, 1)
    metrics = block_metrics(model, x, torch.arange(6) % 5)
    assert [m.block for m in metrics] == [1, 2, 3] and all(m.crm > 0 for m in metrics)
    assert all(set(m.igm) == {"noise", "zeros"} for m in metrics)
    with torch.no_grad():  # a block made much more context-dependent ranks first
        model.blocks[1].proj_out.weight.mul_(4)
    louder = block_metrics(model, x, torch.arange(6) % 5)
    assert louder[1].crm > 2 * max(louder[0].crm, louder[2].crm) and louder[1].crm > 2 * metrics[1].crm
    plan = gs_plan(louder, tough_ratio=2.0, tough_segments=4, tough_max_iters=40, max_iters=7)
    assert plan.segments == (1, 4, 1) and plan.max_iters == (7, 40, 7)
    assert plan.init == tuple(m.best_init for m in louder)
    hand = [BlockMetrics(1, 1.0, {"noise": 0.5, "zeros": 0.1}), BlockMetrics(2, 1.0, {"noise": 0.1, "zeros": 0.5})]
    assert gs_plan(hand).init == ("zeros", "noise") and gs_plan(hand, use_igm=False).init == ("noise", "noise")


def test_a_diverging_iterate_keeps_only_the_exact_tokens_and_falls_back():
    from flowback.models.jacobi import _segment, _sliding

    u = torch.zeros(1, 6, 1)
    calls = []

    def update(j0, j1):  # the second pass overflows in its last token
        out = torch.arange(j0, j1, dtype=torch.float32).view(1, -1, 1) + len(calls)
        calls.append((j0, j1))
        if len(calls) == 2:
            out[:, -1] = float("inf")
        return out

    finished = []
    count = {"passes": 0}
    _segment(0, 6, 10, 1e-6, u, update, None, lambda *a: finished.append(a[:3]), count)
    assert finished == [(0, 2, 6)] and count["passes"] == 2  # two passes: tokens 0 and 1 are exact
    assert u[0, :2, 0].tolist() == [1.0, 2.0] and torch.isfinite(u).all()
    finished.clear()
    calls.clear()
    _sliding(6, 3, 10, 1e-6, torch.zeros(1, 6, 1), update, lambda j: None, lambda *a: finished.append(a[:3]), count)
    assert finished == [(1, 1, 6)]  # the first pass committed token 0, the second diverged
