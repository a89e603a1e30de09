"""Stage `table`: the grid's results as the paper shows them, read the way its protocol says.

Writes results/tables/:
- ablation.md / ablation.csv: one row per experiment (mean ± std over its seeds; the guidance scale its sweep chose
  and the unguided FID beside it), each compared with the baseline (difference, 95 % interval, Welch's p), the real-
  image calibration rows on top, the generated comparison sentences and the notes on how to read each column;
- summary/<experiment>.json: one flat record per experiment (and the calibration rows): the DVC metrics a user diffs
  (per-run records - metrics.json, sweep.json, probe.json, ... - stay in git as plain outputs);
- paper.md / paper.csv: ours beside the paper's numbers (no arithmetic across data sets: ranks within each table);
- samples.png (one panel per experiment), training_curves.png, cfg_sweep.png (Figure 5 left: FID by guidance scale)
  and fid_curve.png (Figure 5 right: FID over training), each where the grid has the data.
"""

from __future__ import annotations

from ..families import family
from ..params import Params
from . import Outputs, Stage

NOTE_KEYS = ["data.dataset", "data.image_size", "data.classes", "train.steps", "train.seed", "train.ema_decay",
             "sample.per_class", "sample.count", "sample.guidance.method", "sweep", "curve.enabled",
             "metrics.network", "metrics.reference_split", "metrics.reference_batch", "metrics.classifier_split",
             "metrics.probe.enabled", "metrics.calibration", "af.nfe"]
CAPTIONS = {"ablation.csv": "ablation.rst", "paper.csv": "paper.rst", "samples.png": "samples.rst",
            "training_curves.png": "training_curves.rst", "cfg_sweep.png": "cfg_sweep.rst",
            "fid_curve.png": "fid_curve.rst"}  # report/<caption>: what `snakemake --report` shows


def reads(p: Params) -> list[str]:
    return ["experiments", "results", "align.layer_base", "train.milestones", *NOTE_KEYS]


def _name(run: str) -> str:
    return run.rpartition("-s")[0]


def _probed(p: Params, run: str) -> bool:
    return p.metrics.probe.enabled and family(p.trained_as(_name(run)).family).has_likelihood


def _swept(p: Params, run: str) -> bool:
    return bool(p.sweep.scales) and family(p.trained_as(_name(run)).family).has_guidance


def _curved(p: Params, run: str) -> bool:
    e = p.experiments[_name(run)]
    milestones = e.overrides.get("train", {}).get("milestones", p.train.milestones)
    return p.curve.enabled and e.milestone is None and family(e.family).saves_milestones and bool(milestones)


def inputs(p: Params) -> list[str]:
    out = [str(p.results_dir / "calibration.json")] if p.metrics.calibration.enabled else []
    for r in p.runs():
        d = p.run_dir(r)
        out += [f"{d}/metrics.json", f"{d}/samples.npz", f"{d}/sample.json"]
        out += [f"{d}/train_log.csv"] if p.experiments[_name(r)].milestone is None else []
        out += [f"{d}/probe.json"] if _probed(p, r) else []
        out += [f"{d}/sweep.json", f"{d}/sweep.csv"] if _swept(p, r) else []
        out += [f"{d}/curve.csv"] if _curved(p, r) else []
    return out


def outputs(p: Params) -> Outputs:
    d = p.results_dir / "tables"
    figures = ["training_curves.png", "samples.png"] + (["cfg_sweep.png"] if p.sweep.scales else []) + (
        ["fid_curve.png"] if p.curve.enabled else [])
    files = [f"{d}/{f}" for f in ("ablation.md", "ablation.csv", "paper.md", "paper.csv", *figures)]
    summaries = [*p.experiments, *(["calibration_real", "calibration_split_half"] if p.metrics.calibration.enabled
                                   else [])]
    return Outputs(files=files, metrics=[f"{d}/summary/{name}.json" for name in summaries],
                   report={f: CAPTIONS[f.rpartition("/")[2]] for f in files if f.rpartition("/")[2] in CAPTIONS})


