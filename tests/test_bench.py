"""The benchmark scripts keep working: their measurement helper, and one step of every case they time computes what
it claims (a finite loss, an alignment term exactly when aligned, updated weights)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import measure  # noqa: E402
import reverse  # noqa: E402
import sampling  # noqa: E402

SMALL = dict(flow=dict(channels=3, image_size=8, patch_size=2, width=32, layers=(2,) * 8, head_dim=16, mlp_ratio=2,
                       num_classes=10), batch=4,
             encoder=dict(kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2), size=16))


def touch_64mib():
    x = torch.ones(16 * 2**20)  # 64 MiB of float32, touched
    return float(x.sum())


def allocate_64mib():
    return touch_64mib


def broken():
    raise ValueError("boom")


def test_measure_reports_time_and_the_peak_of_the_call():
    torch.ones(4096, 4096).sum()  # the parent's thread pool is running, as in a benchmark script: no hang
    r = measure.measure(allocate_64mib, "cpu", warmup=0, repeat=2)
    assert r["seconds"] > 0 and r["median_seconds"] >= r["seconds"]
    assert 48 * 2**20 < r["peak_bytes"] < 256 * 2**20


def test_measure_reports_errors_from_the_child():
    with pytest.raises(RuntimeError, match="boom"):
        measure.measure(broken, "cpu")


@pytest.fixture
def small(monkeypatch):
    """The bench's quick config shrunk (8 px, 2 layers per block): the same code, a fraction of the time."""
    monkeypatch.setitem(reverse.CONFIGS, "quick", SMALL)
    objective, seen = reverse.objective, []

    def recording(model, projectors, *args, **kwargs):
        out = objective(model, projectors, *args, **kwargs)
        before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *projectors.named_parameters()]}
        seen.append((out, before, model, projectors))
        return out

    monkeypatch.setattr(reverse, "objective", recording)
    return seen


def check_step(seen, aligned: bool) -> None:
    (loss, _, align), before, model, projectors = seen[-1]
    assert torch.isfinite(loss) and torch.isfinite(align)
    assert (float(align.detach()) != 0) == aligned  # an alignment term (a negative cosine) exactly when it aligns
    moved = {n for n, p in [*model.named_parameters(), *projectors.named_parameters()] if not torch.equal(p, before[n])}
    assert any(n in moved for n, _ in model.named_parameters())
    assert all(n in moved for n, _ in projectors.named_parameters())  # every projector trains (none: there are none)


@pytest.mark.parametrize("strategy, position, impl", [("none", None, "pseudo"), ("forward", "1&2", "pseudo"),
                                                      ("detach", "7&8", "pseudo"), ("reverse", "7&8", "pseudo"),
                                                      ("reverse", "7&8 layer 2", "naive")])
def test_every_reverse_bench_case_takes_a_step(small, strategy, position, impl):
    reverse.setup_step("quick", "cpu", strategy, position, reverse_impl=impl)()
    check_step(small, strategy != "none")


@pytest.mark.parametrize("grad, impl", [("exact", "pseudo"), ("newest", "pseudo"), ("exact", "naive")])
def test_every_reverse_grad_bench_case_takes_a_step(small, grad, impl):
    reverse.setup_step("quick", "cpu", "reverse", "8 layer 1", reverse_impl=impl, reverse_grad=grad,
                       random_heads=True)()
    check_step(small, True)
    passes = reverse.adjoint_passes("quick", "cpu", grad, 1e-2)
    counts, bound = passes.split(" (")
    assert all(int(c) >= 1 for c in counts.split(", ")) and bound.endswith(")")  # one count per aligned block


def test_sampling_bench_case_samples():
    small = dict(sampling.CONFIGS["quick"], flow=dict(sampling.CONFIGS["quick"]["flow"], image_size=4))
    sampling.CONFIGS["tiny"] = small
    try:
        x = sampling.setup_sample("tiny", "cpu", use_cache=True, dtype="float32", guided=True)()
    finally:
        del sampling.CONFIGS["tiny"]
    assert x.shape == (4, 3, 4, 4) and torch.isfinite(x).all()
