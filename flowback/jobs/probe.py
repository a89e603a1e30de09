"""Stage `probe`: linear probes on one run's frozen flow (flowback/metrics/probe.py).

For every probed (block, layer): the token-averaged hidden state of the unconditional forward pass on clean inputs,
a standardised logistic regression fitted on the train split and scored on val. Writes results/runs/<run>/probe.json
(DVC metrics): the accuracy of each position, the best one and its accuracy, which the table shows as `Probe acc.`
beside the training-free classifier. Adversarial flows have no probe (their generator maps noise to images; there is
no encoder direction to read).
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Experiment
from . import FLOW_KEYS, RUNTIME, Outputs

PER_RUN = True
LAUNCHED = False


def enabled(p) -> bool:
    return p.metrics.probe.enabled


def applies(e: Experiment) -> bool:
    return e.family != "af"


def reads(e: Experiment) -> list[str]:
    keys = [*e.source_keys, "results", "metrics.probe", *FLOW_KEYS, *RUNTIME, *data_reads(e.params)]
    if e.params.metrics.probe.layers != "every":
        keys += ["align.default_layer", "align.layer_base"]
    return keys


def inputs(e: Experiment) -> list[str]:
    return [str(e.params.data.dir), str(e.checkpoint)]


def outputs(e: Experiment) -> Outputs:
    return Outputs(metrics=[f"{e.run_dir}/probe.json"])


def run(e: Experiment, progress: bool = True) -> str:
    from ..alignment.positions import parse_position
    from ..builders import flow_config
    from ..checkpoints import load_flow
    from ..io import save_json
    from ..metrics.classifier import classifier_inputs
    from ..metrics.probe import linear_probe
    from ..runtime import configure

    p, pp = e.params, e.params.metrics.probe
    dev = configure(p.runtime)
    model, _ = load_flow(e.checkpoint, expected=flow_config(p), device=dev)
    positions = None
    if pp.layers != "every":
        positions = parse_position(pp.layers, p.model.layers_per_block(), p.align.default_layer, p.align.layer_base)
    train_x, train_y = classifier_inputs(p, "train")
    val_x, val_y = classifier_inputs(p, "val")
    result = linear_probe(model, train_x, train_y, val_x, val_y, C=pp.C, max_iter=pp.max_iter,
                          max_train=pp.max_train, batch_size=pp.batch_size, seed=pp.seed, positions=positions)
    report = result.to_dict()
    report["best_accuracy"] *= 100.0  # percent, as the table's other accuracies
    report["accuracy"] = {k: 100.0 * v for k, v in report["accuracy"].items()}
    save_json(e.run_dir / "probe.json", report)
    b, l = result.best
    warn = f" ({len(result.unconverged)} fits hit max_iter)" if result.unconverged else ""
    return f"{e.run}: best linear probe block {b} layer {l}: {report['best_accuracy']:.1f}% on val{warn}"
