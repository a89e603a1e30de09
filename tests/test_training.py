"""Training: resume after a crash equals an uninterrupted run, bad states and non-finite losses stop clearly."""

import pytest
import timm
import torch

from flowback.alignment import EncoderConfig, FrozenEncoder
from flowback.checkpoints import load_flow, save_flow
from flowback.io import FlowBackFileError
from flowback.params import validate
from flowback.training import TrainingError, batch_indices, learning_rate, train


class Crash(Exception):
    pass


def experiment(strategy="reverse", position="7&8", steps=7, **train_kw):
    raw = {
        "model": {"patch_size": 4, "width": 16, "blocks": 8, "layers": 1, "head_dim": 8, "mlp_ratio": 1},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 3,
                  "log_every": 1, "threads": 1, **train_kw},
        "align": {"weight": 0.5, "projector_dim": 16},
        "experiments": {"e": {"strategy": strategy, **({"position": position} if position else {})}},
    }
    return validate(raw).experiment("e")


def data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def encoder():
    cfg = EncoderConfig(arch="vit_small_patch14_dinov2", kwargs={"img_size": 16, "patch_size": 4, "in_chans": 1,
                        "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}, input_size=16,
                        mean=(0.5,), std=(0.5,))
    torch.manual_seed(3)
    return FrozenEncoder(timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs), cfg)


@pytest.mark.parametrize("strategy, position", [("none", None), ("reverse", "7&8")])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, strategy, position):
    exp = experiment(strategy, position)
    images, labels = data()
    enc = encoder() if strategy != "none" else None
    full = train(exp, images, labels, tmp_path / "a" / "state.pt", enc, show_progress=False)

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(exp, images, labels, tmp_path / "b" / "state.pt", enc, show_progress=False, on_step=crash_at_5)
    resumed = train(exp, images, labels, tmp_path / "b" / "state.pt", enc, show_progress=False)
    assert resumed.resumed_from == 3
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]


def test_state_from_another_configuration_is_not_reused(tmp_path):
    images, labels = data()
    state = tmp_path / "state.pt"
    train(experiment("none", None, steps=3), images, labels, state, show_progress=False)
    out = train(experiment("none", None, steps=4, lr=2e-3), images, labels, state, show_progress=False)
    assert out.resumed_from == 0 and state.with_suffix(".stale").exists()


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_state(tmp_path):
    images, labels = data()
    state = tmp_path / "state.pt"
    exp = experiment("none", None, steps=6)

    def poison(step):
        if step == 3:
            with torch.no_grad():
                blk = poison.model.blocks[0]
                blk.proj_out.bias.fill_(float("nan"))

    import flowback.training as tr

    original = tr.TARFlow

    class Spy(original):
        def __init__(self, cfg):
            super().__init__(cfg)
            poison.model = self

    tr.TARFlow = Spy
    try:
        with pytest.raises(TrainingError, match="non-finite loss at step 4"):
            train(exp, images, labels, state, show_progress=False, on_step=poison)
    finally:
        tr.TARFlow = original
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 3
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_aligned_run_without_an_encoder_is_an_error(tmp_path):
    images, labels = data()
    with pytest.raises(TrainingError, match="no encoder"):
        train(experiment(), images, labels, tmp_path / "s.pt", None, show_progress=False)


def test_batches_walk_epochs_without_repeats():
    seen = torch.cat([batch_indices(s, 10, 4, 0) for s in range(5)])  # 20 draws = exactly 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


def test_learning_rate_warms_up_then_decays_to_min():
    lrs = [learning_rate(s, 1.0, 0.1, 5, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_of_another_config_names_the_file(tmp_path):
    exp = experiment("none", None, steps=1)
    images, labels = data()
    out = train(exp, images, labels, tmp_path / "s.pt", show_progress=False)
    save_flow(tmp_path / "model.pt", out.model)
    from dataclasses import replace

    other = replace(out.model.cfg, width=32)
    with pytest.raises(FlowBackFileError, match="model.pt.*width"):
        load_flow(tmp_path / "model.pt", expected=other)
    model, _ = load_flow(tmp_path / "model.pt", expected=out.model.cfg)
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(out.model.state_dict().values())))
