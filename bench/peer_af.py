"""Peer check: FlowBack's adversarial-flow losses, penalties, OT schedule and gradient normalisation against the
released code's own (ByteDance-Seed/Adversarial-Flow-Models), fed the same random tensors.

The released losses live inside its trainer's `training_step` (train_adversarial_flow_imagenet.py), so this builds
that trainer around FlowBack's small G, D and flow classifier (the same modules, the same weights) and calls the
method with the tensors FlowBack's `draw_*` would have drawn; the gradient normaliser is its grad_norm.py and the OT
schedule its common/schedules.py. Compared: every loss term, every parameter gradient of D (D updates) and of G
(G updates, through the normaliser: two G updates in a row, so the normaliser's running average is compared too).
float64 throughout, so any difference above rounding is a real one.

  python bench/peer_af.py --ref /path/to/Adversarial-Flow-Models      # a local checkout; nothing is downloaded

Its trainer module imports logging and augmentation packages this check never runs (kornia's augmentation is used
only at augment_p > 0; wandb, torchmetrics, einops, deepdiff, pyarrow only by the writer, evaluator, persistence and
data loaders); those that are not installed are replaced by empty placeholder modules (`_stub`), and nothing of
theirs is called.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowback.models.af import AFConfig, FlowClassifier  # noqa: E402
from flowback.models.af_objective import (  # noqa: E402
    AFState,
    AFTrainConfig,
    Draws,
    GradNorm,
    discriminator_loss,
    generator_loss,
    gp_rows,
    ot_weight,
)

DECAY = 1000  # OT schedule length (both sides count the same index)


class _Placeholder:
    """Stands for any name of a package that is not installed; using it is an error (nothing here should)."""

    def __init__(self, *a, **k):
        raise RuntimeError("peer_af: a stubbed package was used")


def _placeholder(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Placeholder


def _stub(name: str) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so `from name.sub import X` finds its stubbed submodules
    mod.__getattr__ = _placeholder
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)


def load_reference(ref: Path):
    """The released trainer class, its gradient normaliser, gradient capture and schedule factory."""
    sys.path.insert(0, str(ref))
    stubbed = []
    for _ in range(50):
        try:
            trainer = importlib.import_module("train_adversarial_flow_imagenet")
            break
        except ModuleNotFoundError as e:
            if e.name is None or e.name in stubbed or Path(ref, *e.name.split(".")).exists():
                raise
            for i in range(1, e.name.count(".") + 2):  # the package and every parent of it
                part = ".".join(e.name.split(".")[:i])
                if part not in sys.modules:
                    _stub(part)
            stubbed.append(e.name)
    else:
        raise RuntimeError("peer_af: could not import the reference trainer")
    grad_norm = importlib.import_module("grad_norm")
    capture = importlib.import_module("common.gradcapture")
    schedules = importlib.import_module("common.schedules")
    return trainer.AdversarialFlowTrainer, grad_norm.GradientNormalization, capture.GradientCapture, schedules, stubbed


# ------------------------------------------------------------------------------------------------------ cases
CASES = {
    "1-NFE, x-pred": dict(cfg=dict(), cg=None),
    "2-step, v-pred": dict(cfg=dict(nfe=2, pred="v"), cg=None),
    "any-step, v-pred": dict(cfg=dict(any_step=True, pred="v"), cg=None),
    "1-NFE + flow CG": dict(cfg=dict(), cg=dict(weight=0.003, flow=True, lo=0.0, hi=0.1)),
    "2-step + CG at t <= 0.49": dict(cfg=dict(nfe=2, pred="v"), cg=dict(weight=0.02, flow=False, lo=0.0, hi=0.49)),
}
SMALL = dict(channels=4, image_size=8, patch_size=2, width=32, depth=2, head_dim=16, mlp_ratio=2, num_classes=5)
BATCH = 8


def perturb(module: torch.nn.Module, g: torch.Generator, std: float = 0.05) -> None:
    """Move every weight off its initial value: adaLN-Zero starts G at zero output, which would test little."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def draws(cfg: AFConfig, tc: AFTrainConfig, g: torch.Generator) -> tuple[Draws, dict]:
    """One update's random inputs, as FlowBack's Draws and as the reference's training_step keywords."""
    shape = (BATCH, *cfg.image_shape)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if cfg.any_step:
        s = torch.rand(BATCH, generator=g, dtype=torch.float64)
        t = torch.rand(BATCH, generator=g, dtype=torch.float64) * s
    else:
        k = torch.randint(1, cfg.nfe + 1, (BATCH,), generator=g).double()
        s, t = k / cfg.nfe, (k - 1) / cfg.nfe
    noises = {n: rn(shape) for n in ("src", "tgt", "r1", "r2", "cg")}
    t_cg = None
    if tc.cg_weight > 0:
        t_cg = torch.rand(BATCH, generator=g, dtype=torch.float64) * (tc.cg_t_max - tc.cg_t_min) + tc.cg_t_min
        t_cg = t_cg if tc.cg_flow else t.clone()
    k = gp_rows(BATCH, tc)
    ours = Draws(noises["src"], noises["tgt"], s, t, noises["r1"][:k], noises["r2"][:k], t_cg,
                 noises["cg"] if tc.cg_weight > 0 and tc.cg_flow else None)
    theirs = dict(noises_src=noises["src"], noises_tgt=noises["tgt"], noises_r1=noises["r1"], noises_r2=noises["r2"],
                  noises_cg=noises["cg"], timesteps_src=s, timesteps_tgt=t, timesteps_cg=t_cg)
    return ours, theirs


