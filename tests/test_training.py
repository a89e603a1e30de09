"""Training: resume equals an uninterrupted run; accumulation and checkpointing give the one-batch gradient; bad
resume states are set aside; non-finite losses stop before anything is saved."""

import pytest
import timm
import torch

from flowback.alignment.encoder import EncoderConfig, FrozenEncoder
from flowback.stages.train import fingerprint
from flowback.training import align_spec
from flowback.checkpoints import load_flow, save_flow
from flowback.data.batches import MemoryBatches, batch_indices
from flowback.io import FlowBackFileError
from flowback.params import validate
from flowback.training import (AlignTargets, Objective, StepPlan, TrainingError, TrainState, accumulate_gradients,
                               checkpoint_layers, step_inputs, train)
from flowback.schedule import learning_rate

CPU = torch.device("cpu")


class Crash(Exception):
    pass


def experiment(strategy="reverse", position="7&8", steps=7, **train_kw):
    raw = {
        "model": {"patch_size": 4, "width": 16, "blocks": 8, "layers": 2, "head_dim": 8, "mlp_ratio": 1},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 3,
                  "log_every": 1, **train_kw},
        "align": {"weight": 0.5, "projector_dim": 16},
        "runtime": {"threads": 1},
        "experiments": {"e": {"strategy": strategy, **({"position": position} if position else {})}},
    }
    return validate(raw).run("e-s0")


def data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def encoder():
    cfg = EncoderConfig(arch="vit_small_patch14_dinov2", kwargs={"img_size": 16, "patch_size": 4, "in_chans": 1,
                        "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}, input_size=16,
                        mean=(0.5,), std=(0.5,))
    torch.manual_seed(3)
    return FrozenEncoder(timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs), cfg)


def fit(exp, state_path, enc=None, **kw):
    images, labels = data()
    batches = MemoryBatches(images, labels, exp.params.train.batch_size, exp.params.train.seed)
    return train(exp, batches, state_path, fingerprint(exp), CPU, encoder=enc, fixed_images=images, show_progress=False, **kw)


@pytest.mark.parametrize("strategy, position", [("none", None), ("reverse", "7&8")])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, one_thread, strategy, position):
    exp = experiment(strategy, position)
    enc = encoder() if strategy != "none" else None
    full = fit(exp, tmp_path / "a" / "state.pt", enc)

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        fit(exp, tmp_path / "b" / "state.pt", enc, on_step=crash_at_5)
    resumed = fit(exp, tmp_path / "b" / "state.pt", enc)
    assert resumed.resumed_from == 3
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]


def one_step_grads(exp, plan, checkpointing=False, enc=None):
    """Parameter gradients of step 0 of `exp` taken with `plan` (the training loop's own pieces)."""
    images, labels = data()
    spec = align_spec(exp)
    state = TrainState(exp, enc.dim if enc else 0, CPU)
    if checkpointing:
        checkpoint_layers(state.model)
    batch = MemoryBatches(images, labels, exp.params.train.batch_size, exp.params.train.seed).get(0)
    x, y = step_inputs(batch, 0, exp, 0, 1)
    targets = AlignTargets(enc, state.model.cfg.grid, CPU, {"device_type": "cpu", "enabled": False},
                           images)(batch) if spec else None
    obj = Objective(state.model, state.projectors, spec, exp.params.align.weight)
    stats = accumulate_gradients(obj, x, y, targets, plan)
    named = list(state.model.named_parameters()) + list(state.projectors.named_parameters())
    clean = lambda n: n.replace("._checkpoint_wrapped_module", "")  # noqa: E731  (the wrapper's own prefix)
    return stats, {clean(n): p.grad.clone() for n, p in named if p.grad is not None}


STRATEGIES = [("none", None), ("forward", "1&2"), ("detach", "7&8"), ("reverse", "7&8 layer 1"), ("reverse", "all")]


@pytest.mark.parametrize("strategy, position", STRATEGIES)
def test_accumulated_micro_batches_give_the_one_batch_gradient(one_thread, strategy, position):
    exp = experiment(strategy, position)
    enc = encoder() if strategy != "none" else None
    stats_1, whole = one_step_grads(exp, StepPlan(8, 1), enc=enc)
    stats_4, parts = one_step_grads(exp, StepPlan(2, 4), enc=enc)
    assert whole.keys() == parts.keys() and len(whole) > 10
    for n in whole:
        assert torch.allclose(whole[n], parts[n], rtol=1e-4, atol=1e-6), n
    assert torch.allclose(stats_1, stats_4, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 1e-4 for g in whole.values())  # a real gradient, not zeros everywhere


