"""The memory plan: measured on the real step under fake tensors, agrees with torch's own tracker, chooses
accumulation and checkpointing to fit, and refuses what cannot fit with one line naming the run."""

import contextlib

import pytest
import torch
from conftest import ROOT, command, default_raw, write_params
from torch._subclasses.fake_tensor import FakeTensorMode

from flowback.params import validate
from flowback.plan.budget import MARGIN
from flowback.plan.classifier import classifier_pass
from flowback.plan.measure import GIB, PlanError
from flowback.plan.sample import denoise_pass
from flowback.plan.table import world_size
from flowback.plan.train import flow_train_step, plan_flow_train


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


@pytest.mark.parametrize("strategy, position", [("none", None), ("reverse", "3&4")])
def test_the_plan_of_two_micro_steps_agrees_with_torchs_memory_tracker(strategy, position):
    """An independent count of the same step: torch.distributed._tools.MemTracker under FakeTensorMode over a whole
    optimizer step of two micro-batches, after a first step (AdamW's state and the last step's gradients resident),
    with the alignment encoder and its cached targets."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from flowback.plan.train import alignment_encoder, in_memory_images
    from flowback.alignment.objective import AlignTargets, Objective, align_spec
    from flowback.training import StepPlan, TrainState, accumulate_gradients

    exp = experiment(strategy, position)  # 16 images per step, on one GPU
    ours = flow_train_step(exp, 1, 8, False).peak  # micro-batch 8 x 2
    with FakeTensorMode():
        spec = align_spec(exp)
        encoder = alignment_encoder(exp, torch.device("cpu")) if spec else None
        state = TrainState(exp, encoder.dim if encoder else 0, torch.device("cpu"))
        obj = Objective.of(exp, state.model, state.projectors)
        x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
        targets = None
        if spec:
            fixed = torch.zeros(in_memory_images(exp), 1, 16, 16, dtype=torch.uint8)
            targets = AlignTargets(encoder, state.model.cfg.grid, torch.device("cpu"), {"device_type": "cpu"}, fixed)
            del fixed
        index = torch.arange(16)
        params = state.parameters()
        tracker = MemTracker()

        def objective(*args):  # MemTracker counts a module called twice only after its per-module stats are reset
            tracker.reset_mod_stats()
            return obj(*args)

        def step():
            t = targets.cache[index] if targets else None
            state.optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(objective, x, y, t, StepPlan(8, 2))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            state.optimizer.step()

        step()
        tracker.track_external(state.model, state.projectors, state.optimizer, x, y, index,
                               *([encoder, targets.cache] if spec else []))
        with tracker:
            step()
        theirs = max(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values())
    print(f"plan {ours} B, MemTracker {theirs} B over two micro-steps ({strategy})")
    assert abs(ours - theirs) / theirs < 0.10, (ours, theirs)


def test_the_ddp_stand_in_holds_what_ddp_holds(tmp_path):
    """plan/ddp.py against DistributedDataParallel(gradient_as_bucket_view=True) itself (gloo, one process): the same
    gradient buffer, the same peak over a step of two micro-batches (a second set of gradients under no_sync), and
    the gradients views of one buffer after it."""
    import torch.distributed as dist
    from torch import nn

    from flowback.plan.ddp import BucketViews
    from flowback.plan.measure import LiveBytes
    from flowback.training import StepPlan, accumulate_gradients

    def run(real: bool):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(4)])
        opt = torch.optim.AdamW(model.parameters())
        ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if real else None
        stand_in = None if real else BucketViews(list(model.parameters()))
        net = ddp if real else model
        x = torch.randn(32, 128)
        for i in range(3):  # DDP rebuilds its buckets after the first step: measure the third
            live = LiveBytes(model, opt)  # the buffer itself is left out on both sides (DDP's is not reachable)
            with live if i == 2 else contextlib.nullcontext():
                opt.zero_grad(set_to_none=True)
                accumulate_gradients(lambda a, b, c: (net(a).pow(2).mean(),) * 3, x, x, None, StepPlan(16, 2),
                                     ddp if real else stand_in)
                opt.step()
        shared = len({p.grad.untyped_storage().data_ptr() for p in model.parameters()})
        sizes = ddp._get_ddp_logging_data()["bucket_sizes"] if real else ""  # bytes per bucket, "a, b, ..."
        buffer = sum(int(v) for v in sizes.split(",")) if real else stand_in.bucket.nbytes
        return live.peak, shared, buffer

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        real = run(True)
    finally:
        dist.destroy_process_group()
    ours = run(False)
    grads = 4 * (128 * 128 + 128) * 4
    assert real[1] == ours[1] == 1 and real[2] == ours[2] == grads, (real, ours)
    assert abs(real[0] - ours[0]) <= 0.01 * real[0] and real[0] > 2 * grads, (real, ours)


def test_peaks_grow_with_the_micro_batch_and_shrink_with_checkpointing():
    exp = experiment()
    small, large = flow_train_step(exp, 1, 2, False).peak, flow_train_step(exp, 1, 16, False).peak
    assert small < large and flow_train_step(exp, 1, 16, True).peak < large
    # a step's FLOPs are those of its 16 images, however they are split into micro-batches
    assert flow_train_step(exp, 1, 16, False).flops == flow_train_step(exp, 1, 2, False).flops > 0
    assert denoise_pass(exp, 4).peak < denoise_pass(exp, 16).peak
    assert classifier_pass(exp, 4).peak < classifier_pass(exp, 16).peak


def gradient_bytes(exp) -> int:
    from flowback.training import TrainState

    with FakeTensorMode():
        return 4 * sum(p.numel() for p in TrainState(exp, 0, torch.device("cpu")).parameters())


def test_accumulation_holds_the_gradients_and_ddp_its_buffer():
    """Micro-batch 2 runs while the first one's gradients are held; on 2 GPUs DDP's buffer is resident too, and
    NCCL's buffers are allowed for."""
    from flowback.plan.budget import NCCL_BUFFERS

    grads = gradient_bytes(experiment())
    one = flow_train_step(experiment(batch_size=8), 1, 8, False)  # 8 images at once
    two = flow_train_step(experiment(batch_size=16), 1, 8, False)  # 2 x 8, one GPU
    assert grads <= two.peak - one.peak <= grads * 1.1, (one, two, grads)
    ddp = flow_train_step(experiment(batch_size=16), 2, 4, False)  # 2 x 4 on each of 2 GPUs
    alone = flow_train_step(experiment(batch_size=8), 1, 4, False)  # the same 2 x 4 on one
    assert abs(ddp.peak - alone.peak - grads) <= 0.02 * grads, (ddp, alone, grads)
    assert ddp.outside - alone.outside == NCCL_BUFFERS


