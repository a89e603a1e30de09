"""A training run's curves in DVCLive's layout, for `dvc plots show`, `dvc exp show` and DVC Studio.

<run>/dvclive/plots/metrics/<field>.tsv holds one field's (step, value) rows and <run>/dvclive/metrics.json the latest
values and step. Both are written from the training log, which the resume state carries: the directory is emptied
when a run (re)starts and every row of the log is written again, so a resumed run's files equal an uninterrupted
run's. Nothing in them depends on the machine or the clock (no timestamps), so a re-run rewrites them byte for byte.

DVCLive only writes files here. The repository belongs to the engine that runs the stage (DVC or Snakemake):
flowback/pipeline.py declares the files in dvc.yaml and `dvc exp run` saves experiments, so DVCLive writes no dvc.yaml,
report or experiment, and does not open the repository at all (it would `dvc init` a git repository that has no
.dvc/, and stop the training in one without commits).
"""

from __future__ import annotations

from pathlib import Path

DIRECTORY = "dvclive"


def metrics_file(run_dir: str | Path) -> str:
    return f"{run_dir}/{DIRECTORY}/metrics.json"


def plot_file(run_dir: str | Path, field: str) -> str:
    return f"{run_dir}/{DIRECTORY}/plots/metrics/{field}.tsv"


class LiveLog:
    """Called with the whole log after each new row (as the training loops call `on_log`): writes the rows it has not
    written yet, for the `fields` it was made with (a row's None is a step without that measurement)."""

    def __init__(self, run_dir: str | Path, fields: tuple[str, ...]):
        from dvclive import Live

        class FilesOnly(Live):
            def _init_dvc(self) -> None:  # the repository is the engine's (module docstring)
                pass

        self.fields, self.written = fields, 0
        self.live = FilesOnly(f"{run_dir}/{DIRECTORY}", resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
                              monitor_system=False)

    def __call__(self, log: list[dict]) -> None:
        for row in log[self.written:]:
            self.live.step = int(row["step"])
            for field in self.fields:
                if row.get(field) is not None:
                    self.live.log_metric(field, float(row[field]), timestamp=False)
        self.written = len(log)
        # the fields' order, then step: not the order of first logging, which a resumed run sees differently
        self.live.summary = {f: self.live.summary[f] for f in self.fields if f in self.live.summary}
        self.live.make_summary()

    def end(self, log: list[dict]) -> None:
        """The final log (a run resumed after its last log step has no new rows to call with)."""
        self(log)
        self.live.end()
