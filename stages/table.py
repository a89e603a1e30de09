"""Stage `table`: render results/tables/ablation.{md,csv}, paper.{md,csv} (ours beside the paper's numbers, for every
experiment that names a `paper:` row) and training_curves.png from every experiment's metrics."""

from __future__ import annotations

import io
import json

from flowback.io import load_json, write_bytes
from flowback.plots import training_curves
from flowback.stage import run_stage
from flowback.tables import ablation_frame, paper_frame, paper_markdown, to_markdown


def body(params, _exp, args):
    out = params.results_dir / "tables"
    rows = []
    for name, e in params.experiments.items():
        path = params.run_dir(name) / "metrics.json"
        rows.append({"experiment": name, "strategy": e.strategy, "position": e.position, "paper": e.paper,
                     "metrics": load_json(path) if path.exists() else None})
    df = ablation_frame(rows)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_bytes(out / "ablation.csv", buf.getvalue().encode())
    d = params.data
    note = (f"Profile: {d.dataset} {d.image_size}x{d.image_size}, {params.train.steps} training steps, "
            f"{params.sample.per_class * d.num_classes} samples; FID/sFID/IS with the `{params.metrics.network}` "
            f"feature network against the {params.metrics.reference_split} split; Acc. = training-free classifier "
            f"on the {params.metrics.classifier_split} split.")
    write_bytes(out / "ablation.md", to_markdown(df, "Ablation: alignment strategy and position", note).encode())
    paper = paper_frame(rows)
    buf = io.StringIO()
    paper.to_csv(buf, index=False)
    write_bytes(out / "paper.csv", buf.getvalue().encode())
    if d.dataset == "digits":
        note += (" The embedded default is a toy profile (16x16 digits, minutes of CPU): its numbers are not comparable"
                 " to the paper's ImageNet values; the paper column is there to read trends against.")
    write_bytes(out / "paper.md", paper_markdown(paper, note).encode())
    logs = {name: params.run_dir(name) / "train_log.csv" for name in params.experiments}
    training_curves({k: v for k, v in logs.items() if v.exists()}, out / "training_curves.png")
    print(to_markdown(df, "Ablation: alignment strategy and position"))


def main(argv=None):
    run_stage("table", body, argv)


if __name__ == "__main__":
    main()
