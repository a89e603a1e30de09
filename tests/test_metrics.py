"""Generative metrics: closed forms, ADM conventions, DigitNet I/O, and agreement with torch-fidelity itself."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
from conftest import stage
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_statistics_to_metric

from flowback.io import FlowBackFileError
from flowback.metrics import digitnet as dn
from flowback.metrics.digitnet import DigitNet, load_digitnet, save_digitnet, train_digitnet
from flowback.metrics.frechet import frechet_distance, gaussian_stats
from flowback.metrics.generative import extract_features, generative_metrics, load_feature_network
from flowback.params.schema import TrainSpec


def random_psd(rng: np.random.RandomState, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.randn(d, rank or d)
    return a @ a.T / d


def random_net(seed: int = 0, **kw) -> DigitNet:
    torch.manual_seed(seed)
    return DigitNet(**kw).eval()


def random_images(seed: int, n: int, c: int = 1, s: int = 16, high: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, c, s, s), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------------- Fréchet
def test_identical_stats_give_zero():
    rng = np.random.RandomState(0)
    mu, sigma = rng.randn(8), random_psd(rng, 8)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_commuting_covariances_closed_form():
    rng = np.random.RandomState(1)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.randn(6), rng.randn(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [1, 5, 64])
def test_4i_vs_i_gives_d(d):
    z = np.zeros(d)
    assert frechet_distance(z, 4 * np.eye(d), z, np.eye(d)) == pytest.approx(d, rel=1e-10)


def test_statistics_that_are_not_covariances_are_an_error_not_a_number():
    from flowback.metrics.frechet import FrechetError

    z = np.zeros(2)
    with pytest.raises(FrechetError, match="imaginary part of 1"):  # sqrt of the eigenvalue -1: i
        frechet_distance(z, np.diag([1.0, -1.0]), z, np.eye(2))


def test_symmetric():
    rng = np.random.RandomState(2)
    mu1, mu2, s1, s2 = rng.randn(10), rng.randn(10), random_psd(rng, 10), random_psd(rng, 10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


@pytest.mark.parametrize("rank", [None, 5])  # full rank, and singular covariances as from N < D features
def test_agrees_with_torch_fidelity(rank):
    rng = np.random.RandomState(3)
    mu1, mu2 = rng.randn(20), rng.randn(20)
    s1, s2 = random_psd(rng, 20, rank), random_psd(rng, 20, rank)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)


def test_not_finite_sqrt_falls_back_to_eps(monkeypatch):
    from flowback.metrics import frechet

    calls = []
    real = frechet._sqrt_eigenvalues

    def flaky(s1, s2):
        calls.append(s1.copy())
        return np.full(len(s1), np.nan, complex) if len(calls) == 1 else real(s1, s2)

    monkeypatch.setattr(frechet, "_sqrt_eigenvalues", flaky)
    d = 3
    value = frechet.frechet_distance(np.zeros(d), 4 * np.eye(d), np.zeros(d), np.eye(d))
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1] - 4 * np.eye(d), 1e-6 * np.eye(d), rtol=0, atol=1e-12)
    assert value == pytest.approx(d, abs=1e-5)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


def test_gaussian_stats_float64_and_np_cov():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(mu, x.double().numpy().mean(0), rtol=1e-12)


def test_sample_fid_approaches_closed_form():
    rng = np.random.RandomState(4)
    d = 4
    mu1, mu2 = rng.randn(d), rng.randn(d)
    s1, s2 = random_psd(rng, d) + 0.5 * np.eye(d), random_psd(rng, d) + 0.5 * np.eye(d)
    exact = frechet_distance(mu1, s1, mu2, s2)
    errors = []
    for n in (200, 20000, 200000):
        x1 = rng.multivariate_normal(mu1, s1, size=n)
        x2 = rng.multivariate_normal(mu2, s2, size=n)
        errors.append(abs(frechet_distance(*gaussian_stats(x1), *gaussian_stats(x2)) - exact))
    assert errors[-1] < 0.01 * exact + 0.01
    assert errors[-1] < errors[0]


# ------------------------------------------------------------------------------------------------------ IS and P/R
def _feats(pool, logits=None, spatial=None):
    pool = torch.as_tensor(pool, dtype=torch.float32)
    n = pool.shape[0]
    return {"pool": pool, "logits": torch.zeros(n, 10) if logits is None else logits,
            "spatial": pool if spatial is None else spatial}


def test_is_uniform_logits_give_one():
    g = torch.Generator().manual_seed(0)
    f = _feats(torch.randn(100, 8, generator=g))
    out = generative_metrics(f, f, isc_splits=5)
    assert out["is"] == pytest.approx(1.0, abs=1e-12) and out["is_std"] == pytest.approx(0.0, abs=1e-12)


def test_is_confident_balanced_gives_k():
    k, n = 10, 200
    logits = torch.full((n, k), -50.0)
    logits[torch.arange(n), torch.arange(n) % k] = 50.0  # each split of 20 sees every class twice
    f = _feats(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), logits=logits)
    out = generative_metrics(f, f, isc_splits=10)
    assert out["is"] == pytest.approx(k, rel=1e-6)


def test_is_splits_are_in_order_not_shuffled():
    # First half all class 0, second half all class 1: in-order splits of 2 each see one class (IS 1); any shuffle
    # would mix them and give IS > 1.
    n = 100
    logits = torch.full((n, 2), -50.0)
    logits[: n // 2, 0] = 50.0
    logits[n // 2:, 1] = 50.0
    f = _feats(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), logits=logits)
    assert generative_metrics(f, f, isc_splits=2)["is"] == pytest.approx(1.0, abs=1e-9)


def test_adm_split_size_gives_fixed_size_splits():
    from flowback.metrics.generative import isc_split_count

    # Classes 0,1 | 2,3 | 4,5 in three in-order blocks of 4: splits of 4 images see two classes each (IS 2); the
    # default 10 equal splits would not be of 4.
    n = 12
    logits = torch.full((n, 6), -50.0)
    logits[torch.arange(n), torch.arange(n) // 2] = 50.0
    f = _feats(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), logits=logits)
    splits = isc_split_count(n, 10, split_size=4)
    assert splits == 3 and generative_metrics(f, f, isc_splits=splits)["is"] == pytest.approx(2.0, rel=1e-6)
    assert isc_split_count(50_000, 10, 5000) == isc_split_count(50_000, 10) == 10  # equal at the paper's 50K
    with pytest.raises(ValueError, match="isc_split_size 5 does not divide the 12"):
        isc_split_count(n, 10, split_size=5)


def test_precision_recall_identical_sets():
    f = _feats(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)))
    out = generative_metrics(f, f, isc_splits=1)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["fid"] == pytest.approx(0.0, abs=1e-8) and out["sfid"] == pytest.approx(0.0, abs=1e-8)


def test_precision_recall_far_apart_clusters():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 100.0
    out = generative_metrics(_feats(a), _feats(b), isc_splits=1)
    assert out["precision"] == 0.0 and out["recall"] == 0.0
    assert out["fid"] == pytest.approx(8 * 100.0**2, rel=0.01)


def test_precision_recall_subset():
    # Samples cover only one of the two reference modes: precision high, recall about half.
    g = torch.Generator().manual_seed(0)
    ref = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 50.0])
    sample = torch.randn(200, 4, generator=g)
    out = generative_metrics(_feats(sample), _feats(ref), isc_splits=1)
    assert out["precision"] > 0.9 and 0.4 < out["recall"] < 0.55


def test_generative_metrics_types_and_keys():
    f = _feats(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)))
    out = generative_metrics(f, f, isc_splits=3)
    assert set(out) == {"fid", "sfid", "is", "is_std", "precision", "recall"}
    assert all(type(v) is float for v in out.values())
    with pytest.raises(KeyError, match="spatial"):
        generative_metrics({"pool": f["pool"], "logits": f["logits"]}, f)


# ---------------------------------------------------------------------------------------------------------- DigitNet
def test_spatial_features_shape_and_hwc_order():
    net = random_net(0, spatial_channels=4)
    x = random_images(1, 5)
    feats = net.features(x)
    with torch.no_grad():
        h = torch.relu(net.conv2(torch.relu(net.conv1(x.float() / 127.5 - 1))))  # (B, 64, 8, 8)
    assert h.shape == (5, 64, 8, 8)
    manual = np.stack([[[h[b, c, i, j].item() for c in range(4)] for i in range(8) for j in range(8)]
                       for b in range(5)]).reshape(5, -1)
    assert feats["spatial"].shape == (5, 8 * 8 * 4)
    np.testing.assert_allclose(feats["spatial"].detach().numpy(), manual, rtol=1e-6, atol=1e-7)
    nchw = h[:, :4].reshape(5, -1).numpy()  # the known bug: channels taken in NCHW order
    assert not np.allclose(feats["spatial"].detach().numpy(), nchw)
    assert feats["pool"].shape == (5, 128) and feats["logits"].shape == (5, 10)


def test_digitnet_rejects_float_and_wrong_shape():
    net = random_net()
    with pytest.raises(TypeError, match="uint8"):
        net(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="16"):
        net(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_save_load_round_trip(tmp_path):
    net = random_net(3, channels=3, image_size=8, num_classes=7, spatial_channels=2)
    save_digitnet(net, tmp_path / "net")
    loaded = load_digitnet(tmp_path / "net")
    assert loaded.config == net.config
    assert json.loads((tmp_path / "net" / "config.json").read_text())["spatial_channels"] == 2
    x = random_images(4, 6, c=3, s=8)
    a, b = net.features(x), loaded.features(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == ["config.json", "model.safetensors"]


def test_load_missing_directory_names_it(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FlowBackFileError, match="no_such_dir"):
        load_digitnet(missing)
    with pytest.raises(FlowBackFileError, match="no_such_dir"):
        load_feature_network("digitnet", missing)


def test_load_bad_files_name_directory(tmp_path):
    d = tmp_path / "metricnet"
    save_digitnet(random_net(), d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(FlowBackFileError, match="metricnet.*model.safetensors"):
        load_digitnet(d)
    save_digitnet(random_net(), d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(FlowBackFileError, match="metricnet.*config.json"):
        load_digitnet(d)
    (d / "config.json").unlink()
    with pytest.raises(FlowBackFileError, match="metricnet.*config.json"):
        load_digitnet(d)


def test_inception_without_weights_names_the_directory(tmp_path):
    # the loader itself (features, hashes, safe loading) is tested in tests/test_weights.py
    with pytest.raises(FlowBackFileError, match=rf"{tmp_path}: no Inception weights.*flowback weights fetch"):
        load_feature_network("inception", tmp_path)


def test_extract_features_one_pass_matches_full_batch():
    net = random_net(5)
    x = random_images(6, 23)
    got = extract_features(net, x.numpy(), batch_size=7, show_progress=False)
    full = net.features(x)
    assert set(got) == {"pool", "logits", "spatial"}
    for k in got:
        torch.testing.assert_close(got[k], full[k].detach(), rtol=1e-5, atol=1e-6)


def test_train_digitnet_learns_separable_data_deterministically():
    # Class c is a bright 4x4 square at one of 10 positions on a noisy background.
    rng = np.random.RandomState(0)
    n, k = 400, 10
    labels = rng.randint(0, k, n).astype(np.int64)
    images = rng.randint(0, 60, (n, 1, 16, 16)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = (c // 5) * 8 + 2, (c % 5) * 3
        images[i, 0, r:r + 4, col:col + 4] = 255
    net = train_digitnet(images, labels, steps=150, batch_size=64, lr=3e-3, seed=0, show_progress=False)
    assert dn.accuracy(net, images, labels) > 0.9
    # Same seed -> same weights whatever the global RNG state; another seed -> other weights.
    runs = []
    for global_seed, seed in ((123, 0), (456, 0), (123, 1)):
        torch.manual_seed(global_seed)
        net = train_digitnet(images, labels, steps=3, batch_size=64, lr=3e-3, seed=seed, show_progress=False)
        runs.append(torch.cat([v.flatten() for v in net.state_dict().values()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# ------------------------------------------------------------------------------------------------ torch-fidelity
class U8Dataset(torch.utils.data.Dataset):
    """What torch-fidelity accepts: a Dataset yielding uint8 CHW tensors only."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_extractor_registered_idempotently():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    importlib.reload(dn)
    importlib.import_module("flowback.metrics.digitnet")
    assert FEATURE_EXTRACTORS_REGISTRY["flowback-digitnet"] is sys.modules["flowback.metrics.digitnet"].DigitNetExtractor


