"""What DVC's and Snakemake's own commands show of a reproduced pipeline: plots that render (offline too, one colour
per run), the training metrics in `dvc exp show`, a re-run that leaves git and dvc.lock as they were, a local DVC
remote that gives a fresh clone the trained models, and Snakemake's idioms (a file target plans its run's chain, lint,
report, DAG labels). One tiny pipeline copy in git, like a clone of this repository, reproduced once by DVC.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_raw, write_params

RUNS = {"baseline-s0", "reverse_78-s0"}
CURVES = ("bpd", "loss", "align", "lr", "grad_norm", "val_bpd")  # DVCLive's training curves
SWEEP = 1  # and the guidance sweep's FID by scale
BIN = Path(sys.executable).parent


def _env(project: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _run(project: Path, *cmd: str, ok: bool = True) -> str:
    r = subprocess.run(list(cmd), cwd=project, env=_env(project), capture_output=True, text=True, timeout=900)
    if ok and r.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", pytrace=False)
    return r.stdout + r.stderr


def _snakemake(project: Path, *args: str) -> str:
    return _run(project, shutil.which("snakemake", path=str(BIN)) or "snakemake", *args)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools") / "project"
    shutil.copytree(ROOT / "flowback", d / "flowback", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", ".gitignore"):
        shutil.copy(ROOT / name, d / name)
    for folder in ("profiles/default", "report", "envs"):
        shutil.copytree(ROOT / folder, d / folder)
    raw = tiny_raw(d, train={"val_every": 1})
    raw.update(results="results")
    raw["data"]["root"], raw["encoder"]["dir"], raw["metrics"]["dir"] = "results/data", "results/enc", "results/metric"
    write_params(d, raw)
    _run(d, sys.executable, "-m", "flowback", "pipeline")
    _run(d, "git", "init", "-q")
    _run(d, "dvc", "init", "-q")
    shutil.copytree(ROOT / ".dvc" / "plots", d / ".dvc" / "plots")
    _run(d, "git", "add", "-A")
    _run(d, "git", "commit", "-qm", "the pipeline")
    _run(d, "dvc", "repro", "-q")
    _run(d, "git", "add", "-A")
    _run(d, "git", "commit", "-qm", "reproduced")
    return d


def vega_specs(html: str) -> list[dict]:
    found = re.findall(r"var spec = (.*?);\s*vegaEmbed", html, re.S)
    return [json.loads(s) for s in found]


def check_plots(out: Path) -> None:
    """Every curve a vega spec holding every run's rows, drawn by vega-lite as one line per run, each its own colour;
    the table's PNGs as images beside the page."""
    import vl_convert

    html = (out / "index.html").read_text()
    specs = vega_specs(html)
    assert "var spec = {};" not in html and len(specs) == len(CURVES) + SWEEP
    for spec in specs:
        rows = spec["data"]["values"]
        assert rows, spec["title"]
        # DVC shortens each file name to what the files do not share: `<run>/dvclive/...`, `<run>/sweep.csv`
        assert {re.search(r"(\w+-s\d+)/", r["filename"]).group(1) for r in rows} == RUNS, spec["title"]
        svg = vl_convert.vegalite_to_svg(spec, vl_version="5.21")
        lines = re.findall(r'aria-roledescription="line mark" d="([^"]+)" stroke="([^"]+)"', svg)
        assert len(lines) == len(RUNS) and len({colour for _, colour in lines}) == len(RUNS), spec["title"]
        assert all("L" in path for path, _ in lines)  # lines through several steps
    for png in ("samples.png", "training_curves.png"):
        src = re.search(rf'<img src="(static/[^"]*_{png})"', html)
        assert src and (out / src.group(1)).stat().st_size > 1000, png


@pytest.mark.slow
def test_dvc_plots_show_draws_each_curve_with_a_colour_per_run(project, tmp_path):
    _run(project, "dvc", "plots", "show", "-o", str(tmp_path))
    check_plots(tmp_path)


@pytest.mark.slow
def test_flowback_plots_renders_without_a_network(project, tmp_path):
    _run(project, sys.executable, "-m", "flowback", "plots", "-o", str(tmp_path))
    html = (tmp_path / "index.html").read_text()
    assert "<script src=" not in html and "cdn.jsdelivr" not in html and "window.vegaEmbed=" in html
    check_plots(tmp_path)


