"""Stage `sample`: one run's samples (class-balanced unless sample.labels is random), ADM-format .npz + PNG grid.

With a guidance sweep (sweep.scales), the samples are drawn at the scale the run's sweep found best (sweep.json);
otherwise at sample.guidance.weight. sample.json says which.

Outputs in results/runs/<run>/: samples.npz (arr_0 uint8 NHWC, arr_1 labels), samples.png, sample.json (what was
drawn: count, guidance, denoising, which weights) and, not tracked, sample_timing.json. Resumable: chunks are kept in
results/runs/<run>/chunks/ until the .npz is written. Sharded: `torchrun --nproc_per_node 8 -m flowback stage sample
RUN` makes every 8th chunk per GPU; rank 0 writes the outputs. How the model draws is its family's (flowback/families).
"""

from __future__ import annotations

from ..families import family
from ..params import Experiment
from . import RUNTIME, Outputs, Stage


def swept(e: Experiment) -> bool:
    """Whether the run's guidance weight comes from its sweep."""
    return family(e.family).has_guidance and bool(e.params.sweep.scales)


def reads(e: Experiment) -> list[str]:
    guided = ["sweep.scales"] if family(e.family).has_guidance else []
    return [*e.source_keys, "results", *guided, *RUNTIME, *family(e.family).sample_reads(e)]


def inputs(e: Experiment) -> list[str]:
    return [str(e.checkpoint), *family(e.family).sample_inputs(e)] + ([f"{e.run_dir}/sweep.json"] if swept(e) else [])


def outputs(e: Experiment) -> Outputs:
    d = e.run_dir
    return Outputs(outs=[f"{d}/samples.npz"], files=[f"{d}/sample.json", f"{d}/samples.png"],
                   records=[f"{d}/sample_timing.json"])


def run(e: Experiment, progress: bool = True) -> str:
    import shutil

    import numpy as np

    from ..distributed import setup
    from ..io import save_json, save_npz
    from ..plots import image_grid, save_png
    from ..runtime import configure

    from ..io import load_json

    dev, rank, _ = setup(configure(e.params.runtime))
    weight = load_json(e.run_dir / "sweep.json")["best_scale"] if swept(e) else None
    drawn = family(e.family).sample(e, dev, rank, progress, guidance_weight=weight)
    if drawn is None:  # ranks other than 0
        return ""
    d = e.run_dir
    save_npz(d / "samples.npz", arr_0=drawn.images, arr_1=drawn.labels)
    save_png(d / "samples.png", image_grid(drawn.images, drawn.labels, e.params.data.num_classes))
    save_json(d / "sample.json", drawn.record)
    save_json(d / "sample_timing.json", drawn.timing)
    shutil.rmtree(d / "chunks", ignore_errors=True)
    return (f"{e.run}: {len(drawn.images)} samples ({np.bincount(drawn.labels).min()} per class) in "
            f"{drawn.timing['seconds']:.1f} s")


STAGE = Stage(name="sample", doc="one run's samples", reads=reads, inputs=inputs, outputs=outputs, run=run,
              per_run=True, launched=True, family_methods=("sample",),
              resumes="the finished chunks (chunks/ in the run directory)")