def record(p: Params, run: str) -> dict | None:
    """What the table knows of a run (None: not evaluated): metrics.json, its probe's best accuracy as `probe_acc`,
    its sweep's chosen scale and unguided FID (or the fixed guidance weight it was sampled at)."""
    from ..io import load_json

    d = p.run_dir(run)
    if not (d / "metrics.json").exists():
        return None
    m = load_json(d / "metrics.json")
    if _probed(p, run) and (d / "probe.json").exists():
        m["probe_acc"] = load_json(d / "probe.json")["best_accuracy"]
    guidance = load_json(d / "sample.json").get("guidance") if (d / "sample.json").exists() else None
    if guidance is not None:  # the weight the samples were drawn at (the sweep's choice, or sample.guidance's)
        m["scale"] = guidance["weight"] if guidance["method"] != "none" else 0.0
    if _swept(p, run) and (d / "sweep.json").exists():
        m["fid_unguided"] = load_json(d / "sweep.json")["fid_unguided"]
    return m


def note(p: Params) -> str:
    d, m = p.data, p.metrics
    seeds = sorted({len(p.seeds(n)) for n in p.experiments})
    ref = f"ADM's reference batch {m.reference_batch}" if m.reference_batch else f"the {m.reference_split} split"
    guided = (f"Each flow is sampled at the guidance scale its own sweep chose by FID (CFG column; grid "
              f"{', '.join(f'{w:g}' for w in p.sweep.scales)}, {p.sweep.count or p.samples_per_run} samples per "
              f"scale, drawn with other noise than the reported samples), as the paper reports each model at its "
              f"optimal scale; FID unguided = the sweep's scale-0 point." if p.sweep.scales else
              "Samples use sample.guidance as set (CFG column).")
    text = (f"**Protocol.** {d.dataset} {d.image_size}x{d.image_size}, {p.train.steps} training steps"
            f"{f', EMA {p.train.ema_decay:g} weights evaluated' if p.train.ema_decay > 0 else ''}; "
            f"{p.samples_per_run} samples per run; {'/'.join(map(str, seeds))} training seed(s) per experiment "
            f"(mean ± std over seeds). {guided}\n\n"
            f"**Columns.** FID/sFID/IS/recall with the `{m.network}` feature network against {ref}. Cond. acc. = how "
            f"often that network recognises the class a sample was drawn for; under guidance it (and IS) measures "
            f"how prototypical the samples are, not how good: a row above the real images on either is trading "
            f"diversity for it. Acc. = the training-free classifier (one gradient step) on the "
            f"{m.classifier_split} split; Acc. exhaustive = argmax_k log p(x|k) on the same images.")
    if m.probe.enabled:
        text += (" Probe acc. = the linear probe of the layer chosen on held-out train images, scored on val "
                 "(probe_layers.json of each run has every layer).")
    if any(not family(e.family).has_likelihood for e in p.experiments.values()):
        text += (" Acc. and Probe acc. are not defined for a model without a likelihood (no training-free "
                 "classifier, no encoder direction to probe); such a model has no classifier-free guidance either: "
                 "read its FID beside the flows' FID unguided.")
    if m.calibration.enabled:
        text += (f" The first rows are real images: the {m.calibration.split} split scored as if it were samples, "
                 f"and the FID between two random halves of the reference (a floor set by sample size).")
    if d.dataset == "digits":
        text += ("\n\n**Scope.** The embedded default is a toy (16x16 digits, minutes of CPU): it shows the mechanism "
                 "and its spread over seeds, not the paper's ImageNet numbers. The FID reference is the flows' own "
                 "training split (the largest set; the val split's 359 images are too few for stable statistics), "
                 "so a model that memorised it would score below the real-image row.")
    return text


def below_real(df, real_fid: float) -> str:
    """Which experiments' mean FID is below the real held-out images' (memorisation or a lucky draw: look)."""
    below = [e for e, f in zip(df["Experiment"], df["FID"]) if f == f and f < real_fid]
    return (f" Below the real held-out images' FID ({real_fid:.2f}): {', '.join(below)}." if below else
            f" No experiment's FID is below the real held-out images' ({real_fid:.2f}).")


