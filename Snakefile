# Snakemake view of the same pipeline as dvc.yaml: the experiment registry comes from params.yaml and every rule
# runs the same `python -m stages.X` command. `snakemake -j8 ablation_table` runs the ablation grid;
# per-experiment jobs declare `threads: 1` and pass it to torch through OMP_NUM_THREADS so parallel jobs share cores.
from pathlib import Path

configfile: "params.yaml"

RESULTS = config["results"]
DATA = f"results/data/{config['data']['dataset']}"
ENCODER = config["encoder"]["dir"]
METRICNET = config["metrics"]["dir"]
# The reference statistics (stages.reference); the name follows flowback.metrics.reference.reference_name:
# an ADM reference batch's file stem, else <dataset>-<split>.
_REF_BATCH = config["metrics"].get("reference_batch")
REFERENCE_NAME = (Path(_REF_BATCH).stem if _REF_BATCH
                  else f"{config['data']['dataset']}-{config['metrics'].get('reference_split', 'train')}")
REFERENCE = f"{METRICNET}/reference/{REFERENCE_NAME}.npz"
# The metric network's weights: trained by the metricnet rule (DigitNet), or converted by it from the Inception file
# `flowback weights fetch` put in metrics.dir: model.safetensors either way.
METRIC_WEIGHTS = METRICNET + "/model.safetensors"
# How train and sample start: `python`, or `torchrun --standalone --nproc_per_node N` (DDP) in the paper profiles.
LAUNCHER = config.get("launcher", "python")
EXPERIMENTS = list(config["experiments"])
RUN = RESULTS + "/runs/{experiment}"

wildcard_constraints:
    experiment="|".join(EXPERIMENTS)


rule ablation_table:
    input:
        expand(RUN + "/metrics.json", experiment=EXPERIMENTS),
    output:
        RESULTS + "/tables/ablation.md",
        RESULTS + "/tables/ablation.csv",
        RESULTS + "/tables/training_curves.png",
        RESULTS + "/tables/paper.md",
        RESULTS + "/tables/paper.csv",
    shell:
        "python -m stages.table --quiet"


rule prepare:
    output:
        DATA + "/manifest.json",
    shell:
        "python -m stages.prepare --quiet"


rule encoder:
    input:
        DATA + "/manifest.json",
    output:
        ENCODER + "/model.safetensors",
        ENCODER + "/config.json",
    shell:
        "python -m stages.encoder --quiet"


rule metricnet:
    input:
        DATA + "/manifest.json",
    output:
        METRICNET + "/model.safetensors",
        METRICNET + "/config.json",
    shell:
        "python -m stages.metricnet --quiet"


rule reference:
    input:
        DATA + "/manifest.json",
        METRIC_WEIGHTS,
    output:
        REFERENCE,
        METRICNET + "/reference.json",
    shell:
        "python -m stages.reference --quiet"


rule train:
    input:
        DATA + "/manifest.json",
        ENCODER + "/model.safetensors",
    output:
        RUN + "/model.pt",
        RUN + "/train.json",
        RUN + "/train_log.csv",
    threads: 1
    shell:
        f"OMP_NUM_THREADS={{threads}} {LAUNCHER} -m stages.train --experiment {{wildcards.experiment}} --quiet"


rule sample:
    input:
        RUN + "/model.pt",
    output:
        RUN + "/samples.npz",
        RUN + "/samples.png",
        RUN + "/sample.json",
    threads: 1
    shell:
        f"OMP_NUM_THREADS={{threads}} {LAUNCHER} -m stages.sample --experiment {{wildcards.experiment}} --quiet"


rule evaluate:
    input:
        DATA + "/manifest.json",  # the classifier's split
        METRIC_WEIGHTS,
        REFERENCE,
        RUN + "/model.pt",
        RUN + "/samples.npz",
    output:
        RUN + "/metrics.json",
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} python -m stages.evaluate --experiment {wildcards.experiment} --quiet"
