"""The benchmark scripts keep working: their measurement helper and one step of every case they time."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import measure  # noqa: E402
import reverse  # noqa: E402
import sampling  # noqa: E402


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


@pytest.mark.parametrize("strategy, position, impl", [("none", None, "pseudo"), ("forward", "1&2", "pseudo"),
                                                      ("detach", "7&8", "pseudo"), ("reverse", "7&8", "pseudo"),
                                                      ("reverse", "7&8 layer 2", "naive")])
def test_every_reverse_bench_case_takes_a_step(strategy, position, impl):
    step = reverse.setup_step("quick", "cpu", strategy, position, reverse_impl=impl)
    step()


@pytest.mark.parametrize("grad, impl", [("exact", "pseudo"), ("newest", "pseudo"), ("exact", "naive")])
def test_every_reverse_grad_bench_case_takes_a_step(grad, impl):
    reverse.setup_step("quick", "cpu", "reverse", "8 layer 1", reverse_impl=impl, reverse_grad=grad,
                       random_heads=True)()
    assert reverse.adjoint_passes("quick", "cpu", grad, 1e-2).endswith(")")


def test_sampling_bench_case_samples():
    small = dict(sampling.CONFIGS["quick"], flow=dict(sampling.CONFIGS["quick"]["flow"], image_size=4))
    sampling.CONFIGS["tiny"] = small
    try:
        x = sampling.setup_sample("tiny", "cpu", use_cache=True, dtype="float32", guided=True)()
    finally:
        del sampling.CONFIGS["tiny"]
    assert x.shape == (4, 3, 4, 4) and torch.isfinite(x).all()