def run(p: Params, progress: bool = True) -> str:
    import io

    import numpy as np

    from ..io import load_json, save_json, write_bytes
    from ..metrics.generative import load_samples
    from ..plots import image_grid, metric_lines, sample_panels, training_curves
    from ..tables import Row, comparisons, frame, paper_frame, paper_markdown, summaries, to_markdown

    out = p.results_dir / "tables"
    rows, logs, panels, sweeps, curves, baselines = [], {}, [], {}, {}, set()
    for name in p.experiments:
        spec, trains = p.trained_as(name), p.experiments[name].milestone is None  # a milestone's strategy: its source's
        fam = family(spec.family)
        run_ids = [f"{name}-s{s}" for s in p.seeds(name)]
        records = [record(p, r) for r in run_ids]
        is_base = spec.strategy == "none" and trains and spec.family not in baselines
        baselines |= {spec.family} if is_base else set()
        rows.append(Row(name, fam.label(p, spec), spec.position, records, spec.family, is_base, p.align.layer_base,
                        p.experiments[name].paper_rows))
        dirs = [p.run_dir(r) for r in run_ids]
        if trains and "bpd" in fam.log_fields:
            logs[name] = [d / "train_log.csv" for d in dirs if (d / "train_log.csv").exists()]
        sweeps[name] = [d / "sweep.csv" for r, d in zip(run_ids, dirs) if _swept(p, r) and (d / "sweep.csv").exists()]
        curves[name] = [d / "curve.csv" for r, d in zip(run_ids, dirs) if _curved(p, r) and (d / "curve.csv").exists()]
        first = dirs[0] / "samples.npz"
        if first.exists():
            images, labels = load_samples(first, p.data.channels, p.data.image_size)
            m = records[0] or {}
            title = name + "".join(f"\n{k} {m[v]:.1f}{u}" if m.get(v) is not None else f"\n{k} -"
                                   for k, v, u in (("FID", "fid", ""), ("Cond. acc.", "cond_acc", "%")))
            panels.append((title, image_grid(np.transpose(images, (0, 2, 3, 1)), labels, p.data.num_classes)))
    calibration = []
    if p.metrics.calibration.enabled:
        cal = load_json(p.results_dir / "calibration.json")
        r, h = cal["real"], cal["split_half_fid"]
        calibration = [
            {"Experiment": f"real digits ({r['split']})", "Strategy": "real images", "Seeds": "-",
             "FID": f"{r['fid']:.2f}", "sFID": f"{r['sfid']:.2f}", "IS": f"{r['is']:.2f}",
             "Recall": f"{r['recall']:.3f}", "Cond. acc. (%)": "-" if r["cond_acc"] is None else f"{r['cond_acc']:.1f}"},
            {"Experiment": "split-half floor", "Strategy": f"2 x {h['size']} reference images", "Seeds": "-",
             "FID": f"{h['mean']:.2f}" + (f" ± {h['std']:.2f}" if h["std"] is not None else "")}]
    df = frame(rows)
    text = note(p) + (below_real(df, cal["real"]["fid"]) if calibration else "")
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_bytes(out / "ablation.csv", buf.getvalue().encode())
    table = to_markdown(df, "Ablation: alignment strategy and position", text, comparisons(rows), calibration)
    write_bytes(out / "ablation.md", table.encode())
    records = summaries(df)
    if calibration:  # the same flat keys, so `dvc metrics show` stays one narrow table
        records["calibration_real"] = {"fid": r["fid"], "sfid": r["sfid"], "is": r["is"], "recall": r["recall"],
                                       "cond_acc": r["cond_acc"]}
        records["calibration_split_half"] = {"fid": h["mean"], "fid_std": h["std"]}
    for name, s in records.items():
        save_json(out / "summary" / f"{name}.json", s)
    paper = paper_frame(rows)
    buf = io.StringIO()
    paper.to_csv(buf, index=False)
    write_bytes(out / "paper.csv", buf.getvalue().encode())
    write_bytes(out / "paper.md", paper_markdown(paper, text).encode())
    training_curves({k: v for k, v in logs.items() if v}, out / "training_curves.png")
    sample_panels(panels, out / "samples.png")
    if p.sweep.scales:
        metric_lines({k: v for k, v in sweeps.items() if v}, "scale", "fid", out / "cfg_sweep.png",
                     xlabel="classifier-free guidance scale", ylabel="FID", title="FID by guidance scale (Fig. 5 left)")
    if p.curve.enabled:
        metric_lines({k: v for k, v in curves.items() if v}, "step", "fid", out / "fid_curve.png",
                     xlabel="training step", ylabel="FID", title="FID over training (Fig. 5 right)")
    return table


STAGE = Stage(name="table", doc="the paper-style tables and figures", reads=reads, inputs=inputs, outputs=outputs,
              run=run, family_methods=("label",))
