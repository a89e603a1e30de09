"""Alignment strategies: gradient scope of each, pseudo-reverse == naive reverse, loss properties, encoder loading."""

import pytest
import timm
import torch

from flowback.alignment.encoder import EncoderConfig, FrozenEncoder, load_encoder, save_encoder
from flowback.alignment.loss import Projector, alignment_loss, match_grid
from flowback.alignment.reverse import naive_reverse_features, pseudo_reverse_features
from flowback.alignment.strategies import AlignSpec, alignment_features
from flowback.models.tarflow import FlowConfig, TARFlow

BLOCKS, LAYERS = 4, 3


def make_model(seed=0):
    torch.manual_seed(seed)
    model = TARFlow(FlowConfig(channels=1, image_size=8, patch_size=2, width=32, layers=(LAYERS,) * BLOCKS,
                               head_dim=8, mlp_ratio=2, num_classes=4))
    with torch.no_grad():  # leave the identity initialisation so gradients reach every block
        for blk in model.blocks:
            blk.proj_out.weight.normal_(0, 0.05)
            blk.proj_out.bias.normal_(0, 0.05)
    return model


def batch(n=3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1), torch.tensor([0, 1, 3])[:n]


def align_grads(model, spec):
    """Which parameters the alignment loss alone reaches (name -> grad norm)."""
    x, y = batch()
    out = model(x, y, keep=spec.forward_keep, keep_inputs=spec.needs_block_inputs)
    feats = alignment_features(model, out, model.conditions(y, None, len(x)), spec)
    target = torch.randn(3, 16, 7, generator=torch.Generator().manual_seed(9))
    proj = Projector(32, 16, 7)
    loss = sum(alignment_loss(proj(h), target) for h in feats.values())
    model.zero_grad()
    loss.backward()
    return {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None and p.grad.norm() > 0}


def touched(grads):
    """{(block, part)} with part 'layer{k}', 'embed' (proj_in/pos/class), 'out' (proj_out)."""
    parts = set()
    for name in grads:
        _, b, rest = name.split(".", 2)
        block = int(b) + 1
        if rest.startswith("layers."):
            parts.add((block, f"layer{int(rest.split('.')[1]) + 1}"))
        elif rest.startswith("proj_out"):
            parts.add((block, "out"))
        else:
            parts.add((block, "embed"))
    return parts


def all_parts(blocks, layers=range(1, LAYERS + 1), out=True):
    s = set()
    for b in blocks:
        s |= {(b, f"layer{l}") for l in layers} | {(b, "embed")} | ({(b, "out")} if out else set())
    return s


def test_forward_reaches_every_earlier_block_and_the_aligned_layers():
    spec = AlignSpec("forward", ((3, 2),))
    got = touched(align_grads(make_model(), spec))
    assert got == all_parts([1, 2]) | all_parts([3], layers=[1, 2], out=False)


def test_detach_reaches_only_the_aligned_block_up_to_its_layer():
    spec = AlignSpec("detach", ((3, 2),))
    assert touched(align_grads(make_model(), spec)) == all_parts([3], layers=[1, 2], out=False)


def test_reverse_reaches_only_blocks_after_the_aligned_layer_in_generative_order():
    spec = AlignSpec("reverse", ((3, 2),))
    got = touched(align_grads(make_model(), spec))
    # blocks 4 (generated first) and 3 (its affine output rebuilds block 3's input); never blocks 1, 2
    assert got == all_parts([4]) | all_parts([3])
    assert not any(b in (1, 2) for b, _ in got)


def test_reverse_and_detach_leave_the_density_pass_untouched():
    model = make_model()
    x, y = batch()
    for strategy in ("forward", "reverse", "detach"):
        spec = AlignSpec(strategy, ((2, 3), (4, 1)))
        out = model(x, y, keep=spec.forward_keep, keep_inputs=True)
        feats = alignment_features(model, out, model.conditions(y, None, 3), spec)
        loss = sum(h.pow(2).mean() for h in feats.values())
        inputs = [t for t in out.block_inputs[1:] if t.requires_grad] + [out.logdet]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        if strategy == "forward":  # the control: forward alignment runs through the density pass
            assert any(g is not None for g in grads[:-1])
        else:  # the density quantities are not in the alignment graph: no gradient flows back into them
            assert all(g is None for g in grads), strategy


