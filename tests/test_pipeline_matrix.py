"""Change one param or one module, and both engines plan exactly the stages it affects and everything downstream.

A copy of the pipeline (code, Snakefile, a tiny params.yaml) runs once under DVC; then, for a representative param
of every section and a representative module of every subpackage, `dvc status` (closed downstream over `dvc dag`)
and `snakemake -n ablation_table` must each name exactly the expected instances. The expectations are written by
hand from what each stage does, not computed by flowback.pipeline.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_raw, write_params

B, R = "baseline-s0", "reverse_78-s0"
GLOBAL = {"prepare", "encoder", "metricnet", "reference"}


def runs(*stages, of=(B, R)):
    return {f"{s}_{r}" for s in stages for r in of}


RUN_STAGES = ("train", "sweep", "sample", "evaluate", "probe")
ALL = GLOBAL | {"calibrate"} | runs(*RUN_STAGES) | {"table"}
TRAIN_DOWN = runs(*RUN_STAGES) | {"table"}
REVERSE_DOWN = runs(*RUN_STAGES, of=(R,)) | {"table"}
DRAW_DOWN = runs("sweep", "sample", "evaluate") | {"table"}  # the sweep's choice of scale feeds the samples
SCORED = {"reference", "calibrate"} | DRAW_DOWN  # every stage that computes a metric, and what follows

PARAMS = [  # (key path, new value, expected)
    ("seed", 3, ALL),  # the digits' train/val split
    ("data.val_fraction", 0.25, ALL),
    ("encoder.train.steps", 6, {"encoder"} | REVERSE_DOWN),
    ("metrics.isc_splits", 2, SCORED),
    ("metrics.classifier_split", "train", runs("evaluate") | {"table"}),
    ("model.width", 24, TRAIN_DOWN),
    ("train.steps", 4, TRAIN_DOWN),
    ("align.weight", 0.25, REVERSE_DOWN),  # the baseline does not align: it must not retrain
    ("sample.per_class", 2, DRAW_DOWN),  # the sweep reads the sample section whole: how its samples are drawn
    ("metrics.probe.C", 0.5, runs("probe") | {"table"}),
    ("experiments.reverse_78.position", "7&8 layer 1", REVERSE_DOWN),
    ("runtime.tf32", False, ALL - {"prepare"}),  # every stage that computes with torch
]
MODULES = [  # (file, expected)
    ("flowback/tables.py", {"table"}),
    ("flowback/paper.py", {"table"}),  # params only validates rows against it
    ("flowback/metrics/frechet.py", SCORED),
    ("flowback/data/digits.py", ALL),
    ("flowback/models/sampling.py", DRAW_DOWN),
    ("flowback/training.py", TRAIN_DOWN),
    ("flowback/metrics/probe.py", runs("probe") | {"table"}),
    ("flowback/alignment/loss.py", TRAIN_DOWN),
    ("flowback/models/guidance.py", DRAW_DOWN),  # the sampler's: training never reads it
    ("flowback/families/af.py", set()),  # no adversarial flow in this grid: no flow stage depends on its code
    ("flowback/models/af.py", set()),
    ("flowback/pipeline.py", set()),  # plumbing: what it decides shows in dvc.yaml itself
]


def _env(project: Path) -> dict:
    venv = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv}:{os.environ['PATH']}", "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1"}


def _run(project: Path, *cmd: str) -> str:
    r = subprocess.run(list(cmd), cwd=project, env=_env(project), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the pipeline with a tiny profile, reproduced once by DVC (which also writes the key files)."""
    d = tmp_path_factory.mktemp("matrix")
    shutil.copytree(ROOT / "flowback", d / "flowback", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", d / "Snakefile")
    shutil.copytree(ROOT / "profiles" / "default", d / "profiles" / "default")
    shutil.copytree(ROOT / "report", d / "report")
    raw = tiny_raw(d)
    raw.update(results="results")
    raw["data"]["root"], raw["encoder"]["dir"], raw["metrics"]["dir"] = "results/data", "results/enc", "results/metric"
    write_params(d, raw)
    _run(d, sys.executable, "-m", "flowback", "pipeline")
    _run(d, "dvc", "init", "--no-scm", "-q")
    _run(d, "dvc", "repro", "-q")
    return d


def dvc_plans(project: Path) -> set[str]:
    changed = set(json.loads(_run(project, "dvc", "status", "--json").strip().splitlines()[-1] or "{}"))
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', _run(project, "dvc", "dag", "--dot"), re.MULTILINE)
    out, grew = set(changed), True
    while grew:
        new = {b for a, b in edges if a in out} - out
        out |= new
        grew = bool(new)
    return out


def snakemake_plans(project: Path) -> set[str]:
    exe = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    out = _run(project, exe, "-n", "-p", "ablation_table")
    return {f"{s}_{r}" if r else s
            for s, r in re.findall(r"^Shell command: \S+ -m flowback stage (\w+)(?: ([\w-]+-s\d+))?", out, re.M)}


@pytest.mark.slow
def test_a_reproduced_pipeline_is_clean_under_both_engines(project):
    assert dvc_plans(project) == set() and snakemake_plans(project) == set()


@pytest.mark.slow
@pytest.mark.parametrize("key, value, expected", PARAMS, ids=[p[0] for p in PARAMS])
def test_a_param_change_reruns_exactly_what_reads_it(project, key, value, expected):
    path = project / "params.yaml"
    original = path.read_text()
    raw = yaml.safe_load(original)
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        assert dvc_plans(project) == expected, "dvc"
        assert snakemake_plans(project) == expected, "snakemake"
    finally:
        path.write_text(original)


@pytest.mark.slow
@pytest.mark.parametrize("module, expected", MODULES, ids=[m[0] for m in MODULES])
def test_a_code_change_reruns_exactly_the_stages_that_import_it(project, module, expected):
    path = project / module
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        assert dvc_plans(project) == expected, "dvc"
        assert snakemake_plans(project) == expected, "snakemake"
    finally:
        path.write_text(original)
