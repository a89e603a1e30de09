"""What every `python -m stages.X` command shares: argument parsing, params validation, clean error exits."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import FlowBackError
from .params import Experiment, Params, load_params


def run_stage(
    name: str,
    body: Callable[[Params, Experiment | None, argparse.Namespace], None],
    argv: list[str] | None = None,
    per_experiment: bool = False,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse args, validate params (and the experiment) before any work, run `body`; input errors exit 2."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if per_experiment:
        parser.add_argument("--experiment", required=True, help="experiment name from params.yaml 'experiments'")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        exp = params.experiment(args.experiment) if per_experiment else None
        body(params, exp, args)
    except FlowBackError as e:
        print(f"stages.{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
