"""`flowback` command: checks that need no stage run, the memory plan, the pipeline files, and pretrained weights.

  flowback check [--params params.yaml]            validate every key and every experiment row, print the grid
  flowback plan [--params F] [--gpu-mem GiB]       per-GPU memory, FLOPs and GPU-hours of every stage, measured
  flowback pipeline [--params F] [--check]         write dvc.yaml from params.yaml and the code (or check it)
  flowback weights fetch [--params params.yaml]    download the networks the profile needs (skips verified ones)
  flowback weights verify [--params params.yaml]   re-hash them, load them through the stages' loaders, run each once
  flowback data verify [--params params.yaml]      re-read every shard of the prepared data against its manifest
"""

from __future__ import annotations

import argparse
import sys

from .errors import FlowBackError
from .params import load_params


def check(path: str) -> int:
    params = load_params(path)
    m, g = params.model, params.af.generator
    families = {e.family for e in params.experiments.values()}
    parts = []
    if "tarflow" in families:
        parts.append(f"flow: {m.blocks} blocks x {m.layers_per_block()} layers, width {m.width}, patch {m.patch_size}, "
                     f"{params.train.steps} training steps")
    if "af" in families:
        parts.append(f"adversarial flow: DiT width {g.width} x {g.depth}, patch {g.patch_size}, "
                     f"{params.af.train.steps} training steps")
    print(f"{path}: valid. {'; '.join(parts)}; {len(params.runs())} runs.")
    for run in params.runs():
        exp = params.run(run)
        where = ", ".join(f"block {b} layer {l}" for b, l in exp.positions) or "-"
        kind = "af" if exp.family == "af" else exp.strategy
        train = exp.params.af.train if exp.family == "af" else exp.params.train
        steps = f"{train.steps} steps" if exp.trains else f"{exp.milestone.of} at step {exp.milestone.step}"
        print(f"  {run:<20} {kind:<8} {exp.position or '-':<14} {steps:<28} -> {where}")
    return 0


def pipeline(path: str, check_only: bool) -> int:
    from pathlib import Path

    from .pipeline import Pipeline, check_dvc_file

    p = Pipeline.load(path)
    target = Path("dvc.yaml")
    if check_only:
        problem = check_dvc_file(p, target)
        if problem:
            print(f"flowback: error: {problem}; run `python -m flowback pipeline`", file=sys.stderr)
            return 2
        print(f"{target}: up to date ({len(p.instances)} stages)")
        return 0
    from .io import write_bytes

    write_bytes(target, p.dvc_yaml().encode())
    print(f"{target}: written ({len(p.instances)} stages)")
    return 0


def plan(args: argparse.Namespace) -> int:
    from .plan.table import print_plan

    gpu_mem = None if args.gpu_mem is None else _gib(args.gpu_mem)
    world = None if args.world is None else _number("--world", args.world, int, "a positive whole number of GPUs per run, e.g. --world 8")
    mfu = _number("--mfu", args.mfu, float, "a fraction of the peak in (0, 1], e.g. --mfu 0.4", upper=1.0)
    peak = _number("--peak-tflops", args.peak_tflops, float, "the GPU's positive peak TFLOP/s, e.g. --peak-tflops 989")
    return print_plan(args.params, gpu_mem, world, mfu, peak)


def _number(flag: str, text: str, kind: type, expected: str, upper: float = float("inf")):
    """A positive number (at most `upper`) or one line naming the flag: 0, negatives, nan and inf would print a
    silently wrong plan or a traceback."""
    try:
        value = kind(text)
    except ValueError:
        raise FlowBackError(f"{flag} {text!r}: expected {expected}") from None
    if not 0 < value <= upper or value == float("inf"):
        raise FlowBackError(f"{flag} {text!r}: expected {expected}")
    return value


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FlowBackError(f"--gpu-mem {text!r}: expected the GPU's memory in GiB, e.g. --gpu-mem 80") from None
    if not value > 0 or value == float("inf"):
        raise FlowBackError(f"--gpu-mem {text!r}: must be a positive number of GiB, e.g. --gpu-mem 80")
    return value


