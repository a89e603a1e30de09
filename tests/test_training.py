"""Training: resume equals an uninterrupted run; accumulation and checkpointing give the one-batch gradient; bad
resume states are set aside; non-finite losses stop before anything is saved."""

import pytest
import timm
import torch

from flowback.alignment.encoder import EncoderConfig, FrozenEncoder
from flowback.alignment.objective import AlignTargets, Objective, align_spec
from flowback.checkpoints import load_flow, save_flow
from flowback.data.batches import MemoryBatches, batch_indices
from flowback.io import FlowBackFileError
from flowback.params import validate
from flowback.schedule import learning_rate
from flowback.stages.train import fingerprint
from flowback.training import (
    StepPlan,
    TrainingError,
    TrainState,
    accumulate_gradients,
    checkpoint_layers,
    step_inputs,
    train,
)

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


def logged_fit(exp, run_dir, enc=None, **kw):
    """`fit` writing the curves as the train stage does: train_log.csv and the DVCLive files under `run_dir`."""
    from flowback.io import save_csv
    from flowback.live import LiveLog
    from flowback.stages.train import live_fields

    curves = LiveLog(run_dir, live_fields(exp))

    def on_log(log):
        save_csv(run_dir / "train_log.csv", log)
        curves(log)

    out = fit(exp, run_dir / "state.pt", enc, on_log=on_log, **kw)
    save_csv(run_dir / "train_log.csv", out.log)
    curves.end(out.log)
    return out


def files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.suffix != ".pt"}


def validation_of(exp, n=6):
    from flowback.training import validation_set

    images, labels = data()
    return validation_set(images[:n + 2], labels[:n + 2], n, exp.params.train.seed, exp.params.model.noise_std)


def test_validation_leaves_the_training_unchanged(tmp_path, one_thread):
    """Validation draws from no training stream: the same weights and losses with it on or off."""
    off = experiment("reverse", "7&8", steps=6)
    on = experiment("reverse", "7&8", steps=6, val_every=2)
    enc = encoder()
    a = fit(off, tmp_path / "a.pt", enc)
    b = fit(on, tmp_path / "b.pt", enc, val=validation_of(on))
    for (n, wa), (_, wb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(wa, wb), n
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]
    vals = {r["step"]: r["val_bpd"] for r in b.log}
    assert [s for s, v in vals.items() if v is not None] == [2, 4, 6]
    assert 0 < vals[6] < 20 and vals[2] != vals[6]  # bits/dim of 8-bit data, and it measures the changing model
    assert b.summary["final_val_bpd"] == vals[6] and a.summary["final_val_bpd"] is None


def test_validation_is_a_fixed_subset_with_fixed_noise():
    exp = experiment("none", None)
    v1, v2 = validation_of(exp), validation_of(exp)
    assert torch.equal(v1.x, v2.x) and torch.equal(v1.y, v2.y) and len(v1.x) == 6
    images, _ = data()
    clean = images[:8].float() / 127.5 - 1
    assert not any(torch.equal(x, c) for x in v1.x for c in clean)  # noisy, as the training inputs are


def test_val_every_must_be_a_multiple_of_log_every():
    with pytest.raises(Exception, match="val_every 3 is not a multiple of log_every 2"):
        experiment("none", None, log_every=2, val_every=3)


@pytest.mark.parametrize("strategy, position", [("none", None), ("reverse", "7&8")])
def test_a_resumed_run_writes_the_curves_an_uninterrupted_run_writes(tmp_path, one_thread, strategy, position):
    """train_log.csv and every DVCLive file (tsv curves, metrics.json) come out byte for byte the same, with no
    timestamps, when the run is killed after its last checkpoint and resumed."""
    exp = experiment(strategy, position, val_every=2)
    enc = encoder() if strategy != "none" else None
    val = validation_of(exp)
    logged_fit(exp, tmp_path / "a", enc, val=val)

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        logged_fit(exp, tmp_path / "b", enc, val=val, on_step=crash_at_5)
    resumed = logged_fit(exp, tmp_path / "b", enc, val=val)
    assert resumed.resumed_from == 3
    full, again = files(tmp_path / "a"), files(tmp_path / "b")
    assert full == again
    assert {k for k in full if k.endswith(".tsv")} == {f"dvclive/plots/metrics/{f}.tsv" for f in
                                                       ("bpd", "loss", "align", "lr", "grad_norm", "val_bpd")}
    assert full["dvclive/plots/metrics/bpd.tsv"].decode().splitlines()[0] == "step\tbpd"  # no timestamp column
    assert [line.split("\t")[0] for line in full["dvclive/plots/metrics/val_bpd.tsv"].decode().splitlines()] == \
        ["step", "2", "4", "6", "7"]
    import json

    summary = json.loads(full["dvclive/metrics.json"])
    assert summary["step"] == 7 and summary["val_bpd"] == resumed.summary["final_val_bpd"]


def test_the_curves_leave_the_repository_alone(tmp_path):
    """DVCLive only writes its files: in a git repository without commits or .dvc/ it neither fails nor runs `dvc
    init` (the engine running the stage owns the repository)."""
    import subprocess

    from flowback.live import LiveLog

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    curves = LiveLog(tmp_path / "run", ("loss",))
    curves.end([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert (tmp_path / "run" / "dvclive" / "plots" / "metrics" / "loss.tsv").read_text() == "step\tloss\n1\t2.0\n2\t1.5\n"
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / "dvc.yaml").exists()
