"""bench/train.py runs end to end and its table holds sane numbers: positive times and rates, MFU in (0, 1), and a
FLOP count that includes the backward pass (at least 6 x weights x tokens x batch)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train as bench_train  # noqa: E402


@pytest.fixture
def tiny_config():
    quick = bench_train.CONFIGS["quick"]
    bench_train.CONFIGS["tiny"] = dict(quick, flow=dict(quick["flow"], image_size=8), batch=4, sample_batch=4)
    yield "tiny"
    del bench_train.CONFIGS["tiny"]


def table_rows(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:6] == ["case", "step time (s)", "images/s", "GFLOP/step", "achieved TFLOP/s", "MFU"]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def test_train_bench_table(tiny_config, capsys):
    rows = bench_train.main(["--config", tiny_config, "--device", "cpu", "--repeat", "1"])
    out = capsys.readouterr().out
    printed = table_rows(out)
    assert [r[0] for r in printed] == ["TARFlow baseline", "R-REPA 7&8", "sampling, KV cache"]
    for r in printed:
        step, ips, gflop, tflops, mfu = (float(v) for v in r[1:6])
        assert step > 0 and ips > 0 and gflop > 0 and tflops > 0, r
        assert 0 < mfu < 1, r
    assert printed[2][7] != "-" and float(printed[2][7]) > 0  # hours for 50K samples

    cfg = bench_train.FlowConfig(**bench_train.CONFIGS[tiny_config]["flow"])
    base, rrepa = rows[0], rows[1]
    six_n = 6 * bench_train.linear_params(cfg) * cfg.num_tokens * base["images"]
    assert base["flops"] >= six_n  # forward (2N) + backward (4N) per token, plus attention
    assert rrepa["flops"] > base["flops"]  # the pseudo-reverse passes and projectors add work
    assert abs(base["images_per_second"] - base["images"] / base["seconds"]) < 1e-9


def test_flop_count_includes_backward():
    setup = lambda: bench_train.setup_step("quick", "cpu", "none", None)  # noqa: E731
    cfg = bench_train.FlowConfig(**bench_train.CONFIGS["quick"]["flow"])
    flops = bench_train.count_flops(setup)
    two_n = 2 * bench_train.linear_params(cfg) * cfg.num_tokens * bench_train.CONFIGS["quick"]["batch"]
    assert flops > 2.5 * two_n  # a forward-only count would be about 2N per token (plus attention)
