"""FlowBack: TARFlow/STARFlow normalizing flows with reverse representation alignment, as a reproducible pipeline."""

import os

# OpenMP threads that wait by spinning collapse a step on a busy machine (0.08 -> 8.6 s/step with 2 threads and one
# other busy process: docs/benchmarks.md); waiting passively gives the same numbers. It must be set before torch
# loads, so here, where every stage's process starts; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
