"""Benchmark: FlowBack against the reference code it reproduces, on the same weights.

Builds apple/ml-tarflow's or apple/ml-starflow's model (from a local checkout, --ref) with random weights at a small
config, maps its state_dict into FlowBack (flowback.models.convert, the mapping `flowback weights import` uses) with
the FlowBack options that make the two the same model, and prints, for each option combination, the max |diff| of:
z (the forward map's output), the log-det, every parameter's gradient of the training loss (mapped back through the
same map), an unguided sample and a guided one from the same noise. fp32 on the CPU; the target is 1e-4.
The last line is `max diff: D` over every column of every row. --controls first runs the "every option" rows again
with one FlowBack setting wrong (e.g. rope_order spatial): those differences must be large, or the option would not
be what makes the two agree.

Each reference's own quirks are followed, not copied: ml-tarflow's log-det is a mean over dimensions (here times
T x D), and ml-starflow's tokens are (p1 p2 c) (compared as images). ml-starflow runs only with RoPE (without it,
its Permutation is handed the 2-D position table and fails, and its sampler sizes the KV cache from the rotary
table), so every ml-starflow row uses RoPE. ml-starflow imports einops (a small pure-Python package: pip install
einops); ml-tarflow needs nothing beyond torch.

  python bench/peer.py --ref /path/to/ml-tarflow
  python bench/peer.py --ref /path/to/ml-starflow [--kind ml-starflow]
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowback.models.convert import convert, from_ml_starflow, from_ml_tarflow  # noqa: E402
from flowback.models.guidance import Guidance  # noqa: E402
from flowback.models.sampling import reverse  # noqa: E402
from flowback.models.tarflow import FlowConfig, TARFlow, latent_norm_penalty  # noqa: E402

B, C, SIZE, PATCH, K = 3, 2, 8, 2, 5  # batch, channels, image size, patch, classes: 16 tokens of 8 values
Y = torch.tensor([0, 3, 4])
COLUMNS = ("z", "logdet", "grads", "sample", "guided")

# ml-tarflow fixes head_dim 64 and MLP expansion 4 inside its blocks; 2 heads
TARFLOW_CASES = {
    "unconditional": dict(num_classes=0),
    "class-conditional": dict(num_classes=K, guidance=dict(weight=1.5)),
    "guided, annealed, attn_temp 0.8": dict(num_classes=K, guidance=dict(weight=1.5, anneal=True, attn_temp=0.8)),
    "guided, guide_what b": dict(num_classes=K, guidance=dict(weight=2.0, guide_what="b")),
}

# ml-starflow rows: its option names (transformer_flow.Model) on top of a class-conditional RoPE model
STAR_CLASS = dict(rope=True, num_classes=K, guidance=dict(weight=1.5))
STARFLOW_CASES = {
    "unconditional, rope": dict(rope=True),
    "class-conditional (rope 3d)": STAR_CLASS,
    "+ sos": dict(STAR_CLASS, sos=True),
    "+ use_softplus": dict(STAR_CLASS, use_softplus=True),
    "+ use_final_norm": dict(STAR_CLASS, use_final_norm=True),
    "+ soft_clip 2": dict(STAR_CLASS, soft_clip=2.0),
    "+ seq_order L2R": dict(STAR_CLASS, seq_order="L2R"),
    "+ use_swiglu (geglu)": dict(STAR_CLASS, use_swiglu=True),
    "+ cond_top_only, deep block": dict(STAR_CLASS, cond_top_only=True, layers=[1, 1, 2]),
    "+ attn_temp 0.8 / 0.9 unguided": dict(STAR_CLASS, attn_temp=0.8, unguided_temp=0.9),
    "+ latent norm 0.1": dict(STAR_CLASS, latent_norm=0.1),
    "every option": dict(STAR_CLASS, sos=True, use_softplus=True, use_final_norm=True, soft_clip=2.0,
                         seq_order="L2R", use_swiglu=True, cond_top_only=True, layers=[1, 1, 2], attn_temp=0.8,
                         latent_norm=0.1),
    "every option, class in every block": dict(STAR_CLASS, sos=True, use_softplus=True, use_final_norm=True,
                                               soft_clip=2.0, seq_order="L2R", use_swiglu=True, attn_temp=0.8,
                                               latent_norm=0.1),
}


# one FlowBack setting wrong at a time (the run-time ones are not FlowConfig fields)
TARFLOW_CONTROLS = {"seq_order": "L2R", "attn_temp_on": "all"}
STARFLOW_CONTROLS = {"seq_order": "R2L", "rope_layout": "2d", "rope_order": "spatial", "mlp": "swiglu",
                     "null_class": "mean", "scale": "exp", "soft_clip": 0.0, "attn_temp_on": "uncond",
                     "latent_norm_form": "mean"}
RUNTIME = ("attn_temp_on", "latent_norm_form")


def mapped(kind: str, state: dict, cfg: FlowConfig, wrong: dict) -> TARFlow:
    """The mapped FlowBack model, or (wrong) the same weights in a model with those FlowConfig fields changed."""
    model = convert(kind, state, cfg)
    fields = {k: v for k, v in wrong.items() if k not in RUNTIME}
    if not fields:
        return model
    other = TARFlow(FlowConfig(**{**cfg.to_dict(), **fields}))
    keep = other.state_dict()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k in keep})
    return other.eval()


def detect(ref: Path) -> str:
    if (ref / "misc" / "pe.py").exists():
        return "ml-starflow"
    if (ref / "transformer_flow.py").exists():
        return "ml-tarflow"
    raise SystemExit(f"{ref}: neither an ml-tarflow nor an ml-starflow checkout (no transformer_flow.py)")


def reference_module(ref: Path):
    sys.path.insert(0, str(ref))
    return importlib.import_module("transformer_flow")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initialisation: zero output projections make every block the identity, and a
    comparison of identities proves nothing. Class tables are spread so guidance has something to contrast."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out" in name:  # small enough that the 16-token inverse stays finite
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 / p.shape[-1] ** 0.5)
            elif "proj_txt" in name or "class_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, SIZE, SIZE, generator=g) * 0.5).clamp(-1, 1)
    z = torch.randn(B, (SIZE // PATCH) ** 2, C * PATCH**2, generator=g)
    return x, z


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def grad_diff(fb_model, ref_grads: dict, mapper) -> float:
    mapped = mapper(ref_grads)
    return max(max_diff(p.grad, mapped[name]) for name, p in fb_model.named_parameters())


def run_tarflow(tf, case: dict, wrong: dict | None = None) -> dict:
    k = case.get("num_classes", 0)
    torch.manual_seed(0)
    ref = tf.Model(in_channels=C, img_size=SIZE, patch_size=PATCH, channels=128, num_blocks=3, layers_per_block=2,
                   num_classes=k)
    randomize(ref, 0)
    cfg = FlowConfig(channels=C, image_size=SIZE, patch_size=PATCH, width=128, layers=(2, 2, 2), head_dim=64,
                     mlp_ratio=4, num_classes=k)
    wrong = wrong or {}
    fb = mapped("ml-tarflow", ref.state_dict(), cfg, wrong)
    y = Y if k else None
    x, z = inputs()
    row = {}
    z_ref, _, logdets = ref(x, y)
    out = fb(x, y)
    T, D = cfg.num_tokens, cfg.token_dim
    row["z"], row["logdet"] = max_diff(out.z, z_ref), max_diff(out.logdet, logdets * T * D)
    ref.get_loss(z_ref, logdets).backward()
    fb.nll_per_dim(out).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    row["grads"] = grad_diff(fb, {**grads, **{n: b for n, b in ref.named_buffers()}},
                             lambda s: from_ml_tarflow(s, cfg))
    with torch.no_grad():
        row["sample"] = max_diff(reverse(fb, z, y), ref.reverse(z.clone(), y))
        g = case.get("guidance")
        if g:
            guided_ref = ref.reverse(z.clone(), y, guidance=g["weight"], guide_what=g.get("guide_what", "ab"),
                                     attn_temp=g.get("attn_temp", 1.0), annealed_guidance=g.get("anneal", False))
            rule = Guidance("tarflow", g["weight"], g.get("anneal", False), g.get("guide_what", "ab"),
                            g.get("attn_temp", 1.0), attn_temp_on=wrong.get("attn_temp_on", "uncond"))
            row["guided"] = max_diff(reverse(fb, z, y, rule), guided_ref)
    return row


def run_starflow(sf, case: dict, wrong: dict | None = None) -> dict:
    k = case.get("num_classes", 0)
    layers = case.get("layers", [2, 2, 2])
    rope, top = case.get("rope", False), case.get("cond_top_only", False)
    options = {o: case.get(o, False) for o in ("sos", "use_softplus", "use_final_norm", "use_swiglu")}
    torch.manual_seed(0)
    ref = sf.Model(in_channels=C, img_size=SIZE, patch_size=PATCH, channels=40, num_blocks=len(layers),
                   layers_per_block=layers, head_dim=20, rope=rope, txt_size=1 if k else 0, txt_dim=k + 1 if k else 0,
                   cond_top_only=top, soft_clip=case.get("soft_clip", 0.0), seq_order=case.get("seq_order", "R2L"),
                   **options)
    randomize(ref, 0)
    cfg = FlowConfig(channels=C, image_size=SIZE, patch_size=PATCH, width=40, layers=tuple(layers), head_dim=20,
                     mlp_ratio=4, num_classes=k, pos_embed="rope" if rope else "learned",
                     cond_blocks="deep" if top else "all", start_token=options["sos"],
                     final_norm=options["use_final_norm"], scale="softplus" if options["use_softplus"] else "exp",
                     soft_clip=case.get("soft_clip", 0.0), cond_token=bool(k),
                     mlp="geglu" if options["use_swiglu"] else "gelu", seq_order=case.get("seq_order", "R2L"),
                     rope_layout="3d" if rope and k else "2d", rope_order="sequence" if rope else "spatial",
                     null_class="learned" if k else "mean")
    wrong = wrong or {}
    fb = mapped("ml-starflow", ref.state_dict(), cfg, wrong)
    temp_on, form = wrong.get("attn_temp_on", "all"), wrong.get("latent_norm_form", "starflow")
    onehot = lambda labels: torch.nn.functional.one_hot(labels, k + 1).float()[:, None]  # noqa: E731  its embedder
    y, y_emb = (Y, onehot(Y)) if k else (None, None)
    x, z = inputs()
    row = {}
    z_img, _, outputs, logdets = ref(x, y_emb)
    out = fb(x, y)
    row["z"] = max_diff(fb.unpatchify(out.z), z_img)
    row["logdet"] = max_diff(out.logdet, sum(l.sum(dim=(1, 2)) for l in logdets))
    lam = case.get("latent_norm", 0.0)
    ref_loss = ref.get_loss(z_img, logdets)["loss"] + lam * sum(h.pow(2).mean() for h in outputs[:-1])
    ref_loss.backward()
    (fb.nll_per_dim(out) + lam * latent_norm_penalty(out, form)).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    row["grads"] = grad_diff(fb, grads, lambda s: from_ml_starflow(s, cfg, gradients=True))
    noise = fb.unpatchify(z)  # the same noise values in ml-starflow's token layout once it patchifies them
    temp = case.get("unguided_temp", 1.0)
    with torch.no_grad():
        ref_sample = ref.reverse(noise.clone(), y_emb, guidance=0, attn_temp=temp)
        row["sample"] = max_diff(reverse(fb, z, y, Guidance(attn_temp=temp, attn_temp_on=temp_on)), ref_sample)
        g = case.get("guidance")
        if g:
            t = case.get("attn_temp", 1.0)
            guided_ref = ref.reverse(noise.clone(), torch.cat([y_emb, onehot(torch.full_like(Y, k))]),
                                     guidance=g["weight"], attn_temp=t)
            rule = Guidance("starflow", g["weight"], blocks="all", attn_temp=t, attn_temp_on=temp_on)
            row["guided"] = max_diff(reverse(fb, z, y, rule), guided_ref)
    return row


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", type=Path, required=True, help="local checkout of apple/ml-tarflow or ml-starflow")
    parser.add_argument("--kind", choices=["ml-tarflow", "ml-starflow"], default=None, help="default: detect")
    parser.add_argument("--controls", action="store_true", help="also run with one FlowBack setting wrong at a time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kind = args.kind or detect(args.ref)
    module = reference_module(args.ref)
    if kind == "ml-tarflow":
        cases, run, controls, target = TARFLOW_CASES, run_tarflow, TARFLOW_CONTROLS, "guided, annealed, attn_temp 0.8"
    else:
        cases, run, controls, target = STARFLOW_CASES, run_starflow, STARFLOW_CONTROLS, "every option"
    width = max(map(len, cases)) + 2

    def line(name: str, row: dict) -> str:
        return name.ljust(width) + "".join((f"{row[c]:.1e}" if c in row else "-").rjust(10) for c in COLUMNS)

    header = "case".ljust(width) + "".join(c.rjust(10) for c in COLUMNS)
    if args.controls:
        print(f"controls: {kind} '{target}' (and its attn_temp row) with one FlowBack setting wrong: must be large")
        print(header)
        for field, value in controls.items():
            case = cases["+ attn_temp 0.8 / 0.9 unguided"] if field == "attn_temp_on" and kind == "ml-starflow" \
                else cases[target]
            print(line(f"{field}: {value}", run(module, case, {field: value})))
        print()
    print(f"{kind} ({args.ref}) vs FlowBack, same weights, fp32 CPU: max |diff|")
    print(header)
    worst = 0.0
    for name, case in cases.items():
        row = run(module, case)
        worst = max(worst, *(float("inf") if math.isnan(v) else v for v in row.values()))  # NaN is a failure
        print(line(name, row))
    print(f"max diff: {worst:.2e}")
    return worst


if __name__ == "__main__":
    main()
