"""The memory plan: measured on the real step under fake tensors, agrees with torch's own tracker, chooses
accumulation and checkpointing to fit, and refuses what cannot fit with one line naming the run."""

import pytest
import torch
from conftest import ROOT, command, default_raw, write_params

from flowback.params import validate
from flowback.plan.classifier import classifier_pass
from flowback.plan.measure import GIB, PlanError, storage_bytes
from flowback.plan.sample import denoise_pass
from flowback.plan.table import world_size
from flowback.plan.train import plan_train, train_step


def experiment(strategy="none", position=None, budget=None, **train):
    raw = {
        "model": {"patch_size": 2, "width": 64, "blocks": 4, "layers": 2, "head_dim": 16, "mlp_ratio": 2},
        "train": {"batch_size": 16, **train},
        "align": {"projector_dim": 32},
        "encoder": {"arch": "vit_small_patch14_dinov2", "kwargs": {"img_size": 16, "patch_size": 4, "in_chans": 1,
                                                                  "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "runtime": {"gpu_memory_gib": budget},
        "experiments": {"e": {"strategy": strategy, **({"position": position} if position else {})}},
    }
    return validate(raw).run("e-s0")


def test_the_plan_agrees_with_torchs_memory_tracker():
    """An independent count of the same step: torch.distributed._tools.MemTracker under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from flowback.training import align_spec
    from flowback.training import Objective, TrainState

    for strategy, position in (("none", None), ("reverse", "3&4")):
        exp = experiment(strategy, position)
        ours = train_step(exp, 8, False).peak
        with FakeTensorMode():
            state = TrainState(exp, 32, torch.device("cpu"))
            obj = Objective(state.model, state.projectors, align_spec(exp), 0.5)
            x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
            t = torch.randn(8, 64, 32) if strategy != "none" else None

            def step():
                loss, _, _ = obj(x, y, t)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(state.parameters(), 1.0)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)

            step()
            tracker = MemTracker()
            tracker.track_external(state.model, state.projectors, state.optimizer)
            with tracker:
                step()
            theirs = max(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values())
        assert abs(ours - theirs) / theirs < 0.10, (strategy, ours, theirs)


def test_peaks_grow_with_the_micro_batch_and_shrink_with_checkpointing():
    exp = experiment()
    small, large = train_step(exp, 2, False).peak, train_step(exp, 16, False).peak
    assert small < large and train_step(exp, 16, True).peak < large
    assert train_step(exp, 16, False).flops == 8 * train_step(exp, 2, False).flops  # FLOPs scale with the batch
    assert denoise_pass(exp, 4).peak < denoise_pass(exp, 16).peak
    assert classifier_pass(exp, 4).peak < classifier_pass(exp, 16).peak


def test_a_tight_budget_is_met_by_accumulation_then_checkpointing():
    probe = experiment()
    static = storage_bytes(*[torch.zeros(0)])  # nothing: the budgets below are set from measured peaks
    full = train_step(probe, 16, False).peak
    half = train_step(probe, 8, False).peak
    budget = (half + full) / 2 / 0.95 / GIB  # fits micro-batch 8, not 16
    c = plan_train(experiment(budget=budget, micro_batch="auto", checkpointing="auto"), world=1)
    assert (c.value, c.accumulation, c.checkpointing) == (8, 2, False) and static == 0
    tiny = train_step(probe, 16, True).peak / 0.95 / GIB * 1.001  # only checkpointing fits the whole share
    c = plan_train(experiment(budget=tiny, micro_batch="auto", checkpointing="layers"), world=1)
    assert c.checkpointing and c.value * c.accumulation == 16


def test_nothing_fits_is_one_line_naming_the_run():
    with pytest.raises(PlanError, match=r"run 'e-s0': the training step does not fit .* at micro-batch 1"):
        plan_train(experiment(budget=1e-4, micro_batch="auto", checkpointing="auto"), world=1)
    with pytest.raises(PlanError, match="needs runtime.gpu_memory_gib"):
        plan_train(experiment(micro_batch="auto"), world=1)


def test_world_size_reads_the_launcher():
    assert world_size("python") == 1
    assert world_size("torchrun --standalone --nproc_per_node 8") == 8
    assert world_size("srun torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d") == 16


@pytest.mark.parametrize("value", ["0", "-3", "lots", "nan"])
@pytest.mark.slow
def test_a_bad_gpu_memory_is_a_one_line_error(value):
    r = command("-m", "flowback", "plan", "--params", str(ROOT / "params.yaml"), f"--gpu-mem={value}")
    assert r.returncode == 2 and f"--gpu-mem {value!r}" in r.stderr and "e.g. --gpu-mem 80" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_flowback_plan_prints_a_table_and_the_max_peak(tmp_path):
    raw = default_raw()
    raw["experiments"] = {"baseline": {"strategy": "none"}}
    r = command("-m", "flowback", "plan", "--params", str(write_params(tmp_path, raw)), "--gpu-mem", "8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("max peak: ") and lines[-1].endswith("GiB of 8 GiB")
    assert any(line.startswith("| baseline-s0 | train |") for line in lines)
    raw["model"].update(width=4096, head_dim=64, layers=8)  # a model that cannot fit in 8 GiB
    r = command("-m", "flowback", "plan", "--params", str(write_params(tmp_path, raw)), "--gpu-mem", "8")
    assert r.returncode == 2 and "run 'baseline-s0'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--world", "-2"], ["--world", "0"], ["--world", "2.5"], ["--mfu", "0"],
                                  ["--mfu", "-1"], ["--mfu", "40"], ["--mfu", "nan"], ["--peak-tflops", "0"],
                                  ["--peak-tflops", "-989"], ["--peak-tflops", "inf"]])
def test_a_bad_plan_option_is_a_one_line_error(args, capsys):
    """Checked before the params are read or anything is measured: no traceback and no silently wrong plan."""
    from flowback.cli import main

    assert main(["plan", "--params", str(ROOT / "params.yaml"), "--gpu-mem", "80", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flowback: error: {args[0]} {args[1]!r}: expected "), err
