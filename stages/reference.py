"""Stage `reference`: the reference side of FID / sFID / precision-recall, computed once for every experiment.

    python -m stages.reference [--params params.yaml] [--quiet]

Writes `{metrics.dir}/reference/<name>.npz` (mu, sigma, mu_s, sigma_s, ref_pool, the reference's IS, a fingerprint
of the metric network and settings) and `{metrics.dir}/reference.json` (tracked by DVC as metrics). The images are
the `metrics.reference_split` split of the prepared data, or an ADM reference batch (`metrics.reference_batch`), whose
own mu/sigma/mu_s/sigma_s are used for FID/sFID as ADM's evaluator does. See flowback/metrics/reference.py.
"""

from __future__ import annotations

import time

from flowback.builders import device as pick_device, set_threads
from flowback.metrics.generative import load_feature_network
from flowback.metrics.reference import compute_reference, write_reference
from flowback.stage import run_stage


def body(params, _exp, args) -> None:
    mp = params.metrics
    set_threads(params.train.threads)  # the same device and threads as evaluate, so features match bit for bit
    dev = pick_device(params.sample.device)
    start = time.perf_counter()
    net = load_feature_network(mp.network, mp.dir).to(dev)
    ref = compute_reference(params, net, device=dev, show_progress=not args.quiet)
    report = write_reference(params, ref, time.perf_counter() - start)
    is_text = f"IS {report['is']:.2f}" if report["is"] is not None else "IS n/a"
    print(f"reference: {ref.count} images of {ref.source} ({mp.network}; FID/sFID statistics from the "
          f"{ref.stats_from}), {is_text}, {report['seconds']:.1f} s -> {report['file']}")


def main(argv=None):
    run_stage("reference", body, argv)


if __name__ == "__main__":
    main()
