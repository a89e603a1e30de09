"""`flowback` command: the stages, checks that need no stage run, the memory plan, the pipeline files, and weights.

  flowback stage NAME [RUN] [--params F]           run one stage (RUN = <experiment>-s<seed> for per-run stages)
  flowback check [--params params.yaml]            validate every key and every experiment row, print the grid
  flowback plan [--params F] [--gpu-mem GiB]       per-GPU memory, FLOPs and GPU-hours of every stage, measured
  flowback pipeline [--params F] [--check]         write dvc.yaml from params.yaml and the code (or check it)
  flowback weights fetch [--params params.yaml]    download the networks the profile needs (skips verified ones)
  flowback weights verify [--params params.yaml]   re-hash them, load them through the stages' loaders, run each once
  flowback weights import --from ml-tarflow|ml-starflow CKPT --params F --run RUN [--force]
                                                   a reference checkpoint as that run's model.pt (sample/evaluate/probe)
  flowback data verify [--params params.yaml]      re-read every shard of the prepared data against its manifest
  flowback plots [DVC PLOTS SHOW OPTIONS]          `dvc plots show` with vega inlined: renders offline
"""

from __future__ import annotations

import argparse
import sys

from .errors import FlowBackError
from .params import load_params


def check(path: str) -> int:
    from .families import family

    params = load_params(path)
    print(f"{path}: valid; {len(params.runs())} runs.")
    for run in params.runs():
        exp = params.run(run)
        what = family(exp.family).describe(exp) if exp.trains else (
            f"{exp.strategy:<8} {exp.position or '-':<14} reads {exp.milestone.of} at step {exp.milestone.step}")
        print(f"  {run:<24} {what}")
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
    if args.action == "import":
        from .weight_import import import_weights  # imports torch

        dest = import_weights(args.kind, args.checkpoint, args.params, args.run, overwrite=args.force)
        print(f"{dest}: written from {args.kind} checkpoint {args.checkpoint}")
        return 0
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
              f"{path} ({'; '.join(stale)}); re-run `python -m flowback stage prepare`", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plots"]:  # every later argument is dvc's
        from .plots_offline import main as plots

        return plots(argv[1:])
    parser = argparse.ArgumentParser(prog="flowback", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_stage = sub.add_parser("stage", help="run one stage of the pipeline (what dvc and snakemake call)")
    p_stage.add_argument("name", help="the stage (flowback/stages/NAME.py)")
    # a positional run, not `--run`: torchrun's own options would take `--run` for an abbreviation of --run-path
    p_stage.add_argument("run", nargs="?", help="for per-run stages: <experiment>-s<seed>, e.g. baseline-s0 (or the "
                                                 "experiment's name when it has one seed)")
    p_stage.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p_stage.add_argument("--quiet", action="store_true", help="no progress bars")
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
    p_import = actions.add_parser("import", help="convert an ml-tarflow / ml-starflow checkpoint into a run's model.pt")
    p_import.add_argument("--from", dest="kind", required=True, choices=["ml-tarflow", "ml-starflow"])
    p_import.add_argument("checkpoint", metavar="CKPT", help="the reference's state_dict file (.pth)")
    p_import.add_argument("--params", default="params.yaml")
    p_import.add_argument("--run", required=True, metavar="RUN",
                          help="the run to write: <experiment>-s<seed>, or an experiment with one seed")
    p_import.add_argument("--force", action="store_true", help="replace the run's existing model.pt")
    p_data = sub.add_parser("data", help="verify the prepared data shards")
    p_data.add_argument("action", choices=["verify"])
    p_data.add_argument("--params", default="params.yaml")
    sub.add_parser("plots", help="`dvc plots show` with vega inlined from vl-convert-python: renders offline "
                                 "(options are dvc's)")
    args = parser.parse_args(argv)
    if args.command == "stage":
        from .runner import main as run_stage
        from .stages import stages

        if args.name not in stages():
            parser.error(f"no stage {args.name!r}; stages: {', '.join(stages())}")
        return run_stage(args.name, args.run, args.params, progress=not args.quiet)
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