def test_the_ema_is_one_more_copy_of_the_weights():
    weights = gradient_bytes(experiment())  # fp32 weights and gradients have one size
    with_ema = flow_train_step(experiment(ema_decay=0.5), 1, 8, False).peak
    assert with_ema - flow_train_step(experiment(), 1, 8, False).peak == weights


def test_a_tight_budget_is_met_by_accumulation_then_checkpointing():
    probe = experiment()
    full = flow_train_step(probe, 1, 16, False).total
    half = flow_train_step(probe, 1, 8, False).total
    budget = (half + full) / 2 / MARGIN / GIB  # fits micro-batch 8, not 16
    c = plan_flow_train(experiment(budget=budget, micro_batch="auto", checkpointing="auto"), world=1)
    assert (c.value, c.accumulation, c.checkpointing) == (8, 2, False)
    tiny = flow_train_step(probe, 1, 16, True).total / MARGIN / GIB * 1.001  # only checkpointing fits the share
    c = plan_flow_train(experiment(budget=tiny, micro_batch="auto", checkpointing="layers"), world=1)
    assert c.checkpointing and c.value * c.accumulation == 16


def test_nothing_fits_is_one_line_naming_the_run():
    with pytest.raises(PlanError, match=r"run 'e-s0': the training step does not fit .* at micro-batch 1"):
        plan_flow_train(experiment(budget=1e-4, micro_batch="auto", checkpointing="auto"), world=1)
    with pytest.raises(PlanError, match="needs runtime.gpu_memory_gib"):
        plan_flow_train(experiment(micro_batch="auto"), world=1)


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


def test_measurements_made_in_parallel_are_the_ones_the_table_reads(capsys):
    """prefetch measures every distinct configuration in forked processes; the table then measures nothing more,
    and chooses what measuring in order chooses. Seeds share measurements."""
    from flowback.plan import measure
    from flowback.plan.prefetch import prefetch, tasks
    from flowback.plan.table import plan_rows

    raw = {
        "model": {"patch_size": 2, "width": 32, "blocks": 2, "layers": 2, "head_dim": 16, "mlp_ratio": 2},
        "train": {"batch_size": 8, "micro_batch": "auto"}, "align": {"projector_dim": 32},
        "encoder": {"arch": "vit_small_patch14_dinov2", "kwargs": {"img_size": 16, "patch_size": 4, "in_chans": 1,
                                                                  "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "sample": {"micro_batch": "auto", "batch_size": 8}, "metrics": {"classifier_batch_size": 8},
        "experiments": {"a": {"strategy": "none", "seeds": [0, 1]}, "b": {"strategy": "reverse", "position": "2"}},
    }
    b = validate(raw).run("b-s0")  # a budget that fits micro-batch 4 of run b, not 8
    raw["runtime"] = {"gpu_memory_gib": (flow_train_step(b, 1, 4, False).total + flow_train_step(b, 1, 8, False).total)
                      / 2 / MARGIN / GIB}
    params = validate(raw)
    assert tasks(params) == ["a-s0", "b-s0"]  # a-s0 and a-s1 are one configuration
    measure._MEMO.clear()
    prefetch(params, 1, 100, jobs=2)
    held = dict(measure._MEMO)
    capsys.readouterr()
    parallel = plan_rows(params, 1)
    assert measure._MEMO == held and "plan:" not in capsys.readouterr().err  # nothing measured again
    measure._MEMO.clear()
    in_order = plan_rows(params, 1)
    assert [c for c, _ in parallel] == [c for c, _ in in_order]
    assert [(c.run, c.value) for c, _ in in_order if c.stage == "train"] == [("a-s0", 8), ("a-s1", 8), ("b-s0", 4)]