@pytest.mark.parametrize("positions", [((4, 3),), ((3, 2), (4, 3)), ((1, 1), (2, 3), (3, 3), (4, 3))])
def test_pseudo_reverse_equals_naive_reverse(positions):
    model = make_model()
    x, y = batch()
    spec = AlignSpec("reverse", positions)
    target = torch.randn(3, 16, 7, generator=torch.Generator().manual_seed(9))
    proj = Projector(32, 16, 7)
    results = []
    for fn in (pseudo_reverse_features, naive_reverse_features):
        out = model(x, y, keep_inputs=True)
        feats = fn(model, out, model.conditions(y, None, 3), spec)
        loss = sum(alignment_loss(proj(h), target) for h in feats.values())
        model.zero_grad()
        loss.backward()
        results.append((feats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (f_pseudo, g_pseudo), (f_naive, g_naive) = results
    for k in f_pseudo:
        rel = (f_pseudo[k] - f_naive[k]).norm() / f_naive[k].norm()
        assert rel < 1e-5, (k, rel.item())
    assert g_pseudo.keys() == g_naive.keys() and g_pseudo
    for n in g_pseudo:
        rel = (g_pseudo[n] - g_naive[n]).norm() / g_naive[n].norm().clamp_min(1e-12)
        assert rel < 1e-5, (n, rel.item())


def test_loss_is_invariant_to_feature_scale_and_bounded():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    base = alignment_loss(a, b)
    assert torch.allclose(alignment_loss(3.7 * a, b), base, atol=1e-6)
    assert torch.allclose(alignment_loss(a, 0.01 * b), base, atol=1e-6)
    assert torch.allclose(alignment_loss(a, a), torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(alignment_loss(a, -a), torch.tensor(1.0), atol=1e-6)


def test_match_grid_resizes_encoder_grid_to_flow_grid():
    t = torch.arange(16.0).reshape(1, 2, 2, 4).repeat(1, 1, 1, 1)
    same = match_grid(t, 2)
    assert same.shape == (1, 4, 4) and torch.equal(same, t.reshape(1, 4, 4))
    up = match_grid(torch.ones(2, 4, 4, 3), 8)
    assert up.shape == (2, 64, 3) and torch.allclose(up, torch.ones_like(up))
    down = match_grid(torch.arange(16.0).reshape(1, 4, 4, 1), 2)  # area: mean of each 2x2 patch
    assert torch.allclose(down.reshape(-1), torch.tensor([2.5, 4.5, 10.5, 12.5]))


TINY = EncoderConfig(arch="vit_small_patch14_dinov2",
                     kwargs={"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1,
                             "num_heads": 2, "num_classes": 0},
                     input_size=16, mean=(0.5,), std=(0.5,))


def test_encoder_round_trips_through_timm_from_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    net = timm.create_model(TINY.arch, pretrained=False, **TINY.kwargs)
    save_encoder(net, TINY, tmp_path / "enc")
    enc = load_encoder(tmp_path / "enc", allow_hub=False)
    ref = FrozenEncoder(net, TINY)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert enc(x).shape == (2, 4, 4, 32)
    assert torch.equal(enc(x), ref(x))
    assert not any(p.requires_grad for p in enc.parameters())


def test_encoder_preprocessing_resizes_and_normalises():
    cfg = EncoderConfig(arch=TINY.arch, kwargs={**TINY.kwargs, "in_chans": 3}, input_size=16)
    enc = FrozenEncoder(timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs), cfg)
    x = torch.zeros(1, 1, 8, 8)  # grey, one channel, smaller than the encoder's input
    p = enc.preprocess(x)
    assert p.shape == (1, 3, 16, 16)
    expected = (0.5 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(p[0, :, 3, 3], expected, atol=1e-5)


def test_missing_encoder_weights_error_names_the_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set its constant too, so no connection is even tried
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    missing = tmp_path / "no-weights-here"
    with pytest.raises(Exception) as err:
        load_encoder(missing, fallback=TINY, allow_hub=False)
    assert str(missing) in str(err.value)
    with pytest.raises(Exception) as err:
        load_encoder(missing, fallback=EncoderConfig(arch="vit_base_patch14_dinov2.lvd142m"), allow_hub=True)
    assert str(missing) in str(err.value)
