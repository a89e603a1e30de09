"""dvc.yaml and the Snakefile are two views of flowback.pipeline: the same instances, commands, params and code."""

import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, command

from flowback.params import load_params
from flowback.pipeline import Pipeline, check_dvc_file, code_closure, stage_code


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(load_params(ROOT / "params.yaml"))


def test_the_committed_dvc_yaml_is_the_generated_one(pipeline):
    assert check_dvc_file(pipeline, ROOT / "dvc.yaml") is None, "run `python -m flowback pipeline`"


def test_every_stage_has_its_command_line():
    from flowback.jobs import NAMES

    for name in NAMES:  # including stages that only some profiles enable (decoder)
        text = (ROOT / "stages" / f"{name}.py").read_text()
        assert f'main("{name}")' in text, name


def test_every_stage_depends_on_its_whole_import_closure(pipeline):
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for inst in pipeline.instances:
        deps = set(dvc[inst.name]["deps"])
        assert set(stage_code(inst.stage)) <= deps, inst.name
        assert f"flowback/jobs/{inst.stage}.py" in deps and f"stages/{inst.stage}.py" in deps
        assert dvc[inst.name]["params"] == pipeline.dvc_params(inst)
        for key in inst.reads:  # every key read is tracked, itself or through the section the file holds it in
            assert any(key == k or key.startswith(k + ".") for k in pipeline.dvc_params(inst)) or \
                key.split(".")[0] not in pipeline.raw, (inst.name, key)


def test_the_closure_follows_lazy_and_relative_imports():
    files = set(code_closure("flowback.jobs.train"))
    # imported inside run() (lazily), through a relative import, and a package's __init__
    assert {"flowback/training.py", "flowback/checkpoints.py", "flowback/jobs/__init__.py",
            "flowback/data/batches.py", "flowback/plan/train.py", "flowback/plan/measure.py"} <= files
    assert "flowback/tables.py" not in files and "flowback/models/sampling.py" not in files


def test_a_baseline_run_does_not_depend_on_alignment_params(pipeline):
    reads = pipeline.instance("train", "baseline-s0").reads
    assert "align" not in reads and "encoder" not in reads
    assert "align" in pipeline.instance("train", "reverse_78-s0").reads


def test_keys_chain_down_the_pipeline(pipeline):
    p = pipeline.params
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["align"]["weight"] = 0.25
    changed = Pipeline(p.model_copy(update={"align": p.align.model_copy(update={"weight": 0.25})}), raw=raw)
    moved = {i.name for i in pipeline.instances if pipeline.key(i.name) != changed.key(i.name)}
    aligned = {r for r in p.runs() if p.run(r).strategy != "none"}
    assert moved == {f"{s}_{r}" for s in ("train", "sample", "evaluate", "probe") for r in aligned} | {"table"}


@pytest.mark.slow
def test_snakemake_plans_the_same_instances_and_commands(tmp_path, pipeline):
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    import subprocess

    r = subprocess.run([exe, "-n", "--forceall", "-p", "ablation_table"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    planned = set(re.findall(r"^Shell command: (.*-m stages\.\w+.*)$", out, re.MULTILINE))
    assert planned == {pipeline.cmd(i) for i in pipeline.instances}
    for rule, count in (("train", len(pipeline.params.runs())), ("prepare", 1), ("reference", 1), ("table", 1)):
        assert re.search(rf"^{rule}\s+{count}$", out, re.MULTILINE), rule


@pytest.mark.slow
def test_flowback_pipeline_check_says_when_dvc_yaml_is_stale(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["experiments"]["extra"] = {"strategy": "none"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    r = command("-m", "flowback", "pipeline", "--check", cwd=tmp_path)
    assert r.returncode == 2 and "dvc.yaml is out of date" in r.stderr and "extra" in r.stderr
    assert command("-m", "flowback", "pipeline", cwd=tmp_path).returncode == 0
    assert command("-m", "flowback", "pipeline", "--check", cwd=tmp_path).returncode == 0


def test_dvc_exp_run_set_param_changes_only_that_line(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml through DVC's YAML round-trip: the file's layout must survive it
    (block style, no flow mappings or quotes that DVC would re-wrap)."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    with modify_yaml(str(path)) as d:
        d["align"]["weight"] = 0.25
        d["experiments"]["reverse_78"]["position"] = "7&8 layer 2"
    before, after = (ROOT / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 2, changed
    assert "weight: 0.25" in changed[0][1] and "position: 7&8 layer 2" in changed[1][1]