@pytest.mark.parametrize("strategy, position", [("none", None), ("reverse", "7&8 layer 1"), ("forward", "all")])
def test_activation_checkpointing_gives_the_same_gradient(one_thread, strategy, position):
    exp = experiment(strategy, position)
    enc = encoder() if strategy != "none" else None
    _, plain = one_step_grads(exp, StepPlan(8, 1), enc=enc)
    _, ckpt = one_step_grads(exp, StepPlan(8, 1), checkpointing=True, enc=enc)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7), n


def test_checkpointed_model_saves_the_same_keys():
    exp = experiment("none", None)
    a, b = TrainState(exp, 0, CPU), TrainState(exp, 0, CPU)
    checkpoint_layers(b.model)
    assert list(a.model.state_dict()) == list(b.model.state_dict())


def test_a_plan_that_does_not_cover_the_batch_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="does not cover the per-rank batch"):
        fit(experiment("none", None, steps=1), tmp_path / "s.pt", plan=StepPlan(3, 2))


def test_state_from_another_configuration_is_set_aside(tmp_path, capsys):
    state = tmp_path / "state.pt"
    fit(experiment("none", None, steps=3), state)
    out = fit(experiment("none", None, steps=4, lr=2e-3), state)
    assert out.resumed_from == 0 and (tmp_path / "state.pt.stale").exists()
    assert "saved by another configuration" in capsys.readouterr().out


@pytest.mark.parametrize("damage", [b"", b"not a checkpoint at all", None])
def test_an_unreadable_resume_state_is_set_aside_with_a_message(tmp_path, capsys, damage):
    state = tmp_path / "state.pt"
    fit(experiment("none", None, steps=3), state)
    state.write_bytes(damage if damage is not None else state.read_bytes()[:200])
    out = fit(experiment("none", None, steps=3), state)
    assert out.resumed_from == 0 and (tmp_path / "state.pt.corrupt").exists()
    assert "cannot be read" in capsys.readouterr().out


def test_changing_how_steps_are_computed_keeps_the_resume_state(tmp_path):
    state = tmp_path / "state.pt"

    def crash_at_3(step):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        fit(experiment("none", None, steps=5), state, on_step=crash_at_3)
    out = fit(experiment("none", None, steps=5, micro_batch=4, log_every=2), state)
    assert out.resumed_from == 3


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_state(tmp_path):
    state = tmp_path / "state.pt"
    exp = experiment("none", None, steps=6)

    def poison(step):
        if step == 3:
            with torch.no_grad():
                poison.model.blocks[0].proj_out.bias.fill_(float("nan"))

    import flowback.training as tr

    original = tr.TARFlow

    class Spy(original):
        def __init__(self, cfg):
            super().__init__(cfg)
            poison.model = self

    tr.TARFlow = Spy
    try:
        with pytest.raises(TrainingError, match="non-finite loss at step 4"):
            fit(exp, state, on_step=poison)
    finally:
        tr.TARFlow = original
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 3
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_aligned_run_without_an_encoder_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="no encoder"):
        fit(experiment(), tmp_path / "s.pt", None)


def test_batches_walk_epochs_without_repeats():
    seen = torch.cat([batch_indices(s, 10, 4, 0) for s in range(5)])  # 20 draws = exactly 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


def test_learning_rate_warms_up_then_decays_to_min():
    lrs = [learning_rate(s, 1.0, 0.1, 5, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_of_another_config_names_the_file(tmp_path):
    out = fit(experiment("none", None, steps=1), tmp_path / "s.pt")
    save_flow(tmp_path / "model.pt", out.model)
    from dataclasses import replace

    other = replace(out.model.cfg, width=32)
    with pytest.raises(FlowBackFileError, match="model.pt.*width"):
        load_flow(tmp_path / "model.pt", expected=other)
    model, _ = load_flow(tmp_path / "model.pt", expected=out.model.cfg)
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(out.model.state_dict().values())))
    assert not any(p.requires_grad for p in model.parameters())  # inference: no parameter gradients
