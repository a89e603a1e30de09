"""Stage `probe`: linear probes on one run's frozen model (flowback/metrics/probe.py), for families with a likelihood.

For every probed (block, layer): the token-averaged hidden state of the unconditional forward pass on clean inputs,
a standardised logistic regression fitted on the train split less a held-out selection part. The best position is
chosen on that selection part and reported on val. Writes results/runs/<run>/probe.json (DVC metric: the best
position and its val accuracy, which the table shows as `Probe acc.`) and probe_layers.json (every position's val and
selection accuracy: an output, not a metric).
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..families import family
from ..params import Experiment
from . import RUNTIME, Outputs, Stage


def applies(e: Experiment) -> bool:
    return family(e.family).has_likelihood


def reads(e: Experiment) -> list[str]:
    keys = [*e.source_keys, "results", "metrics.probe", *family(e.family).model_reads(e), *RUNTIME,
            *data_reads(e.params)]
    if e.params.metrics.probe.layers != "every":
        keys += ["align.default_layer", "align.layer_base"]
    return keys


def inputs(e: Experiment) -> list[str]:
    return [str(e.params.data.dir), str(e.checkpoint)]


def outputs(e: Experiment) -> Outputs:
    return Outputs(files=[f"{e.run_dir}/probe.json", f"{e.run_dir}/probe_layers.json"])


def run(e: Experiment, progress: bool = True) -> str:
    from ..alignment.positions import parse_position
    from ..io import save_json
    from ..metrics.classifier import classifier_inputs
    from ..metrics.probe import linear_probe
    from ..runtime import configure

    p, pp = e.params, e.params.metrics.probe
    dev = configure(p.runtime)
    model, _ = family(e.family).load(e, dev)
    positions = None
    if pp.layers != "every":
        positions = parse_position(pp.layers, p.model.layers_per_block(), p.align.default_layer, p.align.layer_base)
    train_x, train_y = classifier_inputs(p, "train")
    val_x, val_y = classifier_inputs(p, "val")
    result = linear_probe(model, train_x, train_y, val_x, val_y, C=pp.C, max_iter=pp.max_iter,
                          max_train=pp.max_train, batch_size=pp.batch_size, seed=pp.seed, positions=positions,
                          select_fraction=pp.select_fraction)
    layers = result.to_dict()
    for k in ("accuracy", "selection"):
        layers[k] = {pos: 100.0 * a for pos, a in layers[k].items()}  # percent, as the table's other accuracies
    save_json(e.run_dir / "probe_layers.json", layers)
    save_json(e.run_dir / "probe.json", {"best": layers["best"], "best_accuracy": 100.0 * result.best_accuracy,
                                         "chosen_on": f"{pp.select_fraction:g} of train, held out",
                                         "unconverged": len(result.unconverged)})
    b, l = result.best
    warn = f" ({len(result.unconverged)} fits hit max_iter)" if result.unconverged else ""
    return (f"{e.run}: linear probe, block {b} layer {l} chosen on held-out train: "
            f"{100.0 * result.best_accuracy:.1f}% on val{warn}")


STAGE = Stage(name="probe", doc="linear probes of one run's model", reads=reads, inputs=inputs, outputs=outputs,
              run=run, per_run=True, switch="metrics.probe.enabled", applies=applies, family_methods=("load",))
