"""The adversarial flow objective (arXiv 2511.22475) and one training step of it.

Path: x_s = (1 - s) x + s z, x ~ data, z ~ N(0, I); a 1-NFE model has s = 1 (x_s = z) and t = 0 (x_t = x).
The generator G maps x_s to an estimate of x_t; the discriminator D judges (x_t, t) against (G(x_s), t), each fake
paired with a real of the same class. As the reference code does:
- D loss: relativistic softplus(-(D(real) - D(fake))), plus R1 and R2 penalties (gradient norm of D at real / at
  fake samples) by finite differences, lambda_gp * w * (D(x + eps n) - D(x))^2 / eps^2 with n ~ N(0, I) (whose
  mean over n is w * |grad D|^2 for small eps), on the first `gp_fraction` of the batch, plus the logit-centering
  penalty lambda_cp * (D(real) + D(fake))^2.
- G loss: relativistic softplus(-(D(fake) - D(real))) plus lambda_ot(step) * L_ot, the optimal-transport term
  L_ot = mean over the batch of |G(x_s) - x_s|^2 / (n * w(s, t)), n = dimensions per sample, w = max(|s - t|, delta).
  Its minimiser among maps that push the noise onto the data is the W2-optimal (Brenier) map, the one flow matching
  integrates, so G is pinned to a unique, deterministic map instead of drifting among the many that fool D.
  lambda_ot decays on a cosine from `ot_start` to `ot_end` over `ot_decay_steps`, then stays at `ot_end`.
- Gradient normalisation: the adversarial gradient reaching G's output, g = dL_adv/dG(x_s) over the whole batch
  tensor (N elements), is divided by sqrt(nu) + 1e-8, where nu <- beta * nu + (1 - beta) * N * |g|^2 (beta = 0.9,
  nu starts at 0, no bias correction), so D's gradient scale (architecture, init, lambda_gp) no longer sets the
  balance with lambda_ot; the forward pass is the identity. (Multiplying by N is the reference code's form of the
  paper's division by sqrt(n); it makes nu independent of the batch size.)
- Flow-based classifier guidance: lambda_cg * cross-entropy of a frozen time-conditioned classifier C on the
  generated sample noised back along the flow, C((1 - t') G + t' eps, t'), t' ~ U(cg_t_min, cg_t_max); for
  multi-step models (cg_flow false) C sees G's output at its own target time t, only where t in [cg_t_min, cg_t_max].
- Order: one `af_train_step` is one D update then one G update, each drawing its own noise. `update: alternate`
  (the reference code's order: its iterations alternate D and G, each with its own batch from its own loader) gives
  the G update the next batch of the stream; `update: joint` gives both updates the step's batch. Either way a step
  is two reference iterations. The generator's EMA is updated after each G update.
- Every random input of an update is drawn (`draw_*`) before any network runs, and the losses (`*_loss`) are
  functions of those draws, so another implementation can be fed the same tensors (bench/peer_af.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .af import AFConfig, Discriminator, FlowClassifier, Generator, to_target


UPDATES = ("joint", "alternate")


@dataclass(frozen=True)
class AFTrainConfig:
    """Defaults: the reference code's 1-NFE ImageNet 256 settings (configs/train/afm/train_afm_1nfe.yaml), except
    `update` (joint, FlowBack's original order, so existing runs keep their numbers; the af256 profile sets it)."""

    lr_g: float = 1e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    eps: float = 1e-8
    weight_decay: float = 0.01
    ema_decay: float = 0.9999
    ot_start: float = 0.2
    ot_end: float = 0.005
    ot_decay_steps: int = 500_000  # in our steps (1 D + 1 G update): the reference's 1M alternating iterations
    gp_weight: float = 0.25
    gp_fraction: float = 0.25
    gp_eps: float = 0.01
    cp_weight: float = 0.01
    grad_norm: bool = True
    grad_norm_decay: float = 0.9
    grad_clip: float = 50.0  # 0 = none; the reference's 50 is effectively none, 5 for deep and multi-step models
    min_gap: float = 0.001  # delta in w(s, t) = max(|s - t|, delta)
    cg_weight: float = 0.0  # flow-based classifier guidance; needs a FlowClassifier
    cg_t_min: float = 0.0
    cg_t_max: float = 0.1
    cg_flow: bool = True
    update: str = "joint"  # joint: D and G on the step's batch; alternate: G on the next batch (the reference's order)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not 0 < self.gp_fraction <= 1:
            raise ValueError(f"gp_fraction must be in (0, 1], got {self.gp_fraction}")
        if self.ot_decay_steps < 1:
            raise ValueError(f"ot_decay_steps must be >= 1, got {self.ot_decay_steps}")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.grad_norm_decay < 1:
            raise ValueError("ema_decay and grad_norm_decay must be in [0, 1)")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AFTrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AF training settings: {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------ the path
def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) x + t noise, t per sample."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise


def sample_times(batch: int, cfg: AFConfig, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) per sample: 1-NFE (1, 0); N steps: s = k / N with k uniform in 1..N, t = s - 1/N; any-step:
    s ~ U(0, 1), t ~ U(0, s)."""
    if cfg.any_step:
        s = torch.rand(batch, generator=rng)
        return s, torch.rand(batch, generator=rng) * s
    if cfg.nfe == 1:
        return torch.ones(batch), torch.zeros(batch)
    k = torch.randint(1, cfg.nfe + 1, (batch,), generator=rng).float()
    return k / cfg.nfe, (k - 1) / cfg.nfe


def gap_weight(s: torch.Tensor, t: torch.Tensor, min_gap: float) -> torch.Tensor:
    """w(s, t) = max(|s - t|, delta): the OT term is divided by it, the R1/R2 penalties multiplied."""
    return (s - t).abs().clamp_min(min_gap)


# ----------------------------------------------------------------------------------------------- the losses
def ot_loss(x_gen: torch.Tensor, x_src: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of |G(x_s) - x_s|^2 / (n w): the squared transport distance per dimension."""
    return ((x_gen - x_src).square().flatten(1).mean(dim=1) / w).mean()


def ot_weight(step: int, start: float, end: float, decay_steps: int) -> float:
    """Cosine from `start` (step 0) to `end` (step decay_steps - 1 and after), as the reference's CosineSchedule."""
    if step >= decay_steps - 1:
        return end
    u = step / (decay_steps - 1)
    return end + (start - end) * (1 + math.cos(math.pi * u)) / 2


def relativistic_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """softplus(-(pos - neg)): D takes pos = real logits, G takes pos = fake logits."""
    return F.softplus(-(pos - neg)).mean()


def finite_difference_penalty(perturbed: torch.Tensor, logits: torch.Tensor, eps: float, w: torch.Tensor):
    """Mean of w (D(x + eps n) - D(x))^2 / eps^2: R1 at real samples, R2 at fakes, without double backprop."""
    return ((perturbed - logits).square() * w / eps**2).mean()


def centering_penalty(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """(D(real) + D(fake))^2: keeps the relativistic logits from drifting together."""
    return (real + fake).square().mean()


class _NormaliseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, square_avg, decay, eps):
        ctx.square_avg, ctx.decay, ctx.eps = square_avg, decay, eps
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        sq = g.to(torch.promote_types(g.dtype, torch.float32)).square().sum() * g.numel()  # bf16 up, fp64 kept
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.AVG)
        ctx.square_avg.lerp_(sq.to(ctx.square_avg), 1 - ctx.decay)
        return g / (ctx.square_avg.sqrt() + ctx.eps).to(g.dtype), None, None, None