def reference_config(cfg: AFConfig, tc: AFTrainConfig, cg: dict | None):
    from omegaconf import OmegaConf

    adv = dict(ttur=1, gp_scale=tc.gp_weight, gp_bsz_ratio=tc.gp_fraction, gp_eps=tc.gp_eps, ot_scale=tc.ot_start,
               cp_scale=tc.cp_weight, augment_p=0.0, grad_norm=True)
    c = dict(adversarial=adv, gen=dict(pred_type=cfg.pred), training=dict(accumulation=1),
             ot_scale_schedule=[dict(type="cosine", start=tc.ot_start, end=tc.ot_end, steps=tc.ot_decay_steps)])
    if cg is not None:
        adv.update(cg_scale=cg["weight"], cg_flow=cg["flow"], cg_timestep_lo=cg["lo"], cg_timestep_hi=cg["hi"])
        c["cls"] = dict(flow=cg["flow"])  # the loss reads cls.flow, the draw adversarial.cg_flow: set both alike
    return OmegaConf.create(c)


def grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in module.parameters()])


def zero(*modules) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def compare_case(name: str, case: dict, ref, seed: int) -> list[tuple[str, str, float, float, float]]:
    Trainer, RefGradNorm, RefCapture, schedules, _ = ref
    cg = case["cg"]
    cfg = AFConfig(**SMALL, **case["cfg"])
    tc = AFTrainConfig(ot_decay_steps=DECAY, **(dict(cg_weight=cg["weight"], cg_flow=cg["flow"], cg_t_min=cg["lo"],
                                                     cg_t_max=cg["hi"]) if cg else {}))
    g = torch.Generator().manual_seed(seed)
    clf = None
    if cg:
        clf = FlowClassifier(cfg).double()
        perturb(clf, g)
    state = AFState(cfg, tc, seed=seed, classifier=clf)
    for m in (state.generator, state.discriminator):
        m.double()
        perturb(m, g)
    state.grad_norm.double()
    G, D = state.generator, state.discriminator

    trainer = Trainer(reference_config(cfg, tc, cg))
    trainer.gen, trainer.dis, trainer.cls = G, D, clf
    trainer.dis_trainable_params = [p for p in D.parameters() if p.requires_grad]
    trainer.grad_norm = RefGradNorm().double()
    trainer.gen_dis_grad_capture, trainer.gen_ot_grad_capture = RefCapture(), RefCapture()
    trainer.ot_scale_schedule = schedules.create_schedule_from_config(trainer.config.ot_scale_schedule)

    x = torch.randn(BATCH, *cfg.image_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, cfg.num_classes, (BATCH,), generator=g)
    rows = []

    def row(what, a, b):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        scale = b.abs().max().item()
        rows.append((name, what, scale, (a - b).abs().max().item(), (a - b).abs().max().item() / max(scale, 1e-300)))

    for it in range(4):  # reference iterations 0..3: D, G, D, G
        dis = it % 2 == 0
        ours_d, theirs_d = draws(cfg, tc, g)
        state.step = it  # the OT weight's index, the reference's `step` (the step <-> iteration map is a convention)
        zero(G, D)
        if dis:
            loss, terms = discriminator_loss(state, x, y, ours_d)
            pairs = [("D adversarial", "d_loss", "loss/dis"), ("R1", "r1", "loss/r1"), ("R2", "r2", "loss/r2"),
                     ("logit centering", "cp", "loss/cp")]
        else:
            loss, terms = generator_loss(state, x, y, ours_d)
            pairs = [("G adversarial", "g_loss", "loss/gen"), ("OT", "ot", None), ("guidance", "cg", "loss/cg")]
        loss.backward()
        ours_grad = grads(D if dis else G)
        zero(G, D)
        ref_losses, _ = trainer.training_step(it, latents=x, labels=y, **theirs_d)
        ref_losses["loss/total"].backward()
        for p in D.parameters():  # the reference leaves D frozen after a G iteration
            p.requires_grad_(True)
        theirs_grad = grads(D if dis else G)
        for label, ours_key, ref_key in pairs:
            if ours_key == "ot":  # the reference's OT entry is already multiplied by its weight
                row(f"it {it}: lambda_ot * OT", terms["ot_weight"] * terms["ot"], ref_losses["loss/ot"])
            elif ours_key == "cg" and cg is None:
                continue
            else:
                row(f"it {it}: {label}", terms[ours_key], ref_losses[ref_key])
        row(f"it {it}: total loss", loss, ref_losses["loss/total"])
        row(f"it {it}: grad of {'D' if dis else 'G'} (all params)", ours_grad, theirs_grad)
        if not dis:
            row(f"it {it}: grad-norm running avg", state.grad_norm.square_avg, trainer.grad_norm.square_avg)
    zero(G, D)
    return rows


