# Snakemake view of the pipeline in dvc.yaml: both come from flowback.pipeline, which reads params.yaml and the stage
# declarations in flowback/stages/ (same commands, inputs, outputs and params). One rule per stage instance, built in
# one loop; its outputs are the files the stage writes, so any of them is a target:
#   snakemake -j2                                            every stage (as `dvc repro`)
#   snakemake -j2 ablation_table                             what the tables need
#   snakemake -j2 results/runs/baseline-s0/metrics.json      one run's chain, as far as that file
#   snakemake -j2 experiment_reverse_78                      one experiment, every seed
#   snakemake -j2 ablation_table --config params=profiles/imagenet64.yaml
#   snakemake ablation_table --dag | dot -Tsvg > dag.svg     one box per instance, labelled with its rule name
#   snakemake --report report.html                           the tables and figures, with captions from report/
# Targets go before --config and --dag: --config takes every word after it (a target there becomes a bad config
# entry), and --dag would read the next word as its output format.
#
# What reruns is decided by key files, exactly as DVC decides (flowback/pipeline.py): each instance's key hashes its
# command, the params it reads, its code and its upstream keys, and the stage writes <results>/stamps/<name>.<key>.key
# when it finishes (under either engine). That file is one of the rule's outputs, so a changed param or code file
# means a missing output: the instance and everything downstream run, in a fresh clone too. Inputs are ancient() and
# profiles/default sets the rerun triggers to file times only: .snakemake/ history plays no part. Threads come from
# params (runtime.threads), never from the environment. Every rule names envs/flowback.yaml (the pinned dependencies)
# for `--sdm conda`; without it the rules run in the environment snakemake runs in.
import sys
from pathlib import Path

from flowback.errors import FlowBackError
from flowback.params import check_working_directory
from flowback.pipeline import Pipeline

# Run from the checkout (`snakemake -s <clone>/Snakefile` elsewhere would read that directory's params.yaml, write
# results there and run another flowback): one line and exit 2, as the stages do, never a stack.
try:
    if Path.cwd().resolve() != Path(workflow.basedir).resolve():
        raise FlowBackError(f"{workflow.main_snakefile}: run snakemake from {workflow.basedir} (cd there, or pass "
                            f"--directory {workflow.basedir}): params.yaml and the paths in it are relative to the "
                            f"working directory, here {Path.cwd()}")
    P = Pipeline.load(config.get("params", "params.yaml"))
    check_working_directory(P.params, config.get("params", "params.yaml"))
except FlowBackError as _e:
    print(f"snakemake: error: {_e}", file=sys.stderr)
    sys.exit(2)
THREADS = max(1, P.params.runtime.threads)
LOGS = str(P.params.results_dir / "logs")


def rule_name(inst):
    return inst.name.replace("-", "_")


def outputs(inst):
    """The files the engines see the instance write (a directory as such), and its key file. Outputs that must
    persist (fetched weights the stage only checks) are left out: Snakemake deletes a rule's outputs before it runs."""
    files = [directory(p) if P.is_directory(p) else p for p in P.outputs(inst) if p not in inst.outputs.persist]
    return files + [str(P.stamp(inst))]


PERSIST = {p for i in P.instances for p in i.outputs.persist}


def inputs(inst):
    """What the instance reads: its input files (those that persist are not rule outputs: their writer's key file
    stands for them) and the key files of the instances that write them."""
    ups = [P.by_name[u] for u in P.upstream(inst)]
    return [ancient(p) for p in inst.inputs if p not in PERSIST] + [ancient(str(P.stamp(u))) for u in ups]


def report_or_file(inst, path):
    """A file the stage puts in `snakemake --report` (with its caption from report/), or the plain path."""
    caption = inst.outputs.report.get(path)
    return report(path, caption=f"report/{caption}", category="results") if caption else path


RESOURCES = config.get("stage_resources", {})  # per stage, from profiles/slurm/resources.yaml (SLURM runs)


localrules: all, ablation_table


rule all:
    input: [p for i in P.instances for p in outputs(i)]


rule ablation_table:
    input: outputs(P.instance("table"))


for _name in P.params.experiments:
    rule:
        name: f"experiment_{_name}"
        input: [p for i in P.instances if i.run and i.run.rpartition("-s")[0] == _name for p in outputs(i)]


for _inst in P.instances:
    rule:
        name: rule_name(_inst)
        input: inputs(_inst)
        output: [report_or_file(_inst, p) if isinstance(p, str) else p for p in outputs(_inst)]
        log: f"{LOGS}/{_inst.name}.log"
        threads: THREADS if _inst.stage != "table" else 1
        resources: **RESOURCES.get(_inst.stage, {})
        params: cmd=P.cmd(_inst)
        conda: "envs/flowback.yaml"
        shell: "{params.cmd} 2>&1 | tee {log}"
