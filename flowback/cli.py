"""`flowback` command: checks that need no stage run.

  flowback check [--params params.yaml]   validate every key and every experiment row, print the grid
"""

from __future__ import annotations

import argparse
import sys

from .errors import FlowBackError
from .params import load_params


def check(path: str) -> int:
    params = load_params(path)
    m = params.model
    print(f"{path}: valid. Model: {m.blocks} blocks x {m.layers_per_block()} layers, width {m.width}, "
          f"patch {m.patch_size}; {params.train.steps} training steps.")
    for name in params.experiments:
        exp = params.experiment(name)
        where = ", ".join(f"block {b} layer {l}" for b, l in exp.positions) or "-"
        print(f"  {name:<16} {exp.strategy:<8} {exp.position or '-':<14} -> {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowback", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="validate params.yaml and list the experiment grid")
    p_check.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        return check(args.params)
    except FlowBackError as e:
        print(f"flowback: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