def _sources(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, source = pair.partition("=")
        if not sep or not name or not source:
            raise FlowBackError(f"--source {pair!r}: expected NETWORK=PATH_OR_URL, e.g. inception=/mirror/file.pth")
        out[name] = source
    return out


def weights(args: argparse.Namespace) -> int:
    from . import weights as w  # imports torch: only the weights commands pay for it

    params = load_params(args.params)
    if args.action == "fetch":
        w.fetch(params, _sources(args.source), progress=not args.quiet)
    else:
        w.verify(params)
    return 0


def data_verify(path: str) -> int:
    """Every shard present, sha256 as in the manifest, every sample decodable with the promised keys and labels."""
    from .data.manifest import MANIFEST, load_manifest, stale_settings, verify

    params = load_params(path)
    d = params.data.dir
    stale = stale_settings(params, load_manifest(d))
    summary = verify(d)
    for split, s in summary.items():
        skipped = f", {s['skipped']} sources skipped at prepare" if s["skipped"] else ""
        print(f"{d}: {split}: {s['count']} samples in {s['shards']} shards verified{skipped}")
    if stale:
        print(f"flowback: error: {d / MANIFEST}: the shards are intact but were prepared with other settings than "
              f"{path} ({'; '.join(stale)}); re-run `python -m stages.prepare`", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowback", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="validate params.yaml and list the experiment grid")
    p_check.add_argument("--params", default="params.yaml")
    p_plan = sub.add_parser("plan", help="per-GPU memory, FLOPs and GPU-hours of every stage, measured on the code")
    p_plan.add_argument("--params", default="params.yaml")
    p_plan.add_argument("--gpu-mem", default=None, metavar="GiB",
                        help="memory per GPU to plan for (default: runtime.gpu_memory_gib)")
    p_plan.add_argument("--world", default=None, help="GPUs per run (default: from runtime.launcher)")
    p_plan.add_argument("--mfu", default="0.4", help="model FLOPs utilisation for GPU-hours (default 0.4)")
    p_plan.add_argument("--peak-tflops", default="989.0",
                        help="GPU peak TFLOP/s for GPU-hours (default: H100 SXM dense bf16, 989)")
    p_pipe = sub.add_parser("pipeline", help="write dvc.yaml from params.yaml and the code (--check: only compare)")
    p_pipe.add_argument("--params", default="params.yaml")
    p_pipe.add_argument("--check", action="store_true")
    p_weights = sub.add_parser("weights", help="fetch or verify the pretrained networks the profile needs")
    actions = p_weights.add_subparsers(dest="action", required=True)
    p_fetch = actions.add_parser("fetch", help="download the networks into the directories params.yaml names")
    p_fetch.add_argument("--params", default="params.yaml")
    p_fetch.add_argument("--source", action="append", default=[], metavar="NETWORK=PATH_OR_URL",
                         help="take a network (encoder, vae, inception) from a local file/directory or URL instead "
                              "of its hub source, e.g. a mirror; repeatable")
    p_fetch.add_argument("--quiet", action="store_true", help="no download progress bars")
    p_verify = actions.add_parser("verify", help="check hashes, load each network and run it once; exit 0 if all pass")
    p_verify.add_argument("--params", default="params.yaml")
    p_data = sub.add_parser("data", help="verify the prepared data shards")
    p_data.add_argument("action", choices=["verify"])
    p_data.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "weights":
            return weights(args)
        if args.command == "data":
            return data_verify(args.params)
        if args.command == "plan":
            return plan(args)
        if args.command == "pipeline":
            return pipeline(args.params, args.check)
        return check(args.params)
    except FlowBackError as e:
        print(f"flowback: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
