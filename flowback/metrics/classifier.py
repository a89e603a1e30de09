"""The paper's training-free classifier: one backward pass through a class-conditional flow.

Start from logits lambda = 0 over the K classes, feed the mixed class embedding e = softmax(lambda)^T E to every
conditioned block, and differentiate log p(x | e) with respect to lambda. The class whose logit would raise the
likelihood fastest wins: prediction = argmax_k dL/dlambda_k. At lambda = 0, e is the mean class embedding, which
is the embedding the flow is trained with for dropped labels, so the gradient is taken at a point the model knows.
"""

from __future__ import annotations

import numpy as np
import torch
from ..progress import progress as tqdm

from ..data.images import to_model
from ..models import TARFlow, log_prob_from


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


def classifier_accuracy(
    model: TARFlow, images_u8: np.ndarray, labels: np.ndarray, batch_size: int = 128, show_progress: bool = True
) -> float:
    """Accuracy (in [0, 1]) of the training-free classifier on clean uint8 NCHW images."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in tqdm(range(0, len(images_u8), batch_size), desc="classifier", disable=not show_progress,
                      leave=False):
        x = to_model(torch.from_numpy(np.ascontiguousarray(images_u8[start : start + batch_size]))).to(device)
        pred = classify(model, x).cpu().numpy()
        correct += int((pred == labels[start : start + batch_size]).sum())
    return correct / len(images_u8)
