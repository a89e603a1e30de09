"""The default profile's encoder training (flowback/alignment/pretrain.py): the label-free objective never sees the
labels, is a function of the seed, learns, and saves an encoder that loads like a fetched DINOv2."""

from __future__ import annotations

import math

import pytest
import torch

from flowback.alignment.encoder import EncoderConfig, load_encoder, save_encoder
from flowback.alignment.pretrain import (
    EncoderObjectiveError,
    class_variance_fraction,
    nt_xent,
    patch_features,
    probe_accuracy,
    random_affine,
    train_encoder,
    train_encoder_simclr,
)
from flowback.data.digits import load_digits_images
from flowback.data.images import to_model

TINY = EncoderConfig(arch="vit_small_patch14_dinov2", input_size=16, mean=(0.5,), std=(0.5,),
                     kwargs=dict(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                                 num_classes=0))


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_images(16)
    return torch.from_numpy(images[:96]), torch.from_numpy(labels[:96])


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_simclr_never_sees_labels(digits):
    images, labels = digits
    run = lambda y: train_encoder(images, y, TINY, 10, steps=4, batch_size=16, lr=1e-3, seed=0,  # noqa: E731
                                  show_progress=False, objective="simclr")
    net, head = run(labels)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    net_shuffled, head_shuffled = run(shuffled)
    assert states_equal(net, net_shuffled)  # bit-identical encoder
    assert not torch.equal(head.weight, head_shuffled.weight)  # only the probe fitted afterwards reads labels


def test_supervised_does_see_labels(digits):
    """The counterpart: the same check fails for the supervised objective, so the test above can fail."""
    images, labels = digits
    run = lambda y: train_encoder(images, y, TINY, 10, steps=2, batch_size=16, lr=1e-3, seed=0,  # noqa: E731
                                  show_progress=False)[0]
    assert not states_equal(run(labels), run(labels.flip(0)))


def test_simclr_is_a_function_of_the_seed(digits):
    images, _ = digits
    run = lambda seed: train_encoder_simclr(images, TINY, 3, 16, 1e-3, seed, show_progress=False)  # noqa: E731
    (a, la), (b, lb), (c, _) = run(0), run(0), run(1)
    assert states_equal(a, b) and la == lb
    assert not states_equal(a, c)


def test_simclr_loss_decreases(digits):
    images, _ = digits
    _, losses = train_encoder_simclr(images, TINY, 100, 32, 3e-3, 0, show_progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert first < math.log(2 * 32 - 1) + 0.5  # starts near chance: log of the 2B - 1 candidates


def test_nt_xent_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2, tau = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 0.3
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).double()
    n, terms = 5, []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        terms.append(-math.log(math.exp(float(z[i] @ z[j]) / tau) / others))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_random_affine_keeps_the_range_and_can_be_the_identity(digits):
    x = to_model(digits[0][:8])
    g = torch.Generator().manual_seed(0)
    view = random_affine(x, g)
    assert view.shape == x.shape and view.min() >= -1 and view.max() <= 1 and not torch.equal(view, x)
    same = random_affine(x, g, rotate_deg=0, scale=0, shift_px=0, noise=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


def test_trained_encoder_loads_through_load_encoder(digits, tmp_path):
    images, labels = digits
    net, head = train_encoder(images, labels, TINY, 10, steps=2, batch_size=16, lr=1e-3, seed=0,
                              show_progress=False, objective="simclr")
    save_encoder(net, TINY, tmp_path)
    enc = load_encoder(tmp_path, allow_hub=False)
    loaded = enc(to_model(images[:4])).flatten(1, 2)
    torch.testing.assert_close(loaded, patch_features(net, TINY, images[:4]), atol=1e-6, rtol=0)
    assert 0.0 <= probe_accuracy(net, head, TINY, images, labels) <= 1.0


def test_class_variance_fraction_closed_forms():
    labels = torch.tensor([0, 0, 1, 1])
    means = torch.randn(2, 3, 5)
    assert class_variance_fraction(means[labels], labels) == pytest.approx(1.0)  # features = class means
    noise = torch.randn(1, 3, 5)
    same_mean = torch.cat([noise, -noise, noise, -noise])  # both classes have mean 0 at every position
    assert class_variance_fraction(same_mean, labels) == pytest.approx(0.0, abs=1e-12)
    shifted = same_mean + torch.arange(3.0).view(1, 3, 1)  # position offsets are not class
    assert class_variance_fraction(shifted, labels) == pytest.approx(0.0, abs=1e-12)


def test_unknown_objective_names_the_key(digits):
    with pytest.raises(EncoderObjectiveError, match="encoder.train.objective"):
        train_encoder(*digits, TINY, 10, 1, 8, 1e-3, 0, show_progress=False, objective="dino")
