"""Latent mode: the diffusers VAE wrapper (load, encode, decode, errors) and latent sampling through the sample stage.

No real VAE can be downloaded here, so tiny randomly initialised AutoencoderKLs are saved to temporary directories.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import generate_flow, stage
import torch
import yaml
from safetensors.torch import load_file, save_file

from flowback.io import FlowBackFileError
from flowback.models.sampling import sample
from flowback.models.tarflow import FlowConfig, TARFlow
from flowback.models.vae import LatentCodec, load_vae, save_random_vae

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import: patch it too


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one thread is faster, and far faster on a busy machine (OpenMP threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_random_vae(tmp_path_factory.mktemp("vae") / "tiny")  # 2 blocks: factor 2


@pytest.fixture(scope="module")
def codec(vae_dir):
    return LatentCodec(load_vae(vae_dir), scale=0.5, batch_size=3)


def images(n=5, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_flow(cfg: FlowConfig) -> TARFlow:
    torch.manual_seed(0)
    model = TARFlow(cfg)
    with torch.no_grad():  # zero-initialised outputs make every block the identity
        for blk in model.blocks:
            blk.proj_out.weight.normal_(0, 0.05)
            blk.proj_out.bias.normal_(0, 0.05)
    return model.eval()


def test_round_trip_shapes_and_frozen(codec):
    assert codec.factor == 2 and codec.latent_channels == 4
    x = images()
    z = codec.encode(x)
    assert z.shape == (5, 4, 4, 4)
    out = codec.decode(z)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training and not codec.vae.training


def test_encode_is_the_scaled_posterior_mean_and_deterministic(codec):
    x = images(seed=1)
    with torch.no_grad():
        dist = codec.vae.encode(x).latent_dist
    mean, std = codec.encode_with_std(x)  # batch_size 3: two batches, same result as one
    torch.testing.assert_close(mean, dist.mean * 0.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, dist.std * 0.5, rtol=1e-5, atol=1e-6)
    assert torch.equal(codec.encode(x), codec.encode(x))
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(mean), codec.vae.decode(dist.mean).sample.clamp(-1, 1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no_vae_here"
    for allow_hub in (False, True):  # offline: the hub fails too, and the error still names the directory
        with pytest.raises(FlowBackFileError, match="no_vae_here"):
            load_vae(missing, allow_hub=allow_hub)


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def _drop_a_weight(d):
    weights = load_file(d / "diffusion_pytorch_model.safetensors")
    del weights["decoder.conv_in.bias"]  # diffusers would only log this and keep a random bias
    save_file(weights, d / "diffusion_pytorch_model.safetensors")


DAMAGE = {
    "config not json": lambda d: (d / "config.json").write_text("{not json"),
    "another diffusers class": lambda d: _edit_config(d, _class_name="UNet2DModel"),
    "config disagrees with weights": lambda d: _edit_config(d, latent_channels=8),
    "garbage weights": lambda d: (d / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage"),
    "weights missing a key": _drop_a_weight,
    "no weights": lambda d: (d / "diffusion_pytorch_model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_directory_is_named(vae_dir, tmp_path, damage):
    bad = shutil.copytree(vae_dir, tmp_path / "bad_vae")
    DAMAGE[damage](bad)
    with pytest.raises(FlowBackFileError, match="bad_vae"):
        load_vae(bad)


def test_latent_flow_samples_denoises_and_decodes(codec, tmp_path):
    model = random_flow(FlowConfig(channels=4, image_size=4, patch_size=2, width=16, layers=(1, 1), head_dim=8,
                                   mlp_ratio=1, num_classes=3))
    y = torch.tensor([0, 1, 2, 0])
    z = sample(model, y, torch.Generator().manual_seed(0), denoise_sigma=0.2)
    assert z.shape == (4, 4, 4, 4) and torch.isfinite(z).all()
    x = codec.decode(z)
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    imgs, _ = generate_flow(model, y.numpy(), tmp_path / "chunks", 3, 0, denoise_sigma=0.2,
                       decode=codec.decode)
    assert imgs.shape == (4, 8, 8, 3) and imgs.dtype == np.uint8


def latent_params(tmp_path, vae_dir):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["results"] = str(tmp_path / "results")
    raw["model"].update(patch_size=1, width=16, blocks=2, layers=1, head_dim=8, mlp_ratio=1, noise_std=0.2,
                        latent={"vae_dir": str(vae_dir)})
    raw["runtime"].update(threads=1, device="cpu")
    raw["sample"].update(per_class=1, batch_size=8)
    raw["sweep"]["scales"] = []  # sampled at sample.guidance's weight: no sweep to run first
    raw["experiments"] = {"latent": {"strategy": "none"}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_sample_stage_decodes_latents_to_image_size(tmp_path, capsys):
    from flowback.builders import flow_config
    from flowback.checkpoints import save_flow
    from flowback.params import load_params

    sd_like = save_random_vae(tmp_path / "sd_like", block_out_channels=(8, 8, 8, 8))  # factor 8, as SD's VAE
    path = latent_params(tmp_path, sd_like)
    params = load_params(path)
    cfg = flow_config(params.run("latent-s0").params)
    assert (cfg.channels, cfg.image_size) == (4, params.data.image_size // 8)
    save_flow(params.run_dir("latent-s0") / "model.pt", random_flow(cfg))
    stage("sample", path, "latent-s0")
    run = params.run_dir("latent-s0")
    npz = np.load(run / "samples.npz", allow_pickle=False)
    size = params.data.image_size
    assert npz["arr_0"].shape == (10, size, size, 3) and npz["arr_0"].dtype == np.uint8
    assert (run / "samples.png").stat().st_size > 0 and not (run / "chunks").exists()

    # a VAE whose downsampling disagrees with the flow's latent grid stops the stage, naming its directory
    path = latent_params(tmp_path, save_random_vae(tmp_path / "factor_two"))
    with pytest.raises(SystemExit) as e:
        stage("sample", path, "latent-s0")
    assert e.value.code == 2 and "factor_two" in capsys.readouterr().err
