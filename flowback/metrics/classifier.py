"""The paper's training-free classifier: one backward pass through a class-conditional flow.

Start from logits lambda = 0 over the K classes, feed the mixed class embedding e = softmax(lambda)^T E to every
conditioned block, and differentiate log p(x | e) with respect to lambda. The class whose logit would raise the
likelihood fastest wins: prediction = argmax_k dL/dlambda_k. At lambda = 0, e is the mean class embedding, which
is the embedding the flow is trained with for dropped labels, so the gradient is taken at a point the model knows.

Inputs are what the flow models: clean uint8 images (mapped to [-1, 1]) in pixel mode, and in latent mode the
scaled VAE posterior means of the latent shards (the un-flipped view, `read_latents(...)["mean"][:, 0]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from ..progress import progress as tqdm

from ..data.images import to_model
from ..io import FlowBackFileError
from ..models.tarflow import TARFlow, log_prob_from

if TYPE_CHECKING:
    from ..params import Params


def classify(model: TARFlow, x: torch.Tensor) -> torch.Tensor:
    """x: model-space images (B, C, H, W). Returns predicted labels (B,)."""
    K = model.cfg.num_classes
    if K == 0 or all(b.class_embed is None for b in model.blocks):
        raise ValueError("the training-free classifier needs a class-conditional model")
    lam = torch.zeros(x.shape[0], K, device=x.device, requires_grad=True)
    with torch.enable_grad():
        logp = log_prob_from(model(x, class_weights=lam.softmax(dim=-1))).sum()  # samples are independent
        (grad,) = torch.autograd.grad(logp, lam)
    return grad.argmax(dim=-1)


def _model_inputs(batch: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(batch))
    if t.dtype == torch.uint8:
        return to_model(t)  # images
    if t.is_floating_point():
        return t.float()  # already model space (latents)
    raise TypeError(f"classifier inputs must be uint8 images or float latents, got {t.dtype}")


def classifier_accuracy(
    model: TARFlow, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 128, show_progress: bool = True
) -> float:
    """Accuracy (in [0, 1]) of the training-free classifier on clean uint8 NCHW images or float model-space latents."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in tqdm(range(0, len(inputs), batch_size), desc="classifier", disable=not show_progress,
                      leave=False):
        x = _model_inputs(inputs[start : start + batch_size]).to(device)
        pred = classify(model, x).cpu().numpy()
        correct += int((pred == labels[start : start + batch_size]).sum())
    return correct / len(inputs)


@torch.no_grad()
def exhaustive_predict(model: TARFlow, x: torch.Tensor) -> torch.Tensor:
    """argmax_k log p(x | k): one forward pass per class (the classifier the one-step gradient approximates; K times
    its cost, affordable for the digits' 10 classes)."""
    K = model.cfg.num_classes
    scores = torch.stack([log_prob_from(model(x, torch.full((len(x),), k, device=x.device, dtype=torch.long)))
                          for k in range(K)], dim=1)
    return scores.argmax(dim=1)


def exhaustive_accuracy(
    model: TARFlow, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 128, show_progress: bool = True
) -> float:
    """Accuracy (in [0, 1]) of argmax_k log p(x | k) on the same inputs as classifier_accuracy."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in tqdm(range(0, len(inputs), batch_size), desc="exhaustive classifier", disable=not show_progress,
                      leave=False):
        x = _model_inputs(inputs[start : start + batch_size]).to(device)
        correct += int((exhaustive_predict(model, x).cpu().numpy() == labels[start : start + batch_size]).sum())
    return correct / len(inputs)


def classifier_inputs(params: "Params", split: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of `split` for the classifier: uint8 images, or in latent mode (data.format latent) the
    float32 posterior means of the un-flipped images, (N, C, h, w). Refuses data prepared with other settings."""
    from ..data.manifest import check_prepared, load_split, read_latents

    d = params.data
    if params.model.latent is None:
        return load_split(params, split)
    if d.format != "latent":
        raise FlowBackFileError(f"{d.dir}: the classifier of a latent flow (model.latent) needs VAE latent shards "
                                f"(data.format: latent), these shards hold only pixels")
    check_prepared(params)
    latents = read_latents(d.dir, split)
    return np.ascontiguousarray(latents["mean"][:, 0], dtype=np.float32), latents["label"]