def compare_schedule(schedules) -> list[tuple]:
    from omegaconf import OmegaConf

    rows = []
    for start, end, n in ((0.2, 0.005, 1_000_000), (0.25, 0.005, 1_000_000), (0.2, 0.005, 1500)):
        sched = schedules.create_schedule_from_config(OmegaConf.create([dict(type="cosine", start=start, end=end,
                                                                             steps=n)]))
        idx = sorted({0, 1, n // 7, n // 2, n - 2, n - 1, n, 3 * n})
        a = torch.tensor([ot_weight(i, start, end, n) for i in idx], dtype=torch.float64)
        b = torch.tensor([sched[i] for i in idx], dtype=torch.float64)
        d = (a - b).abs().max().item()
        rows.append(("OT schedule", f"cosine {start} -> {end} over {n:,}, steps {idx}", b.abs().max().item(), d,
                     d / b.abs().max().item()))
    return rows


def compare_grad_norm(RefGradNorm, seed: int) -> list[tuple]:
    """The normaliser alone: the same input and the same sequence of upstream gradients (scales 1e-3 .. 1e3)."""
    g = torch.Generator().manual_seed(seed)
    ours, theirs = GradNorm(0.9, 1e-8).double(), RefGradNorm(ema_decay=0.9, eps=1e-8).double()
    x = torch.randn(16, 4, 8, 8, generator=g, dtype=torch.float64)
    grad_diff = grad_scale = nu_diff = 0.0
    for mult in (1e-3, 1.0, 1e3, 1.0, 0.1):
        up = torch.randn(x.shape, generator=g, dtype=torch.float64) * mult
        out = []
        for norm in (ours, theirs):
            xx = x.clone().requires_grad_(True)
            (norm(xx) * up).sum().backward()
            out.append(xx.grad)
        grad_diff = max(grad_diff, (out[0] - out[1]).abs().max().item())
        grad_scale = max(grad_scale, out[1].abs().max().item())
        nu_diff = max(nu_diff, abs(ours.square_avg.item() - theirs.square_avg.item()) / theirs.square_avg.item())
    what = "5 backward passes, upstream scale 1e-3..1e3"
    return [("gradient normalisation", f"{what}: normalised gradient", grad_scale, grad_diff, grad_diff / grad_scale),
            ("gradient normalisation", f"{what}: running avg nu (relative)", 1.0, nu_diff, nu_diff)]


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, type=Path, help="a local checkout of the released code")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = load_reference(args.ref.resolve())
    print(f"reference: {args.ref}; placeholder modules for: {', '.join(ref[4]) or 'none'}")
    print(f"networks: FlowBack's G, D, flow classifier (width {SMALL['width']}, depth {SMALL['depth']}, "
          f"{SMALL['channels']}x{SMALL['image_size']}x{SMALL['image_size']}, patch {SMALL['patch_size']}), "
          f"batch {BATCH}, float64, seed {args.seed}; the same modules in both\n")
    rows = compare_schedule(ref[3]) + compare_grad_norm(ref[1], args.seed)
    for name, case in CASES.items():
        rows += compare_case(name, case, ref, args.seed)
    print("| case | quantity | reference magnitude | max abs diff | relative |\n|---|---|---|---|---|")
    for case, what, scale, diff, rel in rows:
        print(f"| {case} | {what} | {scale:.4g} | {diff:.3g} | {rel:.3g} |")
    worst = max(r[3] for r in rows)
    print(f"\nmax relative diff: {max(r[4] for r in rows):.3g}")
    print(f"max diff: {worst:.3g}")
    return worst


if __name__ == "__main__":
    main()
