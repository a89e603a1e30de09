"""Digits AF recipes side by side: each trained, sampled and scored by the pipeline's own stages, as the default
profile's `adversarial_flow` row is, in a scratch results directory.

A params file is written under --work: the embedded default (params.yaml) with every output path moved there, one
thread, and one `family: af` experiment per recipe (its `af:` overrides below; `current` is params.yaml's own af:
section). Then the stages prepare, metricnet and reference once, and train, sample and evaluate per run, one at a
time (`python -m flowback stage NAME`).
Prints (and writes to --work/table_<recipes>.md) FID, sFID, recall, precision, Cond. acc., the last fifth's mean D
loss (ln 2 = 0.693 is a discriminator at chance) and the training wall time.

  python bench/af_digits.py --steps 1500 --seeds 0 --recipes current equal_lr
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# af: overrides over params.yaml's af: section
RECIPES = {
    "current": {},
    "equal_lr": {"train": {"lr_d": 1.0e-3, "update": "alternate"}},  # the released ratio: lr_g = lr_d
    "equal_lr_joint": {"train": {"lr_d": 1.0e-3}},
    "equal_lr_5e4": {"train": {"lr_g": 5.0e-4, "lr_d": 5.0e-4, "update": "alternate"}},
    "equal_lr_2e4": {"train": {"lr_g": 2.0e-4, "lr_d": 2.0e-4, "update": "alternate"}},
    # R1/R2 at the released weight relative to the data's scale: the penalty is on |grad D|^2, and a D separating
    # samples a distance d apart by a fixed logit margin has |grad D| ~ 1/d; E|x - x'|^2 is ~8192 for 4x32x32
    # unit-variance latents and 117 for these digits, so 0.25 x 117 / 8192 = 0.0036 is the released penalty's strength
    "equal_lr_gp": {"train": {"lr_d": 1.0e-3, "update": "alternate", "gp_weight": 0.004}},
    # a higher floor of the OT weight (10x the released end/start ratio): G(z) stays tied to z late in the run
    "equal_lr_ot05": {"train": {"lr_d": 1.0e-3, "update": "alternate", "ot": {"end": 0.05}}},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def write_params(work: Path, recipes: list[str], seeds: list[int], steps: int | None) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["results"] = str(work / "results")
    raw["data"]["root"] = str(work / "data")
    raw["encoder"]["dir"] = str(work / "enc")
    raw["metrics"]["dir"] = str(work / "metric")
    raw["runtime"]["threads"] = 1
    raw["experiments"] = {}
    for r in recipes:
        af = merge(RECIPES[r], {"train": {"steps": steps}} if steps else {})
        raw["experiments"][f"af_{r}"] = {"family": "af", "seeds": seeds, "overrides": {"af": af}}
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage_command(name: str, params: Path, run: str | None) -> list[str]:
    """The stage's command, `python -m flowback stage NAME [RUN]`."""
    return [sys.executable, "-m", "flowback", "stage", name, *([run] if run else []), "--params", str(params), "--quiet"]


def stage(name: str, params: Path, run: str | None = None) -> float:
    cmd = stage_command(name, params, run)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    print(f"  {name} {run or ''}: {done.stdout.strip().splitlines()[-1] if done.stdout.strip() else 'ok'}",
          flush=True)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="af.train.steps (default: params.yaml's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/af_digits"))
    ap.add_argument("--reuse", action="store_true", help="keep --work's prepared data, metric net and reference")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    params = write_params(args.work, args.recipes, args.seeds, args.steps)
    if not (args.reuse and (args.work / "metric" / "reference").exists()):
        for name in ("prepare", "metricnet", "reference"):
            stage(name, params)
    rows = []
    for r in args.recipes:
        for seed in args.seeds:
            run = f"af_{r}-s{seed}"
            seconds = sum(stage(s, params, run) for s in ("train", "sample", "evaluate"))
            d = args.work / "results" / "runs" / run
            m = json.loads((d / "metrics.json").read_text())
            t = json.loads((d / "train.json").read_text())
            wall = json.loads((d / "train_timing.json").read_text())["seconds"]
            rows.append(f"| {r} | {seed} | {m['fid']:.2f} | {m['sfid']:.2f} | {m['recall']:.3f} | "
                        f"{m['precision']:.3f} | {m['cond_acc']:.1f} | {t['final_d_loss']:.3f} | {wall:.0f} | "
                        f"{seconds:.0f} |")
            print(rows[-1], flush=True)
    head = ("| recipe | seed | FID | sFID | recall | precision | Cond. acc. (%) | D loss (last 20%) | train s | "
            "train+sample+eval s |\n|---|---|---|---|---|---|---|---|---|---|")
    recipes = "\n".join(f"- {r}: af: {json.dumps(RECIPES[r])}" for r in args.recipes)
    table = f"{head}\n" + "\n".join(rows) + f"\n\nsteps {args.steps or 'params.yaml'}, 1 thread\n{recipes}\n"
    (args.work / f"table_{'_'.join(args.recipes)}.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
