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
    return {p.stem: load_params(p) for p in sorted(PROFILES.glob("*.yaml"))}  # every paper profile: imagenet*, starflow*


def test_the_paper_profiles_are_all_loaded(profiles):
    assert {"imagenet64", "imagenet64_1m", "imagenet256", "starflow256"} <= set(profiles)


def test_every_paper_row_is_reproduced_by_some_profile(profiles):
    mapped = {row for p in profiles.values() for e in p.experiments.values() for row in e.paper_rows}
    wanted = {f"{t}/{r}" for t, spec in TABLES.items() for r in spec["rows"]}
    assert mapped == wanted


def test_imagenet64_is_r_repas_model_and_protocol(profiles):
    """R-REPA sec. 5: 8 x 8 blocks of width 1024 on 4x4 patches (256 tokens); FID-4096 at each model's best scale."""
    from flowback.models.tarflow import TARFlow

    p = profiles["imagenet64"]
    cfg = flow_config(p)
    assert (cfg.num_tokens, cfg.token_dim, cfg.width, cfg.layers) == (256, 48, 1024, (8,) * 8)
    with torch.device("meta"):
        millions = sum(x.numel() for x in TARFlow(cfg).parameters()) / 1e6
    assert 800 < millions < 830  # 64 layers of 12 x 1024^2 weights: about 0.8B parameters
    assert (p.train.batch_size, p.train.lr, p.train.ema_decay, p.align.weight) == (256, 1e-4, 0.9999, 0.1)
    assert p.samples_per_run == 4096 and p.sample.guidance.method == "tarflow" and p.sweep.count == 4096
    assert p.sweep.scales == [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    assert p.run("reverse_78-s0").positions == [(7, 2), (8, 2)]  # Table 1 groups 1-2: layer 2
    assert p.run("reverse_78_l6-s0").positions == [(7, 6), (8, 6)]


def test_imagenet256_trains_on_vae_latents(profiles):
    p = profiles["imagenet256"]
    cfg = flow_config(p)
    assert (cfg.channels, cfg.image_size, cfg.num_tokens, cfg.width) == (4, 32, 256, 1024)
    assert (cfg.pos_embed, cfg.mlp) == ("rope", "swiglu")  # sec. 5
    assert p.model.noise_std == 0.2 and p.data.format == "latent"
    assert flow_config(p.run("rrepa_patch1-s0").params).num_tokens == 1024  # "Patch1"
    assert p.run("rrepa_patch1-s0").params.samples_per_run == 50_000


def test_starflow256_is_the_papers_class_conditional_layout(profiles):
    """STARFlow's class-conditional ImageNet-256 model: d(N) = 18(6), width 2048, patch 1 on SD-VAE latents, 1.4B
    parameters; ml-starflow's architecture switches; its guidance on the deep block; mapped to the paper's Table 1."""
    from flowback.models.guidance import Guidance
    from flowback.models.tarflow import TARFlow

    p = profiles["starflow256"]
    cfg = flow_config(p)
    assert (cfg.channels, cfg.image_size, cfg.patch_size, cfg.num_tokens, cfg.width) == (4, 32, 1, 1024, 2048)
    assert cfg.layers == (2, 2, 2, 2, 2, 18)  # forward order: the deep block is block N, next to the prior
    assert cfg.cond_blocks == "deep" and cfg.cond_token and cfg.start_token and cfg.final_norm
    assert (cfg.pos_embed, cfg.scale, cfg.soft_clip) == ("rope", "softplus", 4.0)
    assert (p.model.noise_std, p.model.label_drop, p.train.latent_norm_weight) == (0.3, 0.1, 1e-4)
    # ml-starflow's own layout: block order, 3-D RoPE by processing order, learned null label, its latent-norm form
    assert (cfg.mlp, cfg.seq_order, cfg.rope_layout, cfg.rope_order, cfg.null_class) == ("gelu", "L2R", "3d", "sequence",
                                                                                         "learned")
    assert p.train.latent_norm_form == "starflow" and p.sample.guidance.attn_temp_on == "all"
    assert [b.flip for b in TARFlow(cfg.__class__(**{**cfg.to_dict(), "width": 64, "layers": [1] * 6})).blocks] == \
        [True, False, True, False, True, False]  # the deep block (6) generates in raster order
    assert p.data.format == "latent" and p.model.latent.hub == "stabilityai/sd-vae-ft-ema"
    with torch.device("meta"):
        model = TARFlow(cfg)
        millions = sum(x.numel() for x in model.parameters()) / 1e6
        deep = sum(x.numel() for x in model.blocks[-1].parameters()) / 1e6
    assert 1400 * 0.97 < millions < 1400 * 1.03  # the paper's "1.4B"
    assert deep > 0.6 * millions  # the deep block holds most of the capacity
    g = Guidance.of(p.sample.guidance)
    assert g.method == "starflow" and g.active and not g.anneal
    assert [g.applies_to(b, 6) for b in range(1, 7)] == [False] * 5 + [True]  # the deep block only
    assert (p.train.batch_size, p.sample.per_class * p.data.num_classes) == (512, 50_000)
    base = p.run("starflow-s0")
    assert base.strategy == "none" and base.paper == "starflow/starflow_guided"
    aligned = p.run("starflow_rrepa-s0")  # our extension: no paper row
    assert aligned.positions == [(6, 6)] and aligned.paper is None


def test_profiles_name_the_pretrained_networks_to_fetch(profiles):
    from flowback.weights import required_networks

    for name, p in profiles.items():
        nets = required_networks(p)
        kinds = {n.name for n in nets}
        aligns = any(e.strategy != "none" for e in p.experiments.values())
        assert "inception" in kinds and ("encoder" in kinds) == aligns, name
        assert ("vae" in kinds) == (p.model.latent is not None), name
        encoders = {n.source for n in nets if n.name == "encoder"}
        if aligns:
            assert "vit_base_patch14_dinov2.lvd142m" in encoders
    table8 = {n.source for n in required_networks(profiles["imagenet64"]) if n.name == "encoder"}
    assert table8 == {"vit_base_patch14_dinov2.lvd142m", "vit_large_patch14_dinov2.lvd142m",
                      "vit_base_patch16_clip_224.openai", "vit_base_patch16_224.mae"}  # R-REPA Table 8


def test_metricnet_converts_fetched_inception_to_safetensors(tmp_path, one_thread):
    """Paper profiles: the fetched torch-fidelity file becomes {metrics.dir}/model.safetensors, same features."""
    from flowback.metrics.inception import INCEPTION_FILE, load_inception, random_inception_state

    d = tmp_path / "inception"
    d.mkdir()
    torch.save(random_inception_state(), d / INCEPTION_FILE)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    before = load_inception(d).features(x)
    params = tmp_path / "params.yaml"
    params.write_text(f"metrics: {{network: inception, dir: {d}}}\nresults: {tmp_path / 'results'}\n"
                      f"runtime: {{threads: 1}}\n")  # the thread count of `before`: the same sums, the same order
    stage("metricnet", params)
    assert (d / "model.safetensors").exists() and (d / "metrics.json").exists()
    (d / INCEPTION_FILE).unlink()  # from now on only the safetensors file is read
    after = load_inception(d).features(x)
    for k in before:
        assert torch.equal(before[k], after[k]), k