def blocky_images(seed: int, n: int, block: int) -> torch.Tensor:
    """Noise in `block`x`block` cells with a random per-image brightness: feature spreads large enough to test on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16 // block, 16 // block, generator=g)
    x = torch.nn.functional.interpolate(x, size=16, mode="nearest")
    return (x * torch.rand(n, 1, 1, 1, generator=g) * 255).to(torch.uint8)


def test_agrees_with_torch_fidelity_calculate_metrics(tmp_path):
    net = random_net(7)
    with torch.no_grad():  # default init gives tiny activations and near-uniform logits: spread them out
        for conv in (net.conv1, net.conv2, net.conv3):
            conv.weight.mul_(3)
        net.head.weight.mul_(40)
    save_digitnet(net, tmp_path / "net")
    # Two different image distributions, N > 128 so the pooled covariances are full rank.
    x1, x2 = blocky_images(8, 300, 1), blocky_images(9, 260, 4)
    theirs = torch_fidelity.calculate_metrics(
        input1=U8Dataset(x1), input2=U8Dataset(x2), fid=True, isc=True, prc=True,
        feature_extractor="flowback-digitnet", feature_extractor_weights_path=str(tmp_path / "net"),
        cuda=False, samples_shuffle=False, isc_splits=6, verbose=False, save_cpu_ram=True, cache=False,
        batch_size=64,
    )
    ours = generative_metrics(extract_features(net, x1, 50, show_progress=False),
                              extract_features(net, x2, 50, show_progress=False), isc_splits=6)
    assert ours["fid"] > 1.0 and ours["is"] > 1.2  # far from the trivial values 0 and 1
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-6)
    assert 0 < ours["recall"] < 1
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)


# --------------------------------------------------------------------------------------------------- stage metricnet
def _separable_split(seed: int, n: int):
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 10, n).astype(np.int64)
    images = rng.randint(0, 60, (n, 1, 16, 16)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, (c // 5) * 8 + 2:(c // 5) * 8 + 6, (c % 5) * 3:(c % 5) * 3 + 4] = 255
    return images, labels


def test_stage_trains_saves_and_reports(tmp_path, monkeypatch, capsys):
    import flowback.data.manifest as manifest

    seen = {}

    def fake_load_split(params, split):
        seen["dir"] = params.data.dir
        return _separable_split(0 if split == "train" else 1, 300 if split == "train" else 100)

    monkeypatch.setattr(manifest, "load_split", fake_load_split)
    out_dir = tmp_path / "metric"
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{root: {tmp_path / 'data'}}}\n"
                      f"metrics: {{dir: {out_dir}, train: {{steps: 150, batch_size: 64, lr: 0.003, seed: 0}}}}\n"
                      f"results: {tmp_path / 'results'}\n")
    stage("metricnet", params)
    assert seen["dir"] == tmp_path / "data" / "digits"
    report = json.loads((out_dir / "metrics.json").read_text())
    assert set(report) == {"train_acc", "val_acc", "steps"} and report["steps"] == 150
    assert report["val_acc"] > 0.9
    net = load_digitnet(out_dir)
    assert net.config["num_classes"] == 10
    assert "val_acc" in capsys.readouterr().out


def test_stage_without_train_spec_is_a_clear_error(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"metrics: {{dir: {tmp_path / 'm'}, train: null}}\nresults: {tmp_path / 'results'}\n")
    with pytest.raises(SystemExit) as exit_info:
        stage("metricnet", params)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "metrics.train" in err and "weights" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_stage_bad_params_no_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stage("metricnet", tmp_path / "missing.yaml")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "Traceback" not in err


def test_stage_data_error_no_traceback(tmp_path, monkeypatch, capsys):
    import flowback.data.manifest as manifest

    def broken(params, split):
        raise FlowBackFileError(f"{params.data.dir}/{split}: shard missing")

    monkeypatch.setattr(manifest, "load_split", broken)
    params = tmp_path / "params.yaml"
    params.write_text(f"metrics: {{dir: {tmp_path / 'm'}, train: {{steps: 1}}}}\nresults: {tmp_path / 'results'}\n")
    with pytest.raises(SystemExit) as exit_info:
        stage("metricnet", params)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "shard missing" in err and "Traceback" not in err


def test_train_and_save_with_arrays(tmp_path):
    from flowback.metrics.digitnet import train_and_save

    train = _separable_split(0, 300)
    wrong = (train[0], (train[1] + 1) % 10)  # val = same images, wrong labels: val_acc must come from val
    report = train_and_save(train, wrong, TrainSpec(steps=150, batch_size=64, lr=3e-3), 10, tmp_path / "m",
                            show_progress=False)
    assert report["train_acc"] > 0.9 and report["val_acc"] < 0.1 and report["steps"] == 150
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == report
