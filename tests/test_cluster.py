"""The SLURM profile (profiles/slurm/config.yaml, resources per stage in resources.yaml) matches the stages and asks
for GPUs where they need them."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
RESOURCES = ROOT / "profiles" / "slurm" / "resources.yaml"

# Rules that run on GPUs, and those the Snakefile starts with the params' `launcher` (torchrun: one process per GPU,
# several GPUs on one node).
GPU_RULES = {"encoder", "metricnet", "decoder", "train", "sample", "sweep", "curve", "evaluate", "reference", "calibrate"}
LAUNCHED_RULES = {"train", "sample", "sweep", "curve"}
CPU_RULES = {"prepare", "table"}
# GPU-related resource names the SLURM executor plugin reads (its README, "GPU Jobs"): anything else with "gpu" in
# its name (e.g. "gpus", "num_gpus") would be silently ignored and the job would get no GPU.
PLUGIN_GPU_KEYS = {"gpu", "gpu_model", "gpu_manufacturer", "gres", "cpus_per_gpu", "tasks_per_gpu"}


@pytest.fixture(scope="module")
def profile() -> dict:
    """The profile, with its per-stage resources (the configfile it names) as `set-resources`."""
    prof = yaml.safe_load(PROFILE.read_text())
    assert prof["configfile"] == str(RESOURCES.relative_to(ROOT))
    return {**prof, "set-resources": yaml.safe_load(RESOURCES.read_text())["stage_resources"]}


@pytest.fixture(scope="module")
def rules() -> set[str]:
    """The stages (every instance of one gets its resources)."""
    from flowback.stages import stages

    return set(stages())


def gpus(res: dict) -> int:
    if res.get("gres"):
        m = re.fullmatch(r"'?gpu(?::[\w.]+)?:(\d+)'?", str(res["gres"]))
        return int(m.group(1)) if m else 0
    return int(res.get("gpu", 0) or 0)


def test_profile_uses_the_slurm_executor(profile):
    assert profile["executor"] == "slurm"
    for key in ("jobs", "latency-wait", "retries"):
        assert isinstance(profile[key], int) and profile[key] > 0, key
    for key in ("slurm_partition", "runtime", "mem_mb", "cpus_per_task"):
        assert key in profile["default-resources"], key


def test_every_stage_has_resources_and_every_entry_is_a_stage(profile, rules):
    assert set(profile["set-resources"]) == rules


@pytest.mark.slow
def test_snakemake_gives_every_instance_its_stages_resources(tmp_path):
    """Through the profile's configfile, each rule of an instance gets its stage's resources (a dry run prints them)."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    r = subprocess.run([exe, "-n", "--forceall", "train_baseline_s0", "--configfile", str(RESOURCES)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    train = [line for line in (r.stdout + r.stderr).splitlines() if "resources:" in line and "gpu=8" in line]
    assert train and "mem_mb=480000" in train[0] and "nodes=1" in train[0], (r.stdout + r.stderr)[-3000:]


def test_gpu_rules_request_gpus_and_cpu_rules_do_not(profile):
    res = profile["set-resources"]
    for rule in GPU_RULES:
        assert gpus(res[rule]) >= 1, f"{rule} must request a GPU"
    for rule in LAUNCHED_RULES:
        assert gpus(res[rule]) > 1 and res[rule].get("nodes") == 1, f"{rule}: several GPUs on one node"
    for rule in CPU_RULES:
        assert gpus(res[rule]) == 0, f"{rule} must not request a GPU"
    assert gpus(res["prepare"]) == 0 and res["prepare"]["cpus_per_task"] >= 16


def test_launched_rules_get_one_gpu_per_torchrun_process(profile):
    """train and sample start with params' `launcher`: --nproc_per_node N processes need N GPUs in the job."""
    from flowback.pipeline import Pipeline

    launchers = {}
    for path in sorted((ROOT / "profiles").glob("*.yaml")):
        pipe = Pipeline.load(str(path))
        launcher = pipe.params.runtime.launcher
        for rule in LAUNCHED_RULES:  # the Snakefile (and dvc.yaml) start these with the params' launcher
            for inst in (i for i in pipe.instances if i.stage == rule):
                assert pipe.cmd(inst).startswith(launcher + " -m flowback stage "), (path.name, inst.name)
        launchers[path.name] = launcher
    nprocs = {name: int(m.group(1)) for name, launcher in launchers.items()
              if (m := re.search(r"--nproc[_-]per[_-]node[ =](\d+)", launcher))}
    assert nprocs, "no paper profile starts train/sample under torchrun"
    for rule in LAUNCHED_RULES:
        n = gpus(profile["set-resources"][rule])
        assert set(nprocs.values()) == {n}, f"{rule}: the SLURM profile gives {n} GPUs, launchers start {nprocs}"


def test_gpu_resources_use_the_plugins_names(profile):
    for rule, res in profile["set-resources"].items():
        gpu_keys = {k for k in res if "gpu" in k or k == "gres"}
        assert gpu_keys <= PLUGIN_GPU_KEYS, f"{rule}: {sorted(gpu_keys - PLUGIN_GPU_KEYS)} are not plugin resources"
        assert not ("gpu" in res and "gres" in res), f"{rule}: gpu and gres would pass both --gpus and --gres"
        for key, value in res.items():
            if isinstance(value, str):  # Snakemake evaluates unquoted strings as Python expressions
                assert value[0] == value[-1] and value[0] in "'\"", f"{rule}.{key} must be quoted twice"


def test_the_plugin_turns_the_profile_into_sbatch_gpu_flags(profile):
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")

    class Resources(dict):
        __getattr__ = dict.__getitem__

    def sbatch(rule):
        merged = {**profile["default-resources"], **profile["set-resources"][rule]}
        res = Resources({k: v.strip("'\"") if isinstance(v, str) else v for k, v in merged.items()})
        job = SimpleNamespace(resources=res, threads=1)
        params = dict(run_uuid="u", slurm_logfile="log", comment_str=rule, account="",
                      partition=f"-p {res['slurm_partition']}", workdir="")
        return submit.get_submit_command(job, params) + utils.set_gres_string(job)

    train = sbatch("train")
    assert "--gpus=8" in train and "--nodes=1" in train and "--cpus-per-task=64" in train
    assert "--gpus=1" in sbatch("evaluate")
    assert "--gpus" not in sbatch("prepare") and "--gres" not in sbatch("table")
