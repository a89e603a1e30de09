"""Reference checkpoints import exactly: a checkpoint written here in ml-tarflow's / ml-starflow's key layout (keys
and shapes as their transformer_flow.py names them; no reference code is imported) becomes a FlowBack model equal to
the one built from the same tensors (z, log-det and a sample bit for bit), through `flowback weights import` into a
run's model.pt. A checkpoint that does not fit the params' model is a one-line error naming the first bad key."""

import pytest
import torch
from conftest import tiny_params

from flowback.builders import flow_config
from flowback.checkpoints import load_flow
from flowback.cli import main
from flowback.models.convert import WeightMappingError, convert
from flowback.models.sampling import sample
from flowback.models.tarflow import FlowConfig, TARFlow
from flowback.params import load_params
from flowback.weight_import import import_weights


def randomized(cfg: FlowConfig, seed: int = 0) -> TARFlow:
    """A FlowBack model whose every weight is random (zero output projections would make the flow the identity)."""
    torch.manual_seed(seed)
    model = TARFlow(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 / p.shape[-1] ** 0.5 if "proj_out" in name else 0.3))
    return model.eval()


# -- the references' layouts, written from a FlowBack model ------------------------------------------------------
def layer_keys(fb: dict, t: int, l: int, ref: dict, qk=None, gated=False) -> None:
    src, dst = f"blocks.{t}.layers.{l}", f"blocks.{t}.attn_blocks.{l}"
    for n in ("weight", "bias"):
        qkv = fb[f"{src}.attn.qkv.{n}"]
        ref[f"{dst}.attention.qkv.{n}"] = qkv if qk is None else qkv[qk]
        for part in ("attn.norm", "attn.proj"):
            ref[f"{dst}.{part.replace('attn', 'attention')}.{n}"] = fb[f"{src}.{part}.{n}"]
        ref[f"{dst}.mlp.norm.{n}"] = fb[f"{src}.mlp.norm.{n}"]
        fc1, fc2 = fb[f"{src}.mlp.fc1.{n}"], fb[f"{src}.mlp.fc2.{n}"]
        if gated:
            ref[f"{dst}.mlp.gate_proj.{n}"], ref[f"{dst}.mlp.up_proj.{n}"] = fc1.chunk(2)
            ref[f"{dst}.mlp.down_proj.{n}"] = fc2
        else:
            ref[f"{dst}.mlp.main.0.{n}"], ref[f"{dst}.mlp.main.2.{n}"] = fc1, fc2


def ml_tarflow_state(model: TARFlow) -> dict:
    fb, cfg, ref = model.state_dict(), model.cfg, {}
    for t, depth in enumerate(cfg.layers):
        b = f"blocks.{t}"
        ref[f"{b}.pos_embed"] = fb[f"{b}.pos"]
        if cfg.num_classes:
            ref[f"{b}.class_embed"] = fb[f"{b}.class_embed"][:, None]  # (K, 1, W)
        for n in ("weight", "bias"):
            ref[f"{b}.proj_in.{n}"], ref[f"{b}.proj_out.{n}"] = fb[f"{b}.proj_in.{n}"], fb[f"{b}.proj_out.{n}"]
        for l in range(depth):
            layer_keys(fb, t, l, ref)
        ref[f"{b}.attn_mask"] = torch.ones(cfg.num_tokens, cfg.num_tokens).tril()
    ref["var"] = torch.ones(cfg.num_tokens, cfg.token_dim)
    return ref


