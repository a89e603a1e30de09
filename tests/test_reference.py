"""Reference statistics (stages.reference, flowback/metrics/reference.py): the same metrics as computing the reference
features per experiment, ADM reference batches, refusal of stale or foreign files, agreement with torch-fidelity's own
FID and IS on (random) Inception, and the classifier's inputs in latent mode."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import stage
import torch
from conftest import random_flow
import torch_fidelity

from flowback.io import FlowBackFileError
from flowback.metrics.classifier import classifier_accuracy, classifier_inputs, classify
from flowback.metrics.digitnet import DigitNet, save_digitnet
from flowback.metrics.frechet import gaussian_stats
from flowback.metrics.generative import extract_features, generative_metrics, load_feature_network
from flowback.metrics.reference import (compute_reference, load_reference, read_adm_batch, reference_fingerprint,
                                        reference_from_features, reference_path, report_path, save_reference)
from flowback.params import ParamsError, validate
from test_metrics import U8Dataset  # torch-fidelity's input, shared with test_metrics


def digitnet(seed: int = 0) -> DigitNet:
    torch.manual_seed(seed)
    net = DigitNet().eval()
    with torch.no_grad():  # spread the features of a random net (as in test_metrics)
        for conv in (net.conv1, net.conv2, net.conv3):
            conv.weight.mul_(3)
        net.head.weight.mul_(40)
    return net


def blocky(seed: int, n: int, block: int, channels: int = 1, size: int = 16) -> torch.Tensor:
    """Noise in block x block cells with a random per-image brightness: structured, and different per `block`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size // block, size // block, generator=g)
    x = torch.nn.functional.interpolate(x, size=size, mode="nearest")
    return (x * (0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=g)) * 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------- same metrics as before
def test_stored_reference_gives_exactly_the_per_experiment_metrics(tmp_path):
    net = digitnet()
    samples, real = blocky(1, 120, 2), blocky(2, 150, 4)
    sample_feats = extract_features(net, samples, 50, show_progress=False)
    ref_feats = extract_features(net, real, 50, show_progress=False)
    before = generative_metrics(sample_feats, ref_feats, isc_splits=4)
    ref = reference_from_features(ref_feats, isc_splits=4, source="digits/train", fingerprint={"k": "v"})
    save_reference(tmp_path / "r.npz", ref)
    loaded = load_reference(tmp_path / "r.npz", expected={"k": "v"})
    after = loaded.metrics(sample_feats, isc_splits=4)
    assert after == before  # bit for bit: the same float64 statistics and float32 pool features
    assert loaded.count == 150 and loaded.source == "digits/train" and loaded.stats_from == "features"
    assert loaded.ref_pool.dtype == np.float32 and loaded.mu.dtype == np.float64
    assert loaded.inception_score > 1.0  # the reference's own IS, from the logits
    npz = np.load(tmp_path / "r.npz", allow_pickle=False)  # no pickles in the file
    assert {"mu", "sigma", "mu_s", "sigma_s", "ref_pool", "is", "fingerprint"} <= set(npz.files)


def test_missing_or_foreign_reference_is_an_error_naming_the_file(tmp_path):
    net = digitnet()
    ref = reference_from_features(extract_features(net, blocky(3, 40, 2), 40, show_progress=False), isc_splits=2,
                                  fingerprint={"network": "digitnet", "network_sha256": "a" * 64, "batch_size": 256})
    with pytest.raises(FlowBackFileError, match=r"r\.npz: no reference statistics; run `python -m flowback stage reference`"):
        load_reference(tmp_path / "r.npz", expected={})
    save_reference(tmp_path / "r.npz", ref)
    other = {"network": "digitnet", "network_sha256": "b" * 64, "batch_size": 128}
    with pytest.raises(FlowBackFileError, match=r"r\.npz: computed with another metric network or settings "
                                                r"\(batch_size: 256 in the file, 128 now; network_sha256: .*"
                                                r"run `python -m flowback stage reference`"):
        load_reference(tmp_path / "r.npz", expected=other)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(FlowBackFileError, match=r"bad\.npz: not a FlowBack reference file \(missing sigma"):
        load_reference(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------- stage, default source
def _digits_params(tmp_path, **metrics):
    return validate({"data": {"root": str(tmp_path / "data")},
                     "metrics": {"dir": str(tmp_path / "metric"), "isc_splits": 2, **metrics}})


def test_fingerprint_tracks_network_weights_and_settings(tmp_path):
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, arr_0=np.zeros((4, 16, 16, 1), np.uint8), mu=np.zeros(128), sigma=np.eye(128),
             mu_s=np.zeros(256), sigma_s=np.eye(256))
    p = _digits_params(tmp_path, reference_batch=str(adm))
    a, b = reference_fingerprint(p, digitnet(0)), reference_fingerprint(p, digitnet(1))
    assert a["network_sha256"] != b["network_sha256"] and a["source_sha256"] == b["source_sha256"]
    assert reference_fingerprint(_digits_params(tmp_path, reference_batch=str(adm), batch_size=7),
                                 digitnet(0))["batch_size"] == 7
    assert reference_fingerprint(p, digitnet(0)) == a  # deterministic


