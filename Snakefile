# Snakemake view of the pipeline in dvc.yaml: both come from flowback.pipeline, which reads params.yaml and the
# stages' declarations in flowback/jobs/ (same commands, same inputs, same params). `snakemake -j8 ablation_table`
# runs the whole grid; `snakemake -j2 experiment_<name>` one experiment (every seed); another params file:
# `snakemake --config params=profiles/imagenet64.yaml ...`.
#
# What reruns is decided by key files, exactly as DVC decides (see flowback/pipeline.py): each stage instance's key
# hashes its command, the params it reads, its code and its upstream keys, and the stage writes
# <results>/stamps/<instance>.<key>.key when it finishes (under either engine). A rule's output is that file, so a
# changed param or code file means a missing key file: the instance and everything downstream run, in a fresh clone
# too. Inputs are ancient() and profiles/default turns off Snakemake's metadata triggers: file times and
# .snakemake/ history play no part. Threads come from params (runtime.threads), never from the environment.
from flowback.pipeline import Pipeline

P = Pipeline.load(config.get("params", "params.yaml"))
THREADS = max(1, P.params.runtime.threads)
RUNS = P.params.runs()
STAMPS = str(P.params.results_dir / "stamps")


def stamp(stage, run=None):
    return str(P.stamp(P.instance(stage, run)))


def needs(stage, run=None):
    """The key files of the instances this one reads the outputs of."""
    inst = P.instance(stage, run)
    return [ancient(str(P.stamp(P.by_name[u]))) for u in P.upstream(inst)]


localrules: ablation_table


wildcard_constraints:
    run="|".join(RUNS) or "-",
    key="[0-9a-f]{16}",


rule ablation_table:
    input:
        stamp("table"),


for _name in P.params.experiments:
    rule:
        name: f"experiment_{_name}"
        input: [str(P.stamp(i)) for i in P.instances if i.stage in ("evaluate", "probe") and i.run.rpartition("-s")[0] == _name]


rule prepare:
    input: lambda w: needs("prepare")
    output: f"{STAMPS}/prepare.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("prepare"))
    shell: "{params.cmd}"


rule encoder:
    input: lambda w: needs("encoder")
    output: f"{STAMPS}/encoder.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("encoder"))
    shell: "{params.cmd}"


rule metricnet:
    input: lambda w: needs("metricnet")
    output: f"{STAMPS}/metricnet.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("metricnet"))
    shell: "{params.cmd}"


rule reference:
    input: lambda w: needs("reference")
    output: f"{STAMPS}/reference.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("reference"))
    shell: "{params.cmd}"


rule decoder:
    input: lambda w: needs("decoder")
    output: f"{STAMPS}/decoder.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("decoder"))
    shell: "{params.cmd}"


rule train:
    input: lambda w: needs("train", w.run)
    output: f"{STAMPS}/train_{{run}}.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("train", w.run))
    shell: "{params.cmd}"


rule sample:
    input: lambda w: needs("sample", w.run)
    output: f"{STAMPS}/sample_{{run}}.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("sample", w.run))
    shell: "{params.cmd}"


rule evaluate:
    input: lambda w: needs("evaluate", w.run)
    output: f"{STAMPS}/evaluate_{{run}}.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("evaluate", w.run))
    shell: "{params.cmd}"


rule probe:
    input: lambda w: needs("probe", w.run)
    output: f"{STAMPS}/probe_{{run}}.{{key}}.key"
    threads: THREADS
    params: cmd=lambda w: P.cmd(P.instance("probe", w.run))
    shell: "{params.cmd}"


rule table:
    input: lambda w: needs("table")
    output: f"{STAMPS}/table.{{key}}.key"
    threads: 1
    params: cmd=lambda w: P.cmd(P.instance("table"))
    shell: "{params.cmd}"
