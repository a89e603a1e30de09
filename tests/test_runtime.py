"""runtime.configure keeps the thread count params ask for (it changes the numbers) and says, in one line, when a
busy machine would make OpenMP's spinning threads collapse the step time."""

import pytest
import torch

from flowback import runtime
from flowback.params.schema import RuntimeParams


@pytest.mark.parametrize("threads, usable, load, policy, warns", [
    (2, 2, 1.0, None, True),  # one other busy process on 2 cores: the case measured in docs/benchmarks.md
    (2, 2, 1.0, "PASSIVE", False), (2, 2, 1.0, "passive", False),  # sleeping threads do not collapse
    (1, 2, 5.0, None, False),  # one thread has no barrier to spin at
    (2, 2, 0.2, None, False), (2, 8, 3.0, None, False),  # cores to spare
])
def test_the_spin_warning(threads, usable, load, policy, warns):
    w = runtime.spin_warning(threads, usable, load, policy)
    assert (w is not None) == warns
    if warns:
        assert "OMP_WAIT_POLICY=PASSIVE" in w and "runtime.threads: 1" in w and "\n" not in w


def test_configure_keeps_the_threads_and_warns_once(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.5, 1.5, 1.5))
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        runtime.configure(RuntimeParams(device="cpu", threads=2))
        assert torch.get_num_threads() == 2  # not lowered for the load: the numbers depend on it
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flowback: warning: runtime.threads 2 on 2 usable cores")
    finally:
        torch.set_num_threads(before)
