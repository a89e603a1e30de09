"""The default (TARFlow) model does not move when options are added: values of a tiny seeded model, written down
before the SwiGLU / ml-starflow options existed. A change here means committed results would change too."""

import hashlib

import torch
from conftest import flow_images, random_flow

from flowback.models.guidance import Guidance
from flowback.models.sampling import sample

Y = torch.tensor([1, 3])


def model_and_noise():
    model = random_flow(0)
    z = torch.randn(2, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(2))
    return model, z


def close(got, pinned, tol: float = 1e-5):
    """Equal up to float32 rounding (a sum over a whole sample gets 10x the tolerance: its order of additions
    depends on the thread count)."""
    return torch.allclose(torch.as_tensor(got, dtype=torch.float32).reshape(-1), torch.tensor(pinned), atol=tol,
                          rtol=tol)


def test_default_config_and_state_dict_layout_are_unchanged():
    model, _ = model_and_noise()
    assert model.cfg.to_dict() == {"channels": 2, "image_size": 8, "patch_size": 2, "width": 32, "layers": [2, 2, 2],
                                   "head_dim": 8, "mlp_ratio": 2, "num_classes": 5, "pos_embed": "learned",
                                   "cond_blocks": "all"}
    layout = " ".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    assert len(model.state_dict()) == 90
    assert hashlib.sha256(layout.encode()).hexdigest()[:16] == "cb6f986f6215996c"


def test_default_forward_values_are_unchanged():
    model, _ = model_and_noise()
    with torch.no_grad():
        out = model(flow_images(model, 2, 1), Y)
    assert close(out.z[0, :3, 0], [-0.9688934683799744, 0.2221965789794922, 0.5534753203392029])
    assert close(out.z[1, -1, :2], [0.18728728592395782, -0.1850063055753708])
    assert close(out.logdet, [8.209444046020508, 0.42991065979003906])
    assert close(model.nll_per_dim(out), [1.4025089740753174])


def test_default_sample_values_are_unchanged():
    model, z = model_and_noise()
    s = sample(model, Y, z=z)
    assert close(s[0, 0, 0, :3], [-1.0099375247955322, 0.4600907266139984, -1.1973164081573486])
    assert close(s.sum(), [0.4945487976074219], 1e-4)
    g = sample(model, Y, z=z, guidance=Guidance("tarflow", 1.5, attn_temp=0.7))
    assert close(g[1, 1, -1, -3:], [0.7024500370025635, 1.0104625225067139, -1.3219261169433594])
    assert close(g.sum(), [0.18966007232666016], 1e-4)
