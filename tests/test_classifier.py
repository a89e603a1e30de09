"""The training-free classifier: one backward pass to the class logits picks the likeliest class."""

import numpy as np
import torch
from conftest import random_flow

from flowback.metrics.classifier import classifier_accuracy, classify


def small_flow():
    return random_flow(0, 0.1, bias=False, channels=1, image_size=4, width=16, layers=(1, 1), mlp_ratio=1,
                       num_classes=3)


def test_classifier_picks_the_class_whose_embedding_raises_the_likelihood():
    model = small_flow()
    x = torch.randn(6, 1, 4, 4).clamp(-1, 1)
    pred = classify(model, x)
    # brute force: the class with the largest d log p / d lambda_k, by finite differences on lambda at 0
    eps = 1e-3
    K = model.cfg.num_classes
    base = model.log_prob(x, class_weights=torch.full((6, K), 1 / K))
    fd = []
    for k in range(K):
        lam = torch.zeros(6, K)
        lam[:, k] = eps
        fd.append((model.log_prob(x, class_weights=lam.softmax(-1)) - base) / eps)
    assert torch.equal(pred, torch.stack(fd, 1).argmax(1))


def test_batches_of_any_size_give_the_same_accuracy():
    model = small_flow().requires_grad_(False)  # as evaluate loads it: no parameter gradients
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (23, 1, 4, 4), generator=g, dtype=torch.uint8).numpy()
    labels = np.arange(23) % 3
    accs = {b: classifier_accuracy(model, images, labels, b, show_progress=False) for b in (1, 5, 23)}
    assert len(set(accs.values())) == 1 and 0 < accs[23] < 1
