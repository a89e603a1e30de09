"""Decoder fine-tuning on noisy latents (STARFlow's alternative to score denoising), offline with random weights.

A tiny random AutoencoderKL stands in for Stable Diffusion's VAE and random trunks for the perceptual networks' ImageNet
weights: what is tested is the training (loss goes down, only the decoder side moves, determinism, exact resume),
the saved directory, and that nothing is ever downloaded.
"""

import socket
import urllib.request

import pytest
import torch

from flowback.errors import FlowBackError
from flowback.io import FlowBackFileError, load_torch, save_torch
from flowback.models.decoder_finetune import (DecoderFinetuneConfig, DecoderFinetuner, PerceptualLoss,
                                              fetch_perceptual_weights, finetune_decoder, load_vgg_trunk,
                                              noisy_reconstruction, trainable_names)
from flowback.models.vae import LatentCodec, load_vae, save_random_vae, save_vae

SCALE, SIGMA = 0.5, 0.3


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network at all: the hub is switched off and any download or socket connection raises."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_random_vae(tmp_path_factory.mktemp("vae") / "tiny")  # factor 2, 4 latent channels


@pytest.fixture(scope="module")
def lpips_only():
    return PerceptualLoss(lpips=True, convnext=False, random_weights=True)


def smooth_images(n=8, size=16, seed=0):
    """Low-frequency images in [-1, 1]: learnable by a tiny decoder in a few steps."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def pairs(vae_dir, n=8):
    images = smooth_images(n)
    return LatentCodec(load_vae(vae_dir), scale=SCALE).encode(images), images


def config(steps, **kw):
    base = dict(steps=steps, noise_std=SIGMA, scale=SCALE, lr=2e-3, min_lr=1e-4, warmup_steps=0, convnext_weight=0.0,
                gan_weight=0.0, disc_width=8, disc_stages=2)
    return DecoderFinetuneConfig(**(base | kw))


def batches(latents, images, size=4):
    def batch_at(step):
        i = torch.randperm(len(latents), generator=torch.Generator().manual_seed(step))[:size]
        return latents[i], images[i]
    return batch_at


def test_finetuning_lowers_noisy_loss_and_moves_only_the_decoder(vae_dir, lpips_only):
    latents, images = pairs(vae_dir)
    original = load_vae(vae_dir)
    vae = load_vae(vae_dir)
    before = noisy_reconstruction(vae, latents, images, SIGMA, SCALE, seed=123, perceptual=lpips_only)
    finetune_decoder(DecoderFinetuner(vae, config(40), lpips_only), batches(latents, images))
    after = noisy_reconstruction(vae, latents, images, SIGMA, SCALE, seed=123, perceptual=lpips_only)
    assert after["mse"] < 0.7 * before["mse"] and after["lpips"] < before["lpips"]

    old, new = original.state_dict(), vae.state_dict()
    trained = set(trainable_names(vae))
    assert trained and all(n.startswith(("decoder.", "post_quant_conv.")) for n in trained)
    for name in old:
        if name in trained:
            assert not torch.equal(old[name], new[name]), f"{name} did not train"
        else:
            assert torch.equal(old[name], new[name]), f"{name} changed"
    assert any(n.startswith("encoder.") for n in old) and not any(p.requires_grad for p in vae.parameters())
    assert torch.equal(LatentCodec(vae, scale=SCALE).encode(images), latents)  # cached latents stay valid


def run(vae_dir, latents, images, cfg, perceptual, state=None, stop=None):
    tuner = DecoderFinetuner(load_vae(vae_dir), cfg, perceptual)
    if state is not None:
        tuner.load_state_dict(state)
    log = []
    while tuner.step_count < (stop or cfg.steps):  # what finetune_decoder does, stoppable half-way
        log.append(tuner.step(*batches(latents, images)(tuner.step_count)))
    return tuner, log


def test_deterministic_and_resumes_exactly_through_a_weights_only_file(vae_dir, lpips_only, tmp_path):
    latents, images = pairs(vae_dir)
    cfg = config(4, gan_weight=0.1)  # the discriminator's state must resume too
    straight, log = run(vae_dir, latents, images, cfg, lpips_only)
    again, log_again = run(vae_dir, latents, images, cfg, lpips_only)
    assert log == log_again
    for (n, a), b in zip(straight.vae.state_dict().items(), again.vae.state_dict().values()):
        assert torch.equal(a, b), n

    first, log_first = run(vae_dir, latents, images, cfg, lpips_only, stop=2)
    save_torch(tmp_path / "state.pt", first.state_dict())
    state = load_torch(tmp_path / "state.pt")  # weights_only=True
    resumed, log_rest = run(vae_dir, latents, images, cfg, lpips_only, state=state)
    assert log_first + log_rest == log
    for (n, a), b in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().values()):
        assert torch.equal(a, b), n
    for (n, a), b in zip(straight.disc.state_dict().items(), resumed.disc.state_dict().values()):
        assert torch.equal(a, b), n

    other, _ = run(vae_dir, latents, images, config(4, gan_weight=0.1, seed=1), lpips_only)
    assert not torch.equal(other.vae.decoder.conv_out.weight, straight.vae.decoder.conv_out.weight)
    with pytest.raises(FlowBackError, match="noise_std"):
        DecoderFinetuner(load_vae(vae_dir), config(4, gan_weight=0.1, noise_std=0.2), lpips_only).load_state_dict(state)


def test_saved_vae_loads_unchanged_and_decodes_with_the_new_decoder(vae_dir, lpips_only, tmp_path):
    latents, images = pairs(vae_dir)
    tuner = DecoderFinetuner(load_vae(vae_dir), config(3), lpips_only)
    vae = finetune_decoder(tuner, batches(latents, images))
    save_vae(vae, tmp_path / "decoder")
    codec = LatentCodec(load_vae(tmp_path / "decoder"), scale=SCALE)
    with torch.no_grad():
        expected = vae.decode(latents / SCALE).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(latents), expected, rtol=0, atol=0)
    assert not torch.equal(codec.decode(latents), LatentCodec(load_vae(vae_dir), scale=SCALE).decode(latents))
    assert torch.equal(codec.encode(images), latents)


def test_full_starflow_loss_runs_offline_with_random_trunks(vae_dir):
    latents, images = pairs(vae_dir, n=2)
    perceptual = PerceptualLoss(lpips=True, convnext=True, random_weights=True)  # nothing downloaded
    tuner = DecoderFinetuner(load_vae(vae_dir), config(1, convnext_weight=0.1, gan_weight=0.1), perceptual)
    disc_before = {n: p.clone() for n, p in tuner.disc.state_dict().items()}
    terms = tuner.step(latents, images)
    assert {"mse", "lpips", "convnext", "gan", "disc", "lecam", "total"} <= terms.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    w = tuner.config
    expected = w.mse_weight * terms["mse"] + w.lpips_weight * terms["lpips"] + w.convnext_weight * terms["convnext"] \
        + w.gan_weight * terms["gan"]
    assert terms["total"] == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(disc_before[n], p) for n, p in tuner.disc.state_dict().items())
    with pytest.raises(ValueError, match="do not match"):
        DecoderFinetuner(load_vae(vae_dir), config(1), perceptual)  # the config has no ConvNeXt term


@pytest.mark.parametrize("weights,name", [((True, False), "vgg16-397923af.pth"),
                                          ((False, True), "convnext_small-0c510722.pth")])
def test_missing_or_damaged_loss_weights_are_named(tmp_path, weights, name):
    with pytest.raises(FlowBackFileError, match=name) as e:
        PerceptualLoss(*weights, weights_dir=tmp_path)
    assert "\n" not in str(e.value) and "missing" in str(e.value)
    (tmp_path / name).write_bytes(b"a file already there")  # fetching keeps it: no download (the network raises)
    assert fetch_perceptual_weights(tmp_path, *weights) == [tmp_path / name]
    with pytest.raises(AssertionError, match="network"):  # a missing file is downloaded (refused here)
        fetch_perceptual_weights(tmp_path / "empty", *weights)
    with pytest.raises(FlowBackFileError, match=f"{name}: sha256"):
        PerceptualLoss(*weights, weights_dir=tmp_path)


def test_vgg_trunk_is_read_from_torchvision_file_layer_by_layer(lpips_only, tmp_path, monkeypatch):
    import copy

    from flowback.models import decoder_finetune
    from torchvision.models import vgg16

    torch.manual_seed(1)
    state = {f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}
    torch.save(state, tmp_path / "vgg16-397923af.pth")  # torchvision's layout (its classifier left out: unused)
    monkeypatch.setattr(decoder_finetune, "sha256_file", lambda path: "397923af" + "0" * 56)  # not the real file
    loaded = PerceptualLoss(True, False, weights_dir=tmp_path).lpips.net.state_dict()
    convs = [i for i in range(30) if f"features.{i}.weight" in state]
    assert len(convs) == 13  # VGG16's 13 convolutions, spread over lpips' 5 slices
    for i in convs:
        [key] = [k for k in loaded if k.endswith(f".{i}.weight")]
        assert torch.equal(loaded[key], state[f"features.{i}.weight"])
    del state["features.28.bias"]
    with pytest.raises(ValueError, match="28"):
        load_vgg_trunk(copy.deepcopy(lpips_only.lpips.net), state)
