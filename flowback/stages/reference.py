"""Stage `reference`: the reference side of FID / sFID / precision-recall, computed once for every experiment.

Writes `{metrics.dir}/reference/<name>.npz` (mu, sigma, mu_s, sigma_s, ref_pool, the reference's IS, a fingerprint of
the metric network and settings) and `{metrics.dir}/reference.json`. The images are the `metrics.reference_split`
split of the prepared data, or an ADM reference batch (`metrics.reference_batch`), whose own mu/sigma/mu_s/sigma_s
are used for FID/sFID as ADM's evaluator does. See flowback/metrics/reference.py.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Params
from . import RUNTIME, Outputs, Stage

KEYS = ["metrics.network", "metrics.dir", "metrics.batch_size", "metrics.reference_split", "metrics.reference_batch",
        "metrics.isc_splits"]


def reads(p: Params) -> list[str]:
    return [*KEYS, *RUNTIME] + ([] if p.metrics.reference_batch else data_reads(p))


def inputs(p: Params) -> list[str]:
    deps = [f"{p.metrics.dir}/model.safetensors"]
    return deps + ([p.metrics.reference_batch] if p.metrics.reference_batch else [str(p.data.dir)])


def outputs(p: Params) -> Outputs:
    from ..metrics.reference_files import reference_path, report_path

    return Outputs(outs=[str(reference_path(p).parent)], files=[str(report_path(p))])


def run(p: Params, progress: bool = True) -> str:
    from ..metrics.generative import load_feature_network
    from ..metrics.reference import compute_reference, write_reference
    from ..runtime import configure

    dev = configure(p.runtime)  # the same device and threads as evaluate, so features match bit for bit
    mp = p.metrics
    net = load_feature_network(mp.network, mp.dir).to(dev)
    ref = compute_reference(p, net, device=dev, show_progress=progress)
    report = write_reference(p, ref)
    is_text = f"IS {report['is']:.2f}" if report["is"] is not None else "IS n/a"
    return (f"reference: {ref.count} images of {ref.source} ({mp.network}; FID/sFID statistics from the "
            f"{ref.stats_from}), {is_text} -> {report['file']}")


STAGE = Stage(name="reference", doc="the reference statistics of the metrics, once for every run", reads=reads, outputs=outputs, run=run, inputs=inputs)
