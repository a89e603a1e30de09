"""Stage `table`: render results/tables/ablation.{md,csv} (+ training curves) from every experiment's metrics."""

from __future__ import annotations

import io
import json

from flowback.io import load_json, write_bytes
from flowback.plots import training_curves
from flowback.stage import run_stage
from flowback.tables import ablation_frame, to_markdown


def body(params, _exp, args):
    out = params.results_dir / "tables"
    rows = []
    for name, e in params.experiments.items():
        path = params.run_dir(name) / "metrics.json"
        rows.append({"experiment": name, "strategy": e.strategy, "position": e.position,
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
    logs = {name: params.run_dir(name) / "train_log.csv" for name in params.experiments}
    training_curves({k: v for k, v in logs.items() if v.exists()}, out / "training_curves.png")
    print(to_markdown(df, "Ablation: alignment strategy and position"))


def main(argv=None):
    run_stage("table", body, argv)


if __name__ == "__main__":
    main()
