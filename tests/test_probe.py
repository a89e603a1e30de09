"""Linear probe: it finds a linearly encoded label, stays at chance on noise, is deterministic, and reads
unconditional features (no label leaks through the class embeddings)."""

import numpy as np
import pytest
import torch

from flowback.metrics.probe import fit_probe, linear_probe, probe_features, subset
from flowback.models.tarflow import FlowConfig, TARFlow


def labelled(n, k=4, dim=16, signal=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = np.random.default_rng(99).normal(size=(k, dim))
    return rng.normal(size=(n, dim)) + signal * centres[y], y


def test_probe_decodes_a_linearly_encoded_label():
    (tx, ty), (vx, vy) = labelled(400), labelled(200, seed=1)
    acc, converged = fit_probe(tx, ty, (vx,), (vy,))
    assert acc > 0.95 and converged


def test_probe_on_noise_is_at_chance():
    (tx, ty), (vx, vy) = labelled(400, signal=0.0), labelled(2000, signal=0.0, seed=1)
    acc, _ = fit_probe(tx, ty, (vx,), (vy,))
    assert abs(acc - 0.25) < 0.05


def tiny_flow(seed=0):
    torch.manual_seed(seed)
    return TARFlow(FlowConfig(channels=1, image_size=8, patch_size=2, width=16, layers=(2, 3), head_dim=8,
                              mlp_ratio=2, num_classes=3))


def images_by_class(n, seed):
    """uint8 8x8 images whose class sets the brightness of one quadrant, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 1, 8, 8))
    for c in range(3):
        r, col = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 150
    return x.astype(np.uint8), y


def test_linear_probe_scores_every_position_and_is_deterministic():
    model = tiny_flow()
    (tx, ty), (vx, vy) = images_by_class(150, 0), images_by_class(60, 1)
    first = linear_probe(model, tx, ty, vx, vy, max_train=120)
    again = linear_probe(model, tx, ty, vx, vy, max_train=120)
    assert set(first.accuracy) == {(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)}
    assert first.accuracy == again.accuracy and first.best == again.best
    assert first.best == max(first.selection, key=lambda p: (first.selection[p], -p[0], -p[1]))  # chosen on held-out train
    assert first.best_accuracy == first.accuracy[first.best] > 0.9  # reported on val
    assert first.to_dict()["best"] == f"block{first.best[0]}_layer{first.best[1]}"
    some = linear_probe(model, tx, ty, vx, vy, max_train=120, positions=[(2, 3), (1, 1)])
    assert some.accuracy == {p: first.accuracy[p] for p in [(1, 1), (2, 3)]}


def test_features_are_unconditional():
    # the mean class embedding is what an unconditional pass sees: permuting the classes must change nothing
    model = tiny_flow()
    x, _ = images_by_class(10, 2)
    before = probe_features(model, x)
    with torch.no_grad():
        for blk in model.blocks:
            blk.class_embed.copy_(blk.class_embed.flip(0))
    after = probe_features(model, x)
    assert all(np.allclose(before[p], after[p], atol=1e-6) for p in before)
    with torch.no_grad():
        model.blocks[0].class_embed.add_(1.0)  # a different mean does change them: the check can fail
    assert not np.allclose(probe_features(model, x)[(1, 1)], before[(1, 1)], atol=1e-3)


def test_subset_is_fixed_and_sorted():
    assert np.array_equal(subset(10, None, 0), np.arange(10))
    a = subset(100, 20, 3)
    assert len(a) == 20 and np.array_equal(a, np.sort(a)) and np.array_equal(a, subset(100, 20, 3))


def test_probe_needs_two_classes():
    model = tiny_flow()
    x, _ = images_by_class(10, 0)
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(model, x, np.zeros(10, int), x, np.zeros(10, int))