def ml_starflow_state(cfg: FlowConfig, seed: int = 0) -> tuple[dict, TARFlow]:
    """An ml-starflow checkpoint and the FlowBack model of the same tensors. Its tokens are (p1 p2 c), its RoPE turns
    adjacent pairs, its class token is one-hot(K + 1 entries) through proj_txt, its RMSNorm scales by 1 + w."""
    model = randomized(cfg, seed)
    fb, ref = model.state_dict(), {}
    C, p, d, W, K = cfg.channels, cfg.patch_size, cfg.head_dim, cfg.width, cfg.num_classes
    token = torch.arange(C * p * p).reshape(C, p, p).permute(1, 2, 0).reshape(-1)  # FlowBack feature of each ref one
    pairs = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).reshape(-1)
    heads = torch.cat([h * d + pairs for h in range(W // d)])
    qk = torch.cat([heads, W + heads, torch.arange(2 * W, 3 * W)])
    g = torch.Generator().manual_seed(seed + 1)
    for t, depth in enumerate(cfg.layers):
        b = f"blocks.{t}"
        rows = torch.cat([token, cfg.token_dim + token])
        ref[f"{b}.proj_in.weight"] = fb[f"{b}.proj_in.weight"][:, token]
        ref[f"{b}.proj_in.bias"] = fb[f"{b}.proj_in.bias"]
        ref[f"{b}.proj_out.weight"] = fb[f"{b}.proj_out.weight"][rows]
        ref[f"{b}.proj_out.bias"] = fb[f"{b}.proj_out.bias"][rows]
        for l in range(depth):
            layer_keys(fb, t, l, ref, qk, gated=cfg.mlp == "geglu")
        if cfg.start_token:
            ref[f"{b}.sos_embed"] = fb[f"{b}.sos"][token].reshape(1, 1, -1)
        if cfg.final_norm:
            ref[f"{b}.final_norm.weight"] = torch.randn(W, generator=g) * 0.1
            fb[f"{b}.final_norm.weight"] = 1 + ref[f"{b}.final_norm.weight"]
        if f"{b}.class_embed" in fb:
            w, bias = torch.randn(W, K + 1, generator=g), torch.randn(W, generator=g)
            ref[f"{b}.proj_txt.weight"], ref[f"{b}.proj_txt.bias"] = w, bias
            fb[f"{b}.class_embed"], fb[f"{b}.null_embed"] = (w.T + bias)[:K], (w.T + bias)[K]
        ref[f"{b}.attn_mask"] = torch.ones(cfg.num_tokens + 1, cfg.num_tokens + 1).tril()
    ref["feat_rope.freqs_cos"] = ref["feat_rope.freqs_sin"] = torch.zeros(cfg.num_tokens + 1, d)  # unused buffers
    model.load_state_dict(fb)
    return ref, model


STAR = dict(pos_embed="rope", start_token=True, final_norm=True, scale="softplus", soft_clip=2.0, cond_token=True,
            mlp="geglu", seq_order="L2R", rope_layout="3d", rope_order="sequence", null_class="learned")


def assert_same_model(a: TARFlow, b: TARFlow) -> None:
    g = torch.Generator().manual_seed(3)
    c = a.cfg
    x = torch.randn(2, c.channels, c.image_size, c.image_size, generator=g).clamp(-1, 1)
    y = torch.tensor([1, 0])
    with torch.no_grad():
        oa, ob = a(x, y), b(x, y)
    assert torch.equal(oa.z, ob.z) and torch.equal(oa.logdet, ob.logdet)
    z = torch.randn(2, c.num_tokens, c.token_dim, generator=g)
    sa = sample(a, y, z=z)
    assert torch.isfinite(sa).all() and torch.equal(sa, sample(b, y, z=z))
    assert oa.logdet.abs().min() > 0.1  # a non-trivial map


# -- round trips -------------------------------------------------------------------------------------------------
ONE_RUN = {"baseline": {"strategy": "none"}}


def test_ml_tarflow_checkpoint_imports_into_a_run(tmp_path, capsys):
    params = tiny_params(tmp_path, model={"blocks": 3}, experiments=ONE_RUN)
    exp = load_params(params).run("baseline-s0")
    model = randomized(flow_config(exp.params))
    torch.save(ml_tarflow_state(model), tmp_path / "tarflow.pth")
    assert main(["weights", "import", "--from", "ml-tarflow", str(tmp_path / "tarflow.pth"), "--params", str(params),
                 "--run", "baseline"]) == 0
    assert "model.pt: written" in capsys.readouterr().out
    loaded, meta = load_flow(exp.checkpoint, expected=flow_config(exp.params))  # what sample/evaluate/probe do
    assert meta["imported_from"] == "ml-tarflow" and meta["experiment"] == "baseline"
    assert_same_model(loaded, model)


def test_ml_starflow_checkpoint_with_every_option_imports_into_a_run(tmp_path):
    params = tiny_params(tmp_path, model=dict(STAR, width=40, head_dim=20, blocks=3, layers=[1, 1, 2],
                                              cond_blocks="deep"), experiments=ONE_RUN)
    exp = load_params(params).run("baseline-s0")
    state, model = ml_starflow_state(flow_config(exp.params))
    torch.save(state, tmp_path / "starflow.pth")
    dest = import_weights("ml-starflow", tmp_path / "starflow.pth", params, "baseline-s0")
    assert_same_model(load_flow(dest, expected=flow_config(exp.params))[0], model)
    with pytest.raises(Exception, match="exists; pass --force"):
        import_weights("ml-starflow", tmp_path / "starflow.pth", params, "baseline-s0")
    import_weights("ml-starflow", tmp_path / "starflow.pth", params, "baseline-s0", overwrite=True)


@pytest.mark.parametrize("blocks", ["all", "deep"])
def test_ml_starflow_token_layout_and_rope_pairs_map_exactly(blocks):
    """Two channels and patch 2, so (p1 p2 c) and (c p1 p2) differ; two heads, so each head's pairs move."""
    cfg = FlowConfig(channels=2, image_size=8, patch_size=2, width=40, layers=(1, 2), head_dim=20, num_classes=3,
                     cond_blocks=blocks, **STAR)
    state, model = ml_starflow_state(cfg)
    assert_same_model(convert("ml-starflow", state, cfg), model)


# -- mismatches --------------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_shape_is_one_line_naming_the_key(tmp_path, capsys):
    params = tiny_params(tmp_path, model={"blocks": 3}, experiments=ONE_RUN)
    exp = load_params(params).run("baseline-s0")
    cfg = flow_config(exp.params)
    wider = FlowConfig(**{**cfg.to_dict(), "width": 32})
    torch.save(ml_tarflow_state(randomized(wider)), tmp_path / "wide.pth")
    assert main(["weights", "import", "--from", "ml-tarflow", str(tmp_path / "wide.pth"), "--params", str(params),
                 "--run", "baseline-s0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wide.pth: ml-tarflow checkpoint: blocks.0.pos_embed is (16, 32)" in err
    assert "needs (16, 16)" in err and not exp.checkpoint.exists()


def test_missing_extra_and_unmappable_keys_are_named():
    cfg = FlowConfig(channels=2, image_size=8, patch_size=2, width=32, layers=(1, 1), head_dim=8, num_classes=3)
    state = ml_tarflow_state(randomized(cfg))
    with pytest.raises(WeightMappingError, match=r"has no blocks.1.proj_out.weight \(16, 32\)"):
        convert("ml-tarflow", {k: v for k, v in state.items() if k != "blocks.1.proj_out.weight"}, cfg)
    with pytest.raises(WeightMappingError, match=r"blocks.0.attn_blocks.0.attention.query_norm.weight \(8,\) has no "
                                                 r"place"):
        convert("ml-tarflow", {**state, "blocks.0.attn_blocks.0.attention.query_norm.weight": torch.ones(8)}, cfg)
    with pytest.raises(WeightMappingError, match="var is not all ones"):
        convert("ml-tarflow", {**state, "var": 2 * state["var"]}, cfg)
    with pytest.raises(WeightMappingError, match="need model.scale: exp"):
        convert("ml-tarflow", state, FlowConfig(**{**cfg.to_dict(), "scale": "softplus"}))
    star = FlowConfig(channels=2, image_size=8, patch_size=2, width=40, layers=(1, 2), head_dim=20, num_classes=3,
                      **STAR)
    ref, _ = ml_starflow_state(star)
    with pytest.raises(WeightMappingError, match="need model.rope_order: sequence"):
        convert("ml-starflow", ref, FlowConfig(**{**star.to_dict(), "rope_order": "spatial"}))
    with pytest.raises(WeightMappingError, match="need model.rope_layout: 3d"):
        convert("ml-starflow", ref, FlowConfig(**{**star.to_dict(), "rope_layout": "2d"}))
    with pytest.raises(WeightMappingError, match="tanh-GELU: set model.mlp: geglu"):
        convert("ml-starflow", ref, FlowConfig(**{**star.to_dict(), "mlp": "swiglu"}))
    with pytest.raises(WeightMappingError, match=r"proj_txt.weight is \(40, 4\), the params' model needs \(40, 5\)"):
        convert("ml-starflow", ref, FlowConfig(**{**star.to_dict(), "num_classes": 4}))
    with pytest.raises(WeightMappingError, match="expected a state_dict of tensors"):
        convert("ml-starflow", {"model": ref}, star)
