"""Stage `train`: train one experiment of the registry (baseline or an aligned variant) on the train split.

Outputs in results/runs/<experiment>/: model.pt (flow config + weights), train.json (metrics), train_log.csv
(curves for `dvc plots`). A killed run resumes from results/runs/<experiment>/.resume/state.pt.
"""

from __future__ import annotations

import csv
import io

import torch

from flowback.alignment import load_encoder
from flowback.builders import encoder_config
from flowback.checkpoints import save_flow
from flowback.data.shards import load_split
from flowback.io import save_json, write_bytes
from flowback.stage import run_stage
from flowback.training import train


def write_log(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["step"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


def body(params, exp, args):
    run_dir = params.run_dir(exp.name)
    images, labels = (torch.from_numpy(a) for a in load_split(params, "train"))
    encoder = None
    if exp.strategy != "none":
        encoder = load_encoder(params.encoder.dir, fallback=encoder_config(params.encoder))
    state = run_dir / ".resume" / "state.pt"
    result = train(exp, images, labels, state, encoder, show_progress=not args.quiet)
    save_flow(run_dir / "model.pt", result.model, experiment=exp.name, strategy=exp.strategy,
              position=exp.position, steps=result.steps)
    write_log(run_dir / "train_log.csv", result.log)
    save_json(run_dir / "train.json", result.summary)
    state.unlink(missing_ok=True)
    s = result.summary
    print(f"{exp.name}: {s['steps']} steps in {s['seconds']:.0f} s, final {s['final_bpd']:.3f} bits/dim"
          + (f", alignment loss {s['final_align']:.3f}" if s["final_align"] is not None else ""))


def main(argv=None):
    run_stage("train", body, argv, per_experiment=True)


if __name__ == "__main__":
    main()
