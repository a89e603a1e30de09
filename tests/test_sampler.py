"""Class-balanced sampling in resumable chunks: a killed run resumes without duplicates or gaps."""

import numpy as np
import pytest
from conftest import generate_flow, random_flow

from flowback.sampler import sample_labels


def small_flow():
    return random_flow(0, 0.1, bias=False, channels=1, image_size=4, width=16, layers=(1, 1), mlp_ratio=1,
                       num_classes=3)


def test_sampling_resumes_without_duplicates_or_gaps(tmp_path, monkeypatch):
    model = small_flow()
    labels = sample_labels(3, 5)
    full, _ = generate_flow(model, labels, tmp_path / "a", 4, seed=1, key="k")

    import flowback.sampler as sampler

    calls = {"n": 0}
    real = sampler.save_npz

    def dying_save(path, **arrays):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while writing the third chunk
        real(path, **arrays)

    monkeypatch.setattr(sampler, "save_npz", dying_save)
    with pytest.raises(KeyboardInterrupt):
        generate_flow(model, labels, tmp_path / "b", 4, seed=1, key="k")
    monkeypatch.setattr(sampler, "save_npz", real)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.npz")) == ["000000.npz", "000001.npz"]
    resumed, _ = generate_flow(model, labels, tmp_path / "b", 4, seed=1, key="k")
    assert resumed.shape == full.shape == (15, 4, 4, 1)
    assert np.array_equal(resumed, full)
    # another key (other checkpoint or settings) never reuses old chunks
    other, _ = generate_flow(model, labels, tmp_path / "b", 4, seed=2, key="k2")
    assert not np.array_equal(other, full)


@pytest.mark.parametrize("denoise", [0.0, 0.1])
def test_micro_batches_give_the_whole_chunk(tmp_path, denoise):
    model = small_flow()
    labels = sample_labels(3, 4)
    whole, _ = generate_flow(model, labels, tmp_path / "a", 12, seed=3, denoise_sigma=denoise)
    parts, _ = generate_flow(model, labels, tmp_path / "b", 12, seed=3, denoise_sigma=denoise,
                        micro_batch=5)
    assert np.array_equal(whole, parts) and whole.std() > 0


def test_sample_labels_are_balanced_in_every_prefix():
    labels = sample_labels(4, 3)
    assert labels.tolist() == [0, 1, 2, 3] * 3


def test_random_labels_are_seeded_and_cover_the_classes():
    a, b = sample_labels(4, 50, "random", seed=1), sample_labels(4, 50, "random", seed=1)
    assert np.array_equal(a, b) and len(a) == 200 and set(a.tolist()) == {0, 1, 2, 3}
    assert not np.array_equal(a, sample_labels(4, 50, "random", seed=2))
    assert not np.array_equal(np.bincount(a), [50] * 4)  # drawn, not balanced
