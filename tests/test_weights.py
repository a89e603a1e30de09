"""`flowback weights fetch|verify`, offline: local sources stand in for the hub and the release URL, and tiny random
networks for DINOv2, Stable Diffusion's VAE and Inception (no real weights can be downloaded here)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from flowback import weights as w
from flowback.cli import main
from flowback.errors import FlowBackError
from flowback.io import FlowBackFileError, load_json, sha256_file
from flowback.metrics.generative import load_feature_network
from flowback.metrics.inception import INCEPTION_FILE, random_inception_state
from flowback.models.vae import save_random_vae
from flowback.params import validate

ENC_KW = dict(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=4, num_classes=0)


def raw_params(root: Path, vae_hub: str, encoder_hub: str = "vit_small_patch14_dinov2") -> dict:
    """A latent profile with an aligned experiment and Inception metrics: needs all three networks."""
    return {
        "encoder": {"dir": str(root / "w" / "encoder"), "arch": "vit_small_patch14_dinov2", "hub": encoder_hub,
                    "kwargs": ENC_KW, "input_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
        "metrics": {"network": "inception", "dir": str(root / "w" / "inception")},
        "model": {"latent": {"vae_dir": str(root / "w" / "vae"), "hub": vae_hub}},
        "experiments": {"baseline": {}, "rrepa": {"strategy": "reverse", "position": "7&8"}},
    }


def write_params(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        enc = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **ENC_KW)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(root / "dinov2_tiny.safetensors"))
    torch.save(random_inception_state(0), root / "inception-random.pth")
    return {"encoder": str(root / "dinov2_tiny.safetensors"), "vae": str(save_random_vae(root / "vae_src")),
            "inception": str(root / "inception-random.pth")}


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, sources):
    """One fetch of all three networks from the local sources: (root, raw params, fetch output)."""
    root = tmp_path_factory.mktemp("fetched")
    raw = raw_params(root, vae_hub=sources["vae"])
    lines: list[str] = []
    checks = w.fetch(validate(raw), {k: sources[k] for k in ("encoder", "inception")}, out=lines.append,
                     progress=False)
    assert [c.network for c in checks] == ["encoder", "vae", "inception"] and all(c.ok for c in checks), lines
    return root, raw, lines


def test_default_profile_and_baseline_need_nothing(sources, tmp_path):
    assert w.required_networks(validate({})) == []
    raw = raw_params(tmp_path, sources["vae"])
    raw["experiments"] = {"baseline": {}}  # no alignment: the encoder hub is not needed
    raw["metrics"]["network"] = "digitnet"
    assert [n.name for n in w.required_networks(validate(raw))] == ["vae"]
    raw = raw_params(tmp_path, sources["vae"])
    raw["encoder"]["train"] = {"steps": 1}
    with pytest.raises(w.WeightsError, match="encoder.hub .* and encoder.train are both set"):
        w.required_networks(validate(raw))


def test_fetch_writes_manifests_and_the_source_weights(fetched, sources):
    root, raw, lines = fetched
    assert sum("fetching" in line for line in lines) == 3, lines
    for name, files in (("encoder", {"config.json", "model.safetensors"}),
                        ("vae", {"config.json", "diffusion_pytorch_model.safetensors"}),
                        ("inception", {INCEPTION_FILE})):
        d = root / "w" / name
        manifest = load_json(d / w.MANIFEST)
        assert manifest["network"] == name and set(manifest["files"]) == files
        assert manifest["fetched_at"].endswith("Z")
        for f, digest in manifest["files"].items():
            assert sha256_file(d / f) == digest
    assert load_json(root / "w" / "encoder" / w.MANIFEST)["source"] == sources["encoder"]
    assert load_json(root / "w" / "vae" / w.MANIFEST)["id"] == sources["vae"]
    # the bytes are the source's: encoder tensors, VAE tensors and the Inception file itself
    got, want = load_file(str(root / "w" / "encoder" / "model.safetensors")), load_file(sources["encoder"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    weights = "diffusion_pytorch_model.safetensors"
    got, want = load_file(str(root / "w" / "vae" / weights)), load_file(str(Path(sources["vae"]) / weights))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sha256_file(root / "w" / "inception" / INCEPTION_FILE) == sha256_file(sources["inception"])
    assert load_json(root / "w" / "encoder" / "config.json")["arch"] == "vit_small_patch14_dinov2"


def test_cli_verify_passes_and_prints_the_table(fetched, tmp_path, capsys):
    root, raw, _ = fetched
    assert main(["weights", "verify", "--params", write_params(tmp_path / "params.yaml", raw)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["network", "directory", "status"]
    assert [line.split() for line in out[1:]] == [[n, str(root / "w" / n), "ok"]
                                                  for n in ("encoder", "vae", "inception")]


def test_second_fetch_does_no_work(fetched, sources, monkeypatch):
    root, raw, _ = fetched

    def no_download(*_args, **_kw):
        raise AssertionError("fetch downloaded a network whose directory already verifies")

    for handler in w.HANDLERS.values():
        monkeypatch.setattr(handler, "fetch", no_download)
    before = {p: p.stat().st_mtime_ns for p in (root / "w").rglob("*") if p.is_file()}
    lines: list[str] = []
    checks = w.fetch(validate(raw), {"encoder": sources["encoder"], "inception": sources["inception"]},
                     out=lines.append, progress=False)
    assert all(c.ok for c in checks)
    assert sum("already verifies; skipped" in line for line in lines) == 3, lines
    assert {p: p.stat().st_mtime_ns for p in (root / "w").rglob("*") if p.is_file()} == before


def copy_of(fetched, tmp_path) -> tuple[Path, dict]:
    """The fetched directories copied under tmp_path, and params pointing at the copy."""
    root, raw, _ = fetched
    shutil.copytree(root / "w", tmp_path / "w")
    return tmp_path, raw_params(tmp_path, raw["model"]["latent"]["hub"])


def test_flipped_byte_fails_verify_naming_the_file(fetched, tmp_path, capsys):
    root, raw = copy_of(fetched, tmp_path)
    bad = root / "w" / "inception" / INCEPTION_FILE
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    assert main(["weights", "verify", "--params", write_params(tmp_path / "params.yaml", raw)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("flowback: error: ") and len(err.splitlines()) == 1
    assert str(bad) in err and "sha256" in err and "flowback weights fetch" in err
    rows = [line.split() for line in captured.out.splitlines()[1:]]
    assert {r[0]: " ".join(r[2:]) for r in rows} == {"encoder": "ok", "vae": "ok", "inception": "hash mismatch"}


def test_missing_manifest_or_directory_fails_verify(fetched, tmp_path):
    root, raw = copy_of(fetched, tmp_path)
    enc, vae, inc = w.required_networks(validate(raw))
    (root / "w" / "encoder" / w.MANIFEST).unlink()
    check = w.verify_network(enc)
    assert check.status == "missing" and str(root / "w" / "encoder" / w.MANIFEST) in check.error
    assert "flowback weights fetch" in check.error
    (root / "w" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    check = w.verify_network(vae)
    assert check.status == "missing" and "diffusion_pytorch_model.safetensors: file not found" in check.error
    check = w.verify_network(dataclasses.replace(inc, directory=root / "nowhere"))
    assert check.status == "missing" and str(root / "nowhere") in check.error
    with pytest.raises(w.WeightsError, match=r"weights\.json: not found.*flowback weights fetch"):
        w.verify(validate(raw), out=lambda _line: None)


def test_changed_params_make_a_directory_stale(fetched):
    root, raw, _ = fetched
    raw = dict(raw, encoder=dict(raw["encoder"], input_size=32))  # another config than the one fetched
    enc = w.required_networks(validate(raw))[0]
    check = w.verify_network(enc)
    assert check.status == "stale" and "input_size" in check.error and "flowback weights fetch" in check.error


def test_unreachable_sources_name_the_network(tmp_path, monkeypatch, sources):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, as on an air-gapped node
    raw = raw_params(tmp_path, vae_hub="flowback-test/no-such-vae", encoder_hub="vit_small_patch14_dinov2.lvd142m")
    params = validate(raw)
    with pytest.raises(w.WeightsError, match=r"^encoder: cannot fetch 'vit_small_patch14_dinov2\.lvd142m'"):
        w.fetch(params, out=lambda _line: None, progress=False)
    with pytest.raises(w.WeightsError, match=r"^vae: cannot fetch 'flowback-test/no-such-vae'"):
        w.fetch(params, {"encoder": sources["encoder"]}, out=lambda _line: None, progress=False)
    url = "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"  # nothing listens on the discard port
    with pytest.raises(w.WeightsError, match=r"^inception: cannot fetch 'http://127\.0\.0\.1:9/"):
        w.fetch(params, {"encoder": sources["encoder"], "vae": sources["vae"], "inception": url},
                out=lambda _line: None, progress=False)
    assert not (tmp_path / "w" / "inception" / w.MANIFEST).exists()
    assert not list((tmp_path / "w" / "inception").iterdir())  # no partial download left behind


def test_cli_fetch_error_is_one_line(tmp_path, capsys):
    raw = {"metrics": {"network": "inception", "dir": str(tmp_path / "inc")}}
    path = write_params(tmp_path / "params.yaml", raw)
    code = main(["weights", "fetch", "--params", path, "--quiet", "--source", f"inception={tmp_path / 'nothing.pth'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("flowback: error: inception: cannot fetch") and len(err.splitlines()) == 1
    assert main(["weights", "fetch", "--params", path, "--source", "inception"]) == 2
    assert "expected NETWORK=PATH_OR_URL" in capsys.readouterr().err
    assert main(["weights", "fetch", "--params", path, "--source", "dinov3=x"]) == 2
    assert "unknown network dinov3" in capsys.readouterr().err


def test_inception_file_must_match_the_hash_in_its_name(tmp_path):
    fake = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    fake.write_bytes(b"not the inception weights")
    params = validate({"metrics": {"network": "inception", "dir": str(tmp_path / "inc")}})
    with pytest.raises(w.WeightsError, match=r"inception: .*6726825d\.pth: sha256 .* does not start with 6726825d"):
        w.fetch(params, {"inception": fake.as_uri()}, out=lambda _line: None, progress=False)  # a file:// URL
    assert not (tmp_path / "inc" / INCEPTION_FILE).exists()


# ----------------------------------------------------------------------------------------------- Inception loader
def test_inception_features_have_the_adm_shapes(fetched):
    root, _, _ = fetched
    net = load_feature_network("inception", root / "w" / "inception")
    seen = {}
    bn = net.net.get_submodule("Mixed_6d.branch1x1.bn")  # independent read of mixed_6/conv: BN output, then ReLU
    handle = bn.register_forward_hook(lambda _m, _i, out: seen.setdefault("bn", out.clone()))
    x = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    try:
        feats = net.features(x)
    finally:
        handle.remove()
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"pool": (2, 2048), "logits": (2, 1008),
                                                            "spatial": (2, 2023)}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in feats.values())
    want = torch.relu(seen["bn"])[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # (h, w, c) order, first 7 channels
    assert seen["bn"].shape == (2, 192, 17, 17) and torch.equal(feats["spatial"], want)
    logits = feats["pool"] @ net.net.fc.weight.T  # logits_unbiased: pool_3 @ W, no bias (ADM's IS)
    torch.testing.assert_close(feats["logits"], logits)
    assert (feats["pool"][0] - feats["pool"][1]).abs().max() > 1e-3  # two images, two feature vectors


class _Planted:
    marker = ""

    def __reduce__(self):  # unpickling this would create the marker directory
        return (os.mkdir, (_Planted.marker,))


def test_inception_loader_never_unpickles_objects(tmp_path):
    _Planted.marker = str(tmp_path / "executed")
    d = tmp_path / "inc"
    d.mkdir()
    torch.save({"fc.weight": torch.zeros(1), "payload": _Planted()}, d / INCEPTION_FILE)
    with pytest.raises(FlowBackFileError, match=rf"{INCEPTION_FILE}: .*GLOBAL posix.mkdir.*flowback weights fetch") as e:
        load_feature_network("inception", d)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "executed").exists()


def test_missing_inception_names_the_directory(tmp_path):
    with pytest.raises(FlowBackError, match=rf"{tmp_path}: no Inception weights.*flowback weights fetch"):
        load_feature_network("inception", tmp_path)


@pytest.mark.parametrize("arch", ["vit_base_patch16_clip_224.openai", "vit_base_patch16_224.mae",
                                  "vit_large_patch14_dinov2.lvd142m"])
def test_table8_encoders_fetch_and_load_through_the_dinov2_path(tmp_path, sources, arch):
    """R-REPA Table 8's CLIP-B, MAE-B and DINOv2-L are timm names like DINOv2-B: the same fetch, verify and loader
    (tiny random networks of each architecture stand in for the hub weights)."""
    from flowback.alignment.encoder import load_encoder

    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = timm.create_model(arch, pretrained=False, **kw)
    src = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    raw = {"encoder": {"dir": str(tmp_path / "enc"), "arch": arch, "hub": arch, "kwargs": kw, "input_size": 16,
                       "mean": [0.5] * 3, "std": [0.5] * 3},
           "metrics": {"network": "inception", "dir": str(tmp_path / "inception")},
           "experiments": {"baseline": {}, "rrepa": {"strategy": "reverse", "position": "7&8"}}}
    checks = w.fetch(validate(raw), {"encoder": str(src), "inception": sources["inception"]}, out=lambda _: None,
                     progress=False)
    assert all(c.ok for c in checks) and all(c.ok for c in w.verify(validate(raw), out=lambda _: None))
    enc = load_encoder(tmp_path / "enc", allow_hub=False)
    feats = enc(torch.zeros(2, 3, 16, 16))
    assert feats.shape == (2, 4, 4, 32)  # a 4x4 grid of 32-d patch features, whatever the family
    net.eval()
    ref = net.forward_features(torch.zeros(2, 3, 16, 16))
    assert torch.isfinite(feats).all() and ref.shape[-1] == 32