# ----------------------------------------------------------------------------------------------- ADM reference batch
def fake_adm_batch(path, n: int = 60, drop: str | None = None, **override) -> dict:
    """A tiny stand-in for guided-diffusion's VIRTUAL_*.npz: arr_0 uint8 NHWC images + precomputed mu/sigma/mu_s/sigma_s
    (here of DigitNet's dims, 128 pool and 8*8*4 = 256 spatial)."""
    rng = np.random.RandomState(0)
    arrays = {"arr_0": np.ascontiguousarray(blocky(5, n, 2).permute(0, 2, 3, 1).numpy()),
              "mu": rng.randn(128), "sigma": np.cov(rng.randn(300, 128), rowvar=False),
              "mu_s": rng.randn(256), "sigma_s": np.cov(rng.randn(300, 256), rowvar=False)}
    arrays.update(override)
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return arrays


def test_adm_batch_statistics_come_from_the_file_and_pool_features_from_arr_0(tmp_path):
    adm = tmp_path / "VIRTUAL_tiny_labeled.npz"
    arrays = fake_adm_batch(adm)
    p = _digits_params(tmp_path, reference_batch=str(adm))
    net = digitnet()
    ref = compute_reference(p, net, show_progress=False)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        assert np.array_equal(getattr(ref, key), arrays[key]), key
    ours = extract_features(net, torch.from_numpy(arrays["arr_0"]).permute(0, 3, 1, 2), 256, show_progress=False)
    # precision/recall: our network on arr_0 (to rounding: the memory layout picks the convolution kernels)
    np.testing.assert_allclose(ref.ref_pool, ours["pool"].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref.mu, gaussian_stats(ours["pool"])[0])  # not recomputed from the features
    assert ref.stats_from == "file" and ref.source == str(adm) and ref.count == 60
    assert reference_path(p) == tmp_path / "metric" / "reference" / "VIRTUAL_tiny_labeled.npz"
    save_reference(reference_path(p), ref)
    loaded = load_reference(reference_path(p), expected=reference_fingerprint(p, net))
    assert np.array_equal(loaded.sigma_s, arrays["sigma_s"])
    # evaluate against it: FID uses the file's mu/sigma
    sample_feats = extract_features(net, blocky(6, 40, 4), 256, show_progress=False)
    from flowback.metrics.frechet import frechet_distance

    assert loaded.metrics(sample_feats, isc_splits=2)["fid"] == pytest.approx(
        frechet_distance(*gaussian_stats(sample_feats["pool"]), arrays["mu"], arrays["sigma"]), rel=1e-12)
    # a changed batch file is another reference
    fake_adm_batch(adm, n=61)
    with pytest.raises(FlowBackFileError, match="source_sha256"):
        load_reference(reference_path(p), expected=reference_fingerprint(p, net))


@pytest.mark.parametrize("drop", ["mu_s", "arr_0"])
def test_adm_batch_missing_key_is_an_error_naming_the_file(tmp_path, drop):
    adm = tmp_path / "VIRTUAL_broken.npz"
    fake_adm_batch(adm, drop=drop)
    with pytest.raises(FlowBackFileError, match=rf"VIRTUAL_broken\.npz: not an ADM reference batch, missing {drop}"):
        read_adm_batch(adm)