@pytest.mark.slow
def test_experiments_show_the_experiments_summaries_and_nothing_per_run(project):
    """The DVC metrics are results: each experiment's summary row (and the calibration); per-run records (train.json,
    DVCLive's metrics.json) are plain outputs, so `dvc exp show` stays one readable table."""
    shown = json.loads(_run(project, "dvc", "exp", "show", "--json").strip().splitlines()[-1])
    metrics = shown[0]["data"]["metrics"]
    for exp in ("baseline", "reverse_78"):
        summary = metrics[f"results/tables/summary/{exp}.json"]["data"]
        written = json.loads((project / "results" / "tables" / "summary" / f"{exp}.json").read_text())
        assert summary == {k: v for k, v in written.items() if v is not None}  # DVC leaves nulls out
        assert summary["fid"] > 0
    assert not [name for name in metrics if "/runs/" in name]
    live = json.loads((project / "results" / "runs" / "baseline-s0" / "dvclive" / "metrics.json").read_text())
    assert set(CURVES) <= set(live) and live["step"] == 3


@pytest.mark.slow
def test_a_rerun_leaves_git_and_dvc_lock_as_they_were(project):
    lock = (project / "dvc.lock").read_bytes()
    _run(project, "dvc", "repro", "-q", "-f", "-s", "train_baseline-s0")
    assert _run(project, "git", "status", "--porcelain").strip() == ""
    assert (project / "dvc.lock").read_bytes() == lock


@pytest.mark.slow
def test_a_run_metrics_file_plans_that_run_s_chain(project):
    assert "Nothing to be done" in _snakemake(project, "-n", "results/runs/baseline-s0/metrics.json")
    out = _snakemake(project, "-n", "--forceall", "results/runs/baseline-s0/metrics.json")
    stats = out[out.index("Job stats"):]
    planned = set(re.findall(r"^(\w+)\s+1$", stats, re.M))
    assert planned == {"prepare", "metricnet", "reference", "train_baseline_s0", "sweep_baseline_s0",
                       "sample_baseline_s0", "evaluate_baseline_s0"}  # no encoder (the baseline aligns nothing),
    # no other run, no calibration, no table


@pytest.mark.slow
def test_targets_before_config_are_kept(project):
    assert "Nothing to be done" in _snakemake(project, "-n", "ablation_table", "--config", "params=params.yaml")


@pytest.mark.slow
def test_snakemake_lint_finds_nothing(project):
    out = _snakemake(project, "--lint")
    assert "Lints for" not in out and "good condition" in out


@pytest.mark.slow
def test_the_report_holds_the_tables_and_figures_with_their_captions(project, tmp_path):
    _snakemake(project, "--report", str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    for name in ("ablation.csv", "samples.png", "training_curves.png"):
        assert name in html
    for caption in ("ablation.rst", "samples.rst"):
        first = (ROOT / "report" / caption).read_text().split(".")[0].split("\n")[0]
        assert first in html, caption


@pytest.mark.slow
def test_dag_boxes_are_labelled_with_rule_names(project):
    labels = re.findall(r'label = "([^"]*)"', _snakemake(project, "ablation_table", "--dag"))
    rules = {f"{s}_{r.replace('-', '_')}" for s in ("train", "sweep", "sample", "evaluate", "probe") for r in RUNS}
    assert set(labels) == rules | {"prepare", "encoder", "metricnet", "reference", "calibrate", "table",
                                   "ablation_table"}


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_trained_models_from_a_local_remote(project, tmp_path):
    _run(project, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    _run(project, "git", "commit", "-qam", "a DVC remote")
    _run(project, "dvc", "push", "-q")
    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert "not in cache" in _run(clone, "dvc", "status")  # models and data are not in git
    _run(clone, "dvc", "pull", "-q")
    assert (clone / "results" / "runs" / "baseline-s0" / "model.pt").is_file()
    assert "Data and pipelines are up to date" in _run(clone, "dvc", "status")
    assert "Nothing to be done" in _snakemake(clone, "-n", "ablation_table")
    assert _run(clone, "git", "status", "--porcelain").strip() == ""


def test_the_rules_conda_env_pins_what_constraints_pins():
    """envs/flowback.yaml (every rule's `conda:`) lists pyproject's dependencies at constraints.txt's versions."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(line.split("#")[0].strip().split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line.split("#")[0])
    env = yaml.safe_load((ROOT / "envs" / "flowback.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    want = []
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        want.append(f"{name}=={pins[name]}" if name in pins else dep.replace(" ", ""))
    assert pip == want
    assert 'conda: "envs/flowback.yaml"' in (ROOT / "Snakefile").read_text()
