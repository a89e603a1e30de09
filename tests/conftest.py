"""Fixtures and helpers shared by the tests: the repository root, a tiny profile, running stages and commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def default_raw() -> dict:
    """The default params.yaml as a dict."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_raw(tmp: Path, **sections) -> dict:
    """The default profile shrunk to seconds, writing under `tmp`; `sections` update its sections
    (e.g. train={"steps": 5}, experiments={...})."""
    raw = default_raw()
    raw["results"] = str(tmp / "results")
    raw["data"]["root"] = str(tmp / "data")
    raw["encoder"]["dir"] = str(tmp / "enc")
    raw["encoder"]["kwargs"].update(embed_dim=16, depth=1, num_heads=2)
    raw["encoder"]["train"]["steps"] = 5
    raw["metrics"]["dir"] = str(tmp / "metric")
    raw["metrics"]["train"]["steps"] = 5
    raw["model"].update(width=16, layers=1, head_dim=8, mlp_ratio=1)
    raw["train"].update(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1)
    raw["sample"].update(per_class=3, batch_size=16)
    raw["sweep"].update(scales=[0.0, 1.0], count=20)
    raw["curve"].update(count=20)
    raw["metrics"]["calibration"]["halves"] = 2
    raw["runtime"]["threads"] = 1
    raw["experiments"] = {"baseline": {"strategy": "none"}, "reverse_78": {"strategy": "reverse", "position": "7&8"}}
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict) and section != "experiments":
            raw[section].update(value)
        else:
            raw[section] = value
    return raw


def write_params(tmp: Path, raw: dict, name: str = "params.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny_params(tmp: Path, **sections) -> Path:
    """A tiny profile's params file under `tmp` (see tiny_raw)."""
    return write_params(tmp, tiny_raw(tmp, **sections))


def stage(name: str, params: Path, run: str | None = None) -> None:
    """Run a stage in this process, as `python -m flowback stage` would (flowback.runner.main); raises SystemExit
    with the exit code on errors."""
    from flowback.runner import main

    code = main(name, run, str(params), progress=False)
    if code:
        raise SystemExit(code)


def command(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python <args>` in a fresh process with one torch thread; returns the completed process (text output)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (what the tiny profiles use), restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_flow(seed: int = 0, std: float = 0.05, bias: bool = True, class_std: float | None = None, **cfg):
    """A small TARFlow (FlowConfig keywords override the defaults) in eval mode whose output projections are random:
    zero-initialised ones make every block the identity, and a property tested on the identity tests nothing.
    `class_std` spreads the class embeddings, so guidance has something to extrapolate."""
    from flowback.models.tarflow import FlowConfig, TARFlow

    torch.manual_seed(seed)
    config = dict(channels=2, image_size=8, patch_size=2, width=32, layers=(2, 2, 2), head_dim=8, mlp_ratio=2,
                  num_classes=5)
    config.update(cfg)
    model = TARFlow(FlowConfig(**config))
    with torch.no_grad():
        for blk in model.blocks:
            blk.proj_out.weight.normal_(0, std)
            if bias:
                blk.proj_out.bias.normal_(0, std)
            if class_std is not None and blk.class_embed is not None:
                blk.class_embed.normal_(0, class_std)
    return model.eval()


def flow_images(model, n: int = 4, seed: int = 1) -> torch.Tensor:
    """n random model-space images (in [-1, 1]) of `model`'s shape."""
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    return torch.randn(n, c.channels, c.image_size, c.image_size, generator=g).clamp(-1, 1)


def generate_flow(model, labels, chunk_dir, batch_size, seed, *, denoise_sigma: float = 0.0, max_redraws: int = 0,
                  decode=None, key: str = "", micro_batch=None, stats=None):
    """flowback.sampler.generate with a flow's draw (flow_draw with these settings), quietly."""
    from flowback.models.sampling import flow_draw
    from flowback.sampler import generate

    cfg = model.cfg
    draw = flow_draw(model, denoise_sigma=denoise_sigma, max_redraws=max_redraws)
    return generate(draw, (cfg.num_tokens, cfg.token_dim), labels, chunk_dir, batch_size, seed,
                    next(model.parameters()).device, show_progress=False, decode=decode, key=key,
                    micro_batch=micro_batch, stats=stats)