@pytest.mark.parametrize("override, message", [
    ({"mu": np.zeros(128, np.int64)}, r"mu is int64, expected a float array"),
    ({"sigma": np.eye(127)}, r"mu \(128,\) and sigma \(127, 127\) are not a mean"),
    ({"arr_0": np.zeros((4, 16, 16, 1), np.float32)}, r"arr_0 must hold at least 2 uint8 NHWC images"),
    ({"sigma_s": np.full((256, 256), np.nan)}, r"sigma_s has non-finite entries"),
])
def test_adm_batch_wrong_dtype_or_shape_is_an_error_naming_the_file(tmp_path, override, message):
    adm = tmp_path / "VIRTUAL_bad.npz"
    fake_adm_batch(adm, **override)
    with pytest.raises(FlowBackFileError, match=rf"VIRTUAL_bad\.npz: {message}"):
        read_adm_batch(adm)


def test_adm_batch_of_another_network_is_an_error(tmp_path):
    adm = tmp_path / "VIRTUAL_inception.npz"
    fake_adm_batch(adm, mu=np.zeros(2048), sigma=np.eye(2048))
    p = _digits_params(tmp_path, reference_batch=str(adm))
    with pytest.raises(FlowBackFileError, match=r"VIRTUAL_inception\.npz: statistics of dims .*made for another"):
        compute_reference(p, digitnet(), show_progress=False)


def test_stage_writes_npz_and_report_and_names_a_broken_batch(tmp_path, capsys):
    net = digitnet()
    save_digitnet(net, tmp_path / "metric")
    adm = tmp_path / "VIRTUAL_tiny.npz"
    fake_adm_batch(adm)
    params = tmp_path / "params.yaml"
    params.write_text(f"metrics: {{dir: {tmp_path / 'metric'}, isc_splits: 2, reference_batch: {adm}}}\n"
                      f"results: {tmp_path / 'results'}\nruntime: {{device: cpu}}\n")
    stage("reference", params)
    report = json.loads((tmp_path / "metric" / "reference.json").read_text())
    assert report["count"] == 60 and report["network"] == "digitnet" and report["stats_from"] == "file"
    assert report["dims"] == {"pool": 128, "spatial": 256} and report["source"] == str(adm)
    p = validate({"metrics": {"dir": str(tmp_path / "metric"), "isc_splits": 2, "reference_batch": str(adm)}})
    assert report_path(p) == tmp_path / "metric" / "reference.json"
    loaded = load_reference(reference_path(p), expected=reference_fingerprint(p, load_feature_network(
        "digitnet", tmp_path / "metric")))
    assert loaded.count == 60
    fake_adm_batch(adm, drop="sigma")
    with pytest.raises(SystemExit) as e:
        stage("reference", params)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "VIRTUAL_tiny.npz: not an ADM reference batch, missing sigma" in err and "Traceback" not in err


def test_evaluate_without_or_with_a_stale_reference_says_to_run_the_reference_stage(tmp_path, capsys):
    save_digitnet(digitnet(0), tmp_path / "metric")
    adm = tmp_path / "VIRTUAL_tiny.npz"
    fake_adm_batch(adm)
    params = tmp_path / "params.yaml"
    params.write_text(f"metrics: {{dir: {tmp_path / 'metric'}, isc_splits: 2, reference_batch: {adm}}}\n"
                      f"results: {tmp_path / 'results'}\nruntime: {{device: cpu}}\n")
    npz = tmp_path / "metric" / "reference" / "VIRTUAL_tiny.npz"
    with pytest.raises(SystemExit):
        stage("evaluate", params, "baseline-s0")
    err = capsys.readouterr().err
    assert f"{npz}: no reference statistics; run `python -m flowback stage reference` first" in err

    stage("reference", params)
    save_digitnet(digitnet(1), tmp_path / "metric")  # the metric network changed since
    with pytest.raises(SystemExit):
        stage("evaluate", params, "baseline-s0")
    err = capsys.readouterr().err
    assert f"{npz}: computed with another metric network or settings (network_sha256: " in err
    assert "run `python -m flowback stage reference`" in err and "Traceback" not in err