class GradNorm(nn.Module):
    """Identity forward; backward divides the incoming gradient by sqrt(EMA of N |g|^2) (module docstring)."""

    def __init__(self, decay: float = 0.9, eps: float = 1e-8):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("square_avg", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NormaliseGrad.apply(x, self.square_avg, self.decay, self.eps)


def classifier_loss(classifier: FlowClassifier, x: torch.Tensor, y: torch.Tensor, rng: torch.Generator):
    """The flow classifier's training loss: cross-entropy on x_t = (1 - t) x + t eps, t ~ U(0, 1)."""
    t = torch.rand(len(x), generator=rng).to(x.device)
    noise = torch.randn(x.shape, generator=rng).to(x.device)
    return F.cross_entropy(classifier(interpolate(x, noise, t), t), y)


def guidance_loss(classifier: FlowClassifier, x_gen: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor | None, tc: AFTrainConfig) -> torch.Tensor:
    """Flow-based classifier guidance: lambda_cg * CE(C(x', t), y), gradients through the frozen C into G. With `noise`
    (cg_flow) x' = (1 - t) G + t noise; without, x' = G at its own target time t. Only t in [cg_t_min, cg_t_max]
    counts."""
    x = x_gen if noise is None else interpolate(x_gen, noise, t)
    ce = F.cross_entropy(classifier(x, t), y, reduction="none") * tc.cg_weight
    return torch.where((t >= tc.cg_t_min) & (t <= tc.cg_t_max), ce, torch.zeros_like(ce)).mean()


# ------------------------------------------------------------------------------------------ training state
class AFState:
    """Everything a resumed run needs: G, D, the EMA of G, both optimisers, the gradient normaliser's EMA, the
    step and the log. state_dict() holds only tensors, numbers, strings, lists and dicts (weights_only loads it).
    The guidance classifier is an input (frozen), not state: pass it again on resume."""

    def __init__(self, cfg: AFConfig, train: AFTrainConfig, seed: int = 0, device: str | torch.device = "cpu",
                 classifier: FlowClassifier | None = None):
        self.cfg, self.train = cfg, train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = Generator(cfg)
            self.discriminator = Discriminator(cfg)
        if device is not None:  # None: where they were built (the memory plan builds them under fake tensors)
            self.generator.to(device)
            self.discriminator.to(device)
        self.ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        opt = dict(betas=train.betas, eps=train.eps, weight_decay=train.weight_decay)
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=train.lr_g, **opt)
        self.opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=train.lr_d, **opt)
        self.grad_norm = GradNorm(train.grad_norm_decay).to(self.device)
        self.classifier = classifier.to(device).eval().requires_grad_(False) if classifier is not None else None
        if train.cg_weight > 0 and classifier is None:
            raise ValueError("cg_weight > 0 needs a FlowClassifier (flow-based classifier guidance)")
        self.step = 0
        self.log: list[dict[str, float]] = []

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "train": self.train.to_dict(), "step": self.step,
                "generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "ema": self.ema.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "grad_norm": self.grad_norm.state_dict(), "log": [dict(r) for r in self.log]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if AFConfig.from_dict(sd["config"]) != self.cfg:
            raise ValueError("AF state is from another model configuration")
        if AFTrainConfig.from_dict(sd["train"]) != self.train:
            raise ValueError("AF state is from other training settings")
        self.generator.load_state_dict(sd["generator"])
        self.discriminator.load_state_dict(sd["discriminator"])
        self.ema.load_state_dict(sd["ema"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.opt_d.load_state_dict(sd["opt_d"])
        self.grad_norm.load_state_dict(sd["grad_norm"])
        self.step = int(sd["step"])
        self.log = [dict(r) for r in sd["log"]]


def average_gradients(module: nn.Module) -> None:
    """Under torch.distributed, make every rank's gradients the mean over ranks (each rank takes its share of the
    batch); a plain run is untouched. G and D are called several times per update, so this all-reduce after the
    backward replaces DDP's one-forward-per-backward bucketing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _clip(params, max_norm: float) -> torch.Tensor:
    return nn.utils.clip_grad_norm_(list(params), max_norm if max_norm > 0 else float("inf"))


@dataclass
class Draws:
    """Every random input of one update (on the state's device). D: the R1/R2 directions `n_r1`, `n_r2` (penalised
    rows only); G with guidance: the classifier's time `t_cg` and, for flow guidance, its noise `noise_cg`."""

    noise_src: torch.Tensor
    noise_tgt: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    n_r1: torch.Tensor | None = None
    n_r2: torch.Tensor | None = None
    t_cg: torch.Tensor | None = None
    noise_cg: torch.Tensor | None = None


def _path_draws(x_real: torch.Tensor, cfg: AFConfig, rng: torch.Generator) -> list[torch.Tensor]:
    noise_src, noise_tgt = (torch.randn(x_real.shape, generator=rng) for _ in range(2))
    return [noise_src, noise_tgt, *sample_times(len(x_real), cfg, rng)]


def gp_rows(batch: int, tc: AFTrainConfig) -> int:
    return max(round(batch * tc.gp_fraction), 1)


def draw_discriminator(x_real: torch.Tensor, cfg: AFConfig, tc: AFTrainConfig, rng: torch.Generator) -> Draws:
    path = _path_draws(x_real, cfg, rng)
    k = gp_rows(len(x_real), tc)
    n_r1, n_r2 = (torch.randn((k, *x_real.shape[1:]), generator=rng) for _ in range(2))
    return Draws(*(v.to(x_real.device) for v in (*path, n_r1, n_r2)))


def draw_generator(x_real: torch.Tensor, cfg: AFConfig, tc: AFTrainConfig, rng: torch.Generator) -> Draws:
    noise_src, noise_tgt, s, t = (v.to(x_real.device) for v in _path_draws(x_real, cfg, rng))
    t_cg = noise_cg = None
    if tc.cg_weight > 0 and tc.cg_flow:
        t_cg = (torch.rand(len(x_real), generator=rng) * (tc.cg_t_max - tc.cg_t_min) + tc.cg_t_min).to(x_real.device)
        noise_cg = torch.randn(x_real.shape, generator=rng).to(x_real.device)
    elif tc.cg_weight > 0:
        t_cg = t
    return Draws(noise_src, noise_tgt, s, t, t_cg=t_cg, noise_cg=noise_cg)


def discriminator_loss(state: AFState, x_real: torch.Tensor, y: torch.Tensor, d: Draws):
    """(total loss, its terms): relativistic + R1 + R2 (finite differences) + logit centering. G runs without grad."""
    cfg, tc, G, D = state.cfg, state.train, state.generator, state.discriminator
    B, k = len(x_real), len(d.n_r1)
    x_s, x_t = interpolate(x_real, d.noise_src, d.s), interpolate(x_real, d.noise_tgt, d.t)
    with torch.no_grad():
        fake = to_target(cfg, x_s, G(x_s, y, d.s, d.t), d.s, d.t)
    w = gap_weight(d.s, d.t, tc.min_gap)[:k]
    t = d.t
    logits = D(torch.cat([x_t, fake, x_t[:k] + tc.gp_eps * d.n_r1, fake[:k] + tc.gp_eps * d.n_r2]),
               torch.cat([y, y, y[:k], y[:k]]), torch.cat([t, t, t[:k], t[:k]]))
    real, fake_l, real_p, fake_p = logits.split([B, B, k, k])
    adv = relativistic_loss(real, fake_l)
    r1 = tc.gp_weight * finite_difference_penalty(real_p, real[:k], tc.gp_eps, w)
    r2 = tc.gp_weight * finite_difference_penalty(fake_p, fake_l[:k], tc.gp_eps, w)
    cp = tc.cp_weight * centering_penalty(real, fake_l)
    return adv + r1 + r2 + cp, {"d_loss": adv, "r1": r1, "r2": r2, "cp": cp, "logit_real": real.mean(),
                                "logit_fake": fake_l.mean()}


def generator_loss(state: AFState, x_real: torch.Tensor, y: torch.Tensor, d: Draws):
    """(total loss, its terms): relativistic (through gradient normalisation) + lambda_ot(step) L_ot (+ guidance).
    D's parameters get no gradient."""
    cfg, tc, G, D = state.cfg, state.train, state.generator, state.discriminator
    x_s, x_t = interpolate(x_real, d.noise_src, d.s), interpolate(x_real, d.noise_tgt, d.t)
    D.requires_grad_(False)
    try:
        fake = to_target(cfg, x_s, G(x_s, y, d.s, d.t), d.s, d.t)
        with torch.no_grad():
            real_l = D(x_t, y, d.t)
        fake_l = D(state.grad_norm(fake) if tc.grad_norm else fake, y, d.t)
    finally:
        D.requires_grad_(True)
    adv = relativistic_loss(fake_l, real_l)
    ot = ot_loss(fake, x_s, gap_weight(d.s, d.t, tc.min_gap))
    lam = ot_weight(state.step, tc.ot_start, tc.ot_end, tc.ot_decay_steps)
    cg = torch.zeros((), device=x_real.device)
    if tc.cg_weight > 0:
        cg = guidance_loss(state.classifier, fake, y, d.t_cg, d.noise_cg, tc)
    return adv + lam * ot + cg, {"g_loss": adv, "ot": ot, "ot_weight": lam, "cg": cg}


def discriminator_update(state: AFState, x_real: torch.Tensor, y: torch.Tensor, rng: torch.Generator) -> dict:
    loss, terms = discriminator_loss(state, x_real, y, draw_discriminator(x_real, state.cfg, state.train, rng))
    state.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(state.discriminator)
    norm = _clip(state.discriminator.parameters(), state.train.grad_clip)
    state.opt_d.step()
    out = {k: v.detach() for k, v in terms.items()}
    return {**{k: out.pop(k) for k in ("d_loss", "r1", "r2", "cp")}, "d_grad_norm": norm, **out}  # the log's columns


def generator_update(state: AFState, x_real: torch.Tensor, y: torch.Tensor, rng: torch.Generator) -> dict:
    G, tc = state.generator, state.train
    loss, terms = generator_loss(state, x_real, y, draw_generator(x_real, state.cfg, tc, rng))
    state.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(G)
    norm = _clip(G.parameters(), tc.grad_clip)
    state.opt_g.step()
    with torch.no_grad():
        for pe, pg in zip(state.ema.parameters(), G.parameters()):
            pe.lerp_(pg, 1 - tc.ema_decay)
    return {**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in terms.items()}, "g_grad_norm": norm}


def af_train_step(state: AFState, x_real: torch.Tensor, y: torch.Tensor, rng: torch.Generator,
                  g_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """One D update on (x_real, y), then one G update on `g_batch` (update: alternate, the next batch) or on the same
    batch (None: update joint); x in model space, y int64 labels. `rng` (a CPU torch.Generator) supplies every random
    draw, so a step is a pure function of (state, batches, rng seed). Returns the step's losses and gradient norms as
    0-d tensors (no host sync per step; `float()` them to log)."""
    x_real, y = x_real.to(state.device), y.to(state.device)
    xg, yg = (x_real, y) if g_batch is None else (g_batch[0].to(state.device), g_batch[1].to(state.device))
    stats = discriminator_update(state, x_real, y, rng)
    stats.update(generator_update(state, xg, yg, rng))
    state.step += 1
    return stats
