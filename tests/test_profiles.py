"""The paper profiles: valid, the paper's configurations, every row of the paper's tables mapped to an experiment."""

from pathlib import Path

import pytest
import torch
from conftest import stage

from flowback.builders import flow_config
from flowback.paper import TABLES
from flowback.params import load_params

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


@pytest.fixture(scope="module")
def profiles():
    return {p.stem: load_params(p) for p in sorted(PROFILES.glob("imagenet*.yaml"))}


def test_every_paper_row_is_reproduced_by_some_profile(profiles):
    mapped = {e.paper for p in profiles.values() for e in p.experiments.values() if e.paper}
    wanted = {f"{t}/{r}" for t, spec in TABLES.items() for r in spec["rows"]}
    assert mapped == wanted


def test_imagenet64_is_tarflows_published_recipe(profiles):
    from flowback.models import TARFlow

    p = profiles["imagenet64"]
    cfg = flow_config(p)
    assert (cfg.num_tokens, cfg.token_dim, cfg.width, cfg.layers) == (1024, 12, 768, (8,) * 8)
    with torch.device("meta"):
        millions = sum(x.numel() for x in TARFlow(cfg).parameters()) / 1e6
    assert 440 < millions < 480  # TARFlow's ImageNet-64 model: about 460M parameters
    assert (p.train.batch_size, p.train.lr, p.model.noise_std, p.model.label_drop) == (256, 1e-4, 0.05, 0.1)
    assert p.sample.per_class * p.data.num_classes == 50_000 and p.sample.guidance.method == "none"
    l6 = p.run("reverse_78_l6-s0")
    assert l6.positions == [(7, 6), (8, 6)]


def test_imagenet256_trains_on_vae_latents(profiles):
    p = profiles["imagenet256"]
    cfg = flow_config(p)
    assert (cfg.channels, cfg.image_size, cfg.num_tokens) == (4, 32, 256)
    assert p.model.noise_std == 0.2 and p.data.format == "latent" and p.data.resize == "adm"
    assert flow_config(p.run("rrepa_patch1-s0").params).num_tokens == 1024  # "Patch1"
    assert p.run("rrepa_patch1-s0").params.sample.guidance.method == "tarflow"


def test_profiles_name_the_pretrained_networks_to_fetch(profiles):
    from flowback.weights import required_networks

    for name, p in profiles.items():
        nets = {n.name: n for n in required_networks(p)}
        assert {"encoder", "inception"} <= set(nets), name
        assert ("vae" in nets) == (p.model.latent is not None), name
        assert nets["encoder"].source == "vit_base_patch14_dinov2.lvd142m"


def test_metricnet_converts_fetched_inception_to_safetensors(tmp_path):
    """Paper profiles: the fetched torch-fidelity file becomes {metrics.dir}/model.safetensors, same features."""
    from flowback.metrics.inception import INCEPTION_FILE, load_inception, random_inception_state

    d = tmp_path / "inception"
    d.mkdir()
    torch.save(random_inception_state(), d / INCEPTION_FILE)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    before = load_inception(d).features(x)
    params = tmp_path / "params.yaml"
    params.write_text(f"metrics: {{network: inception, dir: {d}}}\nresults: {tmp_path / 'results'}\n")
    stage("metricnet", params)
    assert (d / "model.safetensors").exists() and (d / "metrics.json").exists()
    (d / INCEPTION_FILE).unlink()  # from now on only the safetensors file is read
    after = load_inception(d).features(x)
    for k in before:
        assert torch.equal(before[k], after[k]), k
