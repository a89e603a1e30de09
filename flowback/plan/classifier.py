"""The classifier's plan: the batch of the training-free classifier's backward pass for the budget."""

from __future__ import annotations

import math

import torch

from ..params import Experiment
from .budget import CUBLAS_WORKSPACE, attention_scratch, outside_allocator, usable
from .measure import GIB, Choice, Measure, PlanError, _fake, _halvings, _largest, _memo, inference_model, measure


@_memo("train", "align", "encoder", "sample", "metrics", "af", strategy=False)
def classifier_pass(exp: Experiment, batch: int) -> Measure:
    """One batch of the training-free classifier (a backward pass to the class logits), on one GPU."""
    from ..metrics.classifier import classify

    with _fake():
        model = inference_model(exp)
        cfg = model.cfg
        x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
        m = measure(lambda: classify(model, x), model, x)
    workspace = CUBLAS_WORKSPACE + attention_scratch(batch, cfg.num_tokens, cfg.width)
    return Measure(m.peak, m.flops, workspace, outside_allocator(1))


def plan_classifier(exp: Experiment, val_images: int) -> Choice:
    mp = exp.params.metrics
    budget = usable(exp.params.runtime.gpu_memory_gib)
    cands = _halvings(256) if mp.classifier_batch_size == "auto" else [mp.classifier_batch_size]
    if budget is None:
        if mp.classifier_batch_size == "auto":
            raise PlanError(f"run {exp.run!r}: metrics.classifier_batch_size auto needs runtime.gpu_memory_gib")
        return Choice(exp.run, "classifier", cands[0], False, 1, Measure(0, 0), math.ceil(val_images / cands[0]))
    best = _largest(cands, lambda b: classifier_pass(exp, b).total <= budget)
    if best is None:
        raise PlanError(f"run {exp.run!r}: the classifier does not fit in runtime.gpu_memory_gib "
                        f"{exp.params.runtime.gpu_memory_gib} GiB at batch {min(cands)} "
                        f"({classifier_pass(exp, min(cands)).total / GIB:.1f} GiB); set metrics.classifier_batch_size: "
                        f"auto")
    return Choice(exp.run, "classifier", best, False, 1, classifier_pass(exp, best), math.ceil(val_images / best))


def resolve_classifier_batch(exp: Experiment, device: torch.device) -> int:
    mp = exp.params.metrics
    if mp.classifier_batch_size != "auto" and exp.params.runtime.gpu_memory_gib is None:
        return mp.classifier_batch_size
    return plan_classifier(exp, 0).value
