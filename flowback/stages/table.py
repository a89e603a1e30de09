"""Stage `table`: results/tables/ablation.{md,csv} (one row per experiment, mean ± std over its seeds), paper.{md,csv}
(ours beside the paper's numbers for every experiment that names a `paper:` row), training_curves.png and
samples.png (one panel of samples per experiment, titled with its FID and class fidelity)."""

from __future__ import annotations

from ..families import family
from ..params import Params
from . import Outputs, Stage

NOTE_KEYS = ["data.dataset", "data.image_size", "data.classes", "train.steps", "train.seed", "sample.per_class",
             "metrics.network", "metrics.reference_split", "metrics.reference_batch", "metrics.classifier_split",
             "metrics.probe.enabled", "af.nfe"]


def reads(p: Params) -> list[str]:
    return ["experiments", "results", "align.layer_base", *NOTE_KEYS]


def inputs(p: Params) -> list[str]:
    out = []
    for r in p.runs():
        name = r.rpartition("-s")[0]
        out += [f"{p.run_dir(r)}/{f}" for f in ("metrics.json", "samples.npz")]
        out += [f"{p.run_dir(r)}/train_log.csv"] if p.experiments[name].milestone is None else []
        out += [f"{p.run_dir(r)}/probe.json"] if _probed(p, r) else []
    return out


def _probed(p: Params, run: str) -> bool:
    return p.metrics.probe.enabled and family(p.trained_as(run.rpartition("-s")[0]).family).has_likelihood


def _metrics(p: Params, run: str) -> dict | None:
    """metrics.json of a run (None: not evaluated), with its best linear probe's accuracy as `probe_acc`."""
    from ..io import load_json

    d = p.run_dir(run)
    if not (d / "metrics.json").exists():
        return None
    m = load_json(d / "metrics.json")
    if _probed(p, run) and (d / "probe.json").exists():
        m["probe_acc"] = load_json(d / "probe.json")["best_accuracy"]
    return m


CAPTIONS = {"ablation.csv": "ablation.rst", "paper.csv": "paper.rst", "samples.png": "samples.rst",
            "training_curves.png": "training_curves.rst"}  # report/<caption>: what `snakemake --report` shows


def outputs(p: Params) -> Outputs:
    d = p.results_dir / "tables"
    files = [f"{d}/{f}" for f in ("ablation.md", "ablation.csv", "paper.md", "paper.csv", "training_curves.png",
                                  "samples.png")]
    return Outputs(files=files, report={f: CAPTIONS[f.rpartition("/")[2]] for f in files
                                        if f.rpartition("/")[2] in CAPTIONS})


def note(p: Params) -> str:
    d, m = p.data, p.metrics
    seeds = sorted({len(p.seeds(n)) for n in p.experiments})
    ref = f"ADM's reference batch {m.reference_batch}" if m.reference_batch else f"the {m.reference_split} split"
    text = (f"Profile: {d.dataset} {d.image_size}x{d.image_size}, {p.train.steps} training steps, "
            f"{p.sample.per_class * d.num_classes} samples per run; {'/'.join(map(str, seeds))} training seed(s) per "
            f"experiment (cells with several: mean ± std over seeds). FID/sFID/IS with the `{m.network}` feature "
            f"network against {ref}; Cond. acc. = the feature network's accuracy at recognising each sample's "
            f"conditioning class; Acc. = the training-free classifier on the {m.classifier_split} split.")
    if m.probe.enabled:
        text += (" Probe acc. = the best layer's linear probe (logistic regression on token-averaged hidden states, "
                 "fitted on train, scored on val; probe.json of each run names the layer).")
    if any(not family(e.family).has_likelihood for e in p.experiments.values()):
        text += (" Acc. and Probe acc. are not defined for a model without a likelihood (no training-free "
                 "classifier, no encoder direction to probe).")
    if d.dataset == "digits":
        text += (" The embedded default is a toy profile (16x16 digits, minutes of CPU): it shows the mechanism "
                 "(where alignment gradients go, what they do to samples and to the classifier) and its spread over "
                 "seeds, not the paper's ImageNet numbers; differences smaller than the ± spread are noise.")
    return text


def run(p: Params, progress: bool = True) -> str:
    import io

    import numpy as np

    from ..io import write_bytes
    from ..metrics.generative import load_samples
    from ..plots import image_grid, sample_panels, training_curves
    from ..tables import ablation_frame, paper_frame, paper_markdown, to_markdown

    out = p.results_dir / "tables"
    rows, logs, panels = [], {}, []
    for name in p.experiments:
        e, trains = p.trained_as(name), p.experiments[name].milestone is None  # a milestone's strategy: its source's
        runs = [p.run_dir(f"{name}-s{s}") for s in p.seeds(name)]
        metrics = [_metrics(p, f"{name}-s{s}") for s in p.seeds(name)]
        fam = family(e.family)
        rows.append({"experiment": name, "strategy": e.strategy, "position": e.position,
                     "paper": p.experiments[name].paper, "runs": metrics, "label": fam.label(p, e),
                     "layer_base": p.align.layer_base})
        if trains and "bpd" in fam.log_fields:
            logs[name] = [r / "train_log.csv" for r in runs if (r / "train_log.csv").exists()]
        first = runs[0] / "samples.npz"
        if first.exists():
            images, labels = load_samples(first, p.data.channels, p.data.image_size)
            m = metrics[0] or {}
            title = name + "".join(f"\n{k} {m[v]:.1f}{u}" if m.get(v) is not None else f"\n{k} -"
                                   for k, v, u in (("FID", "fid", ""), ("Cond. acc.", "cond_acc", "%")))
            panels.append((title, image_grid(np.transpose(images, (0, 2, 3, 1)), labels, p.data.num_classes)))
    df = ablation_frame(rows)
    text = note(p)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_bytes(out / "ablation.csv", buf.getvalue().encode())
    table = to_markdown(df, "Ablation: alignment strategy and position", text)
    write_bytes(out / "ablation.md", table.encode())
    paper = paper_frame(rows)
    buf = io.StringIO()
    paper.to_csv(buf, index=False)
    write_bytes(out / "paper.csv", buf.getvalue().encode())
    write_bytes(out / "paper.md", paper_markdown(paper, text).encode())
    training_curves({k: v for k, v in logs.items() if v}, out / "training_curves.png")
    sample_panels(panels, out / "samples.png")
    return table


STAGE = Stage(name="table", doc="the paper-style tables and figures", reads=reads, outputs=outputs, run=run, inputs=inputs, family_methods=("label",))
