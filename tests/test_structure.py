"""The house's shape: no import cycles, no family branch outside the family registry, and extending it is what
docs/contributing.md says - a toy model family and a toy stage, each one file in a copy of the project, are planned by
both engines."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_raw, write_params

from flowback.pipeline import _import_table


def modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "flowback").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the flowback modules it imports (all of its imports, or only those that run when it is imported)."""
    mods, graph = modules(), {}
    for name, path in mods.items():
        imported = _top_level(path, name) if top_level_only else [m for m, _ in _import_table(path, name)]
        targets = set()
        for target in imported:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _top_level(path: Path, module: str) -> list[str]:
    """What `import module` imports at once: its module-level imports (not those inside functions or TYPE_CHECKING)."""
    import ast

    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(import_graph(top_level_only=True)) == []


def test_lazy_imports_make_no_cycle_between_packages():
    """Imports inside functions count too: the only loop allowed is inside flowback/params, where the schema's
    Params.run() hands over to grid.py (which is built on the schema) - one idea split over two files, not a layering
    violation. Anything else (a library module reaching back into a stage, as training.py once did) fails here."""
    allowed = {frozenset({"flowback.params.schema", "flowback.params.grid", "flowback.params.loading"})}
    assert [c for c in cycles(import_graph(top_level_only=False)) if frozenset(c) not in allowed] == []


def test_no_family_branch_outside_the_family_registry():
    pattern = re.compile(r"family\s*==")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "flowback").rglob("*.py")
                 if "families" not in p.parts for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []


TOY_FAMILY = '''"""A toy model family for tests: each class's mean training image, plus noise."""

from __future__ import annotations

from .base import Family, Sampled, Trained


class ToyFamily(Family):
    name = "toy"
    has_likelihood = False

    def label(self, p, spec):
        return "Toy (class means)"

    def describe(self, e):
        return "toy      -              class means"

    def model_reads(self, e):
        return ["data.dataset", "data.classes"]

    def train_reads(self, e):
        from ..data.manifest import data_reads

        return ["train.seed", *data_reads(e.params)]

    def train(self, e, device, rank, world, fingerprint, progress, on_log):
        import numpy as np

        from ..data.manifest import load_split
        from ..io import save_npz

        images, labels = load_split(e.params, "train")
        means = np.stack([images[labels == k].mean(0) for k in range(e.params.data.num_classes)])
        save_npz(e.run_dir / "model.pt", means=means)
        return Trained({"classes": len(means)}, [{"step": 1}], {}, f"{e.run}: {len(means)} class means")

    def sample_reads(self, e):
        return ["sample.per_class", "sample.count", "sample.labels", "sample.seed", "data.dataset", "data.classes"]

    def sample(self, e, device, rank, progress, guidance_weight=None, count=None, seed=None, chunks="chunks",
               checkpoint=None):
        import numpy as np

        from ..io import load_npz
        from ..sampler import sample_labels

        sp = e.params.sample
        means = load_npz(checkpoint or e.checkpoint)["means"]
        labels = sample_labels(e.params.data.num_classes, sp.per_class, sp.labels, sp.seed, count or sp.count)
        noise = np.random.default_rng(seed or sp.seed).normal(0, 8, (len(labels), *means.shape[1:]))
        images = np.clip(means[labels] + noise, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return Sampled(images, labels, {"count": len(images), "family": "toy"}, {"seconds": 0.0})


FAMILY = ToyFamily()
'''

TOY_STAGE = '''"""Stage `toy`: the mean pixel of one run's samples (a test of the stage registry)."""

from __future__ import annotations

from . import Outputs, Stage


def run(e, progress=True):
    import numpy as np

    from ..io import load_npz, save_json

    mean = float(load_npz(e.run_dir / "samples.npz")["arr_0"].mean())
    save_json(e.run_dir / "toy.json", {"mean_pixel": mean})
    return f"{e.run}: mean pixel {mean:.1f}"


STAGE = Stage(name="toy", doc="the mean pixel of a run's samples", reads=lambda e: ["results"],
              inputs=lambda e: [f"{e.run_dir}/samples.npz"], outputs=lambda e: Outputs(metrics=[f"{e.run_dir}/toy.json"]),
              run=run, per_run=True)
'''


@pytest.mark.slow
def test_a_toy_family_and_a_toy_stage_are_one_file_each_and_both_engines_plan_them(tmp_path):
    d = tmp_path / "project"
    shutil.copytree(ROOT / "flowback", d / "flowback", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", "profiles", "report"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, d / name)
    (d / "flowback" / "families" / "toy.py").write_text(TOY_FAMILY)
    (d / "flowback" / "stages" / "toy.py").write_text(TOY_STAGE)
    raw = tiny_raw(d, experiments={"baseline": {"strategy": "none"}, "means": {"family": "toy"}})
    raw.update(results="results")
    raw["data"]["root"], raw["encoder"]["dir"], raw["metrics"]["dir"] = "results/data", "results/enc", "results/metric"
    write_params(d, raw)
    env = {**os.environ, "PYTHONPATH": str(d), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd):
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        return r.stdout + r.stderr

    run(sys.executable, "-m", "flowback", "pipeline")
    stages = yaml.safe_load((d / "dvc.yaml").read_text())["stages"]
    assert {"train_means-s0", "sample_means-s0", "evaluate_means-s0", "toy_means-s0", "toy_baseline-s0"} <= set(stages)
    assert "probe_means-s0" not in stages and "sweep_means-s0" not in stages  # no likelihood, no guidance
    assert "flowback/families/toy.py" in stages["train_means-s0"]["deps"]
    assert "flowback/families/toy.py" not in stages["train_baseline-s0"]["deps"]  # a flow run holds no toy code
    planned = run("snakemake", "-n", "-p")  # the default target: every instance, as `dvc repro`
    for name in ("train_means_s0", "toy_means_s0", "toy_baseline_s0"):
        assert re.search(rf"^{name}\s+1$", planned, re.M), name
    run("dvc", "init", "--no-scm", "-q")
    dag = run("dvc", "dag", "--dot")
    assert '"sample_means-s0" -> "toy_means-s0"' in dag
    assert "means-s0" in run(sys.executable, "-m", "flowback", "check")  # the grid lists it through its family