def test_latent_shards_without_pixels_need_a_reference_batch(tmp_path, monkeypatch):
    import flowback.data.manifest as manifest

    monkeypatch.setattr(manifest, "load_manifest", lambda d: SimpleNamespace(pixels=False))
    p = _digits_params(tmp_path)
    with pytest.raises(ParamsError, match=r"metrics.reference_batch: the shards in .* hold VAE latents without pixels"):
        compute_reference(p, digitnet(), show_progress=False)


# ------------------------------------------------------------------------------- torch-fidelity on (random) Inception
def test_fid_and_is_agree_with_torch_fidelity_on_inception(tmp_path):
    """Our path (InceptionFeatures loaded with weights_only, reference statistics saved and read back) against
    torch-fidelity's own calculate_metrics reading the same weights file; random weights, as the real ones cannot be
    fetched here. Few images: Inception at 299 px costs ~0.1-0.5 s per image on 2 CPU cores."""
    from flowback.metrics.inception import INCEPTION_FILE, random_inception_state

    state = random_inception_state(0)
    state["fc.weight"] = state["fc.weight"] * 100  # random logits are nearly uniform (IS ~1.001): spread them
    torch.save(state, tmp_path / INCEPTION_FILE)
    net = load_feature_network("inception", tmp_path)
    samples, real = blocky(11, 24, 4, channels=3, size=32), blocky(12, 24, 16, channels=3, size=32)
    bs = 12
    ref = reference_from_features(extract_features(net, real, bs, show_progress=False), isc_splits=2)
    save_reference(tmp_path / "ref.npz", ref)
    ours = load_reference(tmp_path / "ref.npz").metrics(extract_features(net, samples, bs, show_progress=False),
                                                       isc_splits=2)
    theirs = torch_fidelity.calculate_metrics(
        input1=U8Dataset(samples), input2=U8Dataset(real), fid=True, isc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(tmp_path / INCEPTION_FILE), cuda=False, samples_shuffle=False,
        isc_splits=2, batch_size=bs, verbose=False, save_cpu_ram=True, cache=False)
    assert ours["fid"] > 1.0 and ours["is"] > 1.2  # far from the trivial values 0 and 1
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)


# --------------------------------------------------------------------------------------- classifier in latent mode
def latent_flow():
    return random_flow(0, 0.1, bias=False, channels=4, image_size=4, width=16, layers=(1, 1), mlp_ratio=1,
                       num_classes=3)


def test_classifier_takes_float_latents_as_model_inputs():
    model = latent_flow()
    x = torch.randn(10, 4, 4, 4)
    labels = classify(model, x).numpy()
    labels[:3] = (labels[:3] + 1) % 3  # three wrong on purpose
    assert classifier_accuracy(model, x.numpy().astype(np.float16), labels, batch_size=4,
                               show_progress=False) == pytest.approx(0.7)
    with pytest.raises(TypeError, match="uint8 images or float latents"):
        classifier_accuracy(model, np.zeros((2, 4, 4, 4), np.int32), np.zeros(2), show_progress=False)


def test_classifier_inputs_in_latent_mode_are_the_unflipped_posterior_means(tmp_path, monkeypatch):
    import flowback.data.manifest as manifest

    p = validate({"data": {"dataset": "imagenet", "source": "/x", "root": str(tmp_path), "image_size": 32,
                           "format": "latent"}, "model": {"patch_size": 1, "latent": {"vae_dir": "/v"}}})
    mean = np.random.RandomState(0).randn(5, 2, 4, 4, 4).astype(np.float16)
    settings = {**manifest.prepared_settings(p), "splits": {}}
    monkeypatch.setattr(manifest, "load_manifest", lambda d: manifest.Manifest.model_validate(settings))
    monkeypatch.setattr(manifest, "read_latents", lambda d, split: {"mean": mean, "std": mean, "label": np.arange(5)})
    inputs, labels = classifier_inputs(p, "val")
    assert inputs.dtype == np.float32 and np.array_equal(inputs, mean[:, 0].astype(np.float32))
    assert labels.tolist() == [0, 1, 2, 3, 4]
    monkeypatch.setattr(manifest, "load_manifest",
                        lambda d: manifest.Manifest.model_validate({**settings, "image_size": 64}))
    with pytest.raises(FlowBackFileError, match="prepared with other settings"):
        classifier_inputs(p, "val")
