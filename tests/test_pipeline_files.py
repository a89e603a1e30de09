"""dvc.yaml and the Snakefile are two views of flowback.pipeline: the same instances, commands, params and code; code
dependencies follow meaning (a run depends on its stage's and its family's code, never another family's)."""

import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, command

from flowback.params import load_params
from flowback.pipeline import PLUMBING, Pipeline, PipelineError, check_dvc_file, code_closure, code_deps


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(load_params(ROOT / "params.yaml"))


def test_the_committed_dvc_yaml_is_the_generated_one(pipeline):
    assert check_dvc_file(pipeline, ROOT / "dvc.yaml") is None, "run `python -m flowback pipeline`"


def test_every_stage_module_declares_one_stage_of_its_name():
    from flowback.stages import stages

    modules = {p.stem for p in (ROOT / "flowback" / "stages").glob("*.py") if not p.stem.startswith("_")}
    assert set(stages()) == modules  # including stages only some profiles enable (decoder)
    assert all(name == st.name and st.doc for name, st in stages().items())


def test_every_instance_depends_on_its_stage_and_family_code_and_nothing_else(pipeline):
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for inst in pipeline.instances:
        deps = {d for d in dvc[inst.name]["deps"] if d.startswith("flowback/")}
        closure = set(code_closure(f"flowback.stages.{inst.stage}"))
        for fam in inst.families:
            closure |= set(code_closure(f"flowback.families.{fam}"))
        assert deps == {f for f in closure if f not in PLUMBING and f in code_deps(inst.stage, inst.families)}
        assert f"flowback/stages/{inst.stage}.py" in deps and not deps & PLUMBING, inst.name
        assert dvc[inst.name]["params"] == pipeline.dvc_params(inst)
        for key in inst.reads:  # every key read is tracked, itself or through the section the file holds it in
            assert any(key == k or key.startswith(k + ".") for k in pipeline.dvc_params(inst)) or \
                key.split(".")[0] not in pipeline.raw, (inst.name, key)


def test_the_closure_follows_lazy_and_relative_imports():
    files = set(code_closure("flowback.families.tarflow"))
    # imported inside methods (lazily), through a relative import, and a package's __init__
    assert {"flowback/training.py", "flowback/checkpoints.py", "flowback/families/__init__.py",
            "flowback/data/batches.py", "flowback/plan/train.py", "flowback/plan/measure.py"} <= files
    assert "flowback/tables.py" not in files and "flowback/families/af.py" not in files


def test_a_flow_run_never_depends_on_another_familys_code(pipeline):
    for inst in pipeline.instances:
        if inst.run and inst.cfg.family == "tarflow":
            assert not [f for f in inst.code if "af" in f.rsplit("/", 1)[-1].split("_")[0].split(".")], inst.name
    af = pipeline.instance("train", "adversarial_flow-s0").code
    assert "flowback/families/af.py" in af and "flowback/training.py" not in af


def test_plumbing_and_files_without_code_are_not_dependencies(pipeline):
    every = {f for inst in pipeline.instances for f in inst.code}
    assert not every & PLUMBING
    assert "flowback/data/__init__.py" not in every  # empty: DVC would warn about it
    assert "flowback/alignment/__init__.py" not in every  # a docstring only


def test_an_input_under_results_that_nothing_writes_is_an_error(pipeline, monkeypatch):
    import dataclasses

    from flowback import stages

    found = dict(stages.stages())
    found["evaluate"] = dataclasses.replace(found["evaluate"], inputs=lambda e: [f"{e.run_dir}/sample.npz"])
    monkeypatch.setattr(stages, "stages", lambda: found)  # an input spelled differently from its producer's
    monkeypatch.setattr("flowback.pipeline.stages", lambda: found)
    with pytest.raises(PipelineError, match=r"evaluate_baseline-s0 reads results/runs/baseline-s0/sample\.npz, which no "):
        Pipeline(pipeline.params)


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
    curved = {r for r in aligned if p.run(r).params.train.milestones}
    assert moved == ({f"{s}_{r}" for s in ("train", "sweep", "sample", "evaluate", "probe") for r in aligned}
                     | {f"curve_{r}" for r in curved} | {"table"})


@pytest.mark.slow
def test_snakemake_plans_the_same_instances_and_commands(tmp_path, pipeline):
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    import subprocess

    r = subprocess.run([exe, "-n", "--forceall", "-p", "ablation_table"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    planned = set(re.findall(r"^Shell command: (.*-m flowback stage .*?)(?: 2>&1 \| tee .*)?$", out, re.MULTILINE))
    assert planned == {pipeline.cmd(i) for i in pipeline.instances}
    for rule in ("train_baseline_s0", "prepare", "reference", "table"):
        assert re.search(rf"^{rule}\s+1$", out, re.MULTILINE), rule


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
