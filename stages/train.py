"""Stage `train`: train one experiment of the registry (baseline or an aligned variant) on the train split.

    python -m stages.train --experiment E
    torchrun --nproc_per_node 8 -m stages.train --experiment E       # DDP, one GPU per rank

Outputs in results/runs/<experiment>/: model.pt (flow config + weights), train.json (metrics), train_log.csv and
dvclive/ (curves for `dvc plots`). A killed run resumes from results/runs/<experiment>/.resume/state.pt; the dvclive
files are rebuilt from the log saved in that state, so no step is logged twice. The embedded default trains from
memory; ImageNet profiles stream the shards (flowback.data.batches.ShardBatches).
"""

from __future__ import annotations

import csv
import io

import torch

from flowback.alignment import load_encoder
from flowback.builders import encoder_config
from flowback.checkpoints import save_flow
from flowback.data.shards import check_prepared, load_split
from flowback.io import save_json, write_bytes
from flowback.stage import run_stage
from flowback.training import train


def write_log(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["step"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


class LiveLog:
    """dvclive metrics and plots under run_dir/dvclive (`dvc plots show`), with the training throughput.

    One dvclive `Live` per process. Its first call rewrites the directory from the whole log (which the resume
    state carries), later calls append the new row: a resumed run never shows the steps lost after its last
    checkpoint twice. Logging never stops training: if dvclive fails (e.g. parallel runs racing on its VS Code
    signal file in .dvc/tmp), the error is reported once and train_log.csv still gets every row.
    """

    def __init__(self, directory, images_per_row: int):
        self.directory, self.images_per_row = directory, images_per_row
        self.live, self.last, self.failed = None, None, False

    def __call__(self, log: list[dict]) -> None:
        import time

        if self.failed:
            return
        now = time.perf_counter()
        try:
            rows = log[-1:]
            if self.live is None:
                self.live, rows = self._open(), log
            for row in rows:
                self.live.step = row["step"]
                for k in ("loss", "bpd", "align", "lr", "grad_norm"):
                    self.live.log_metric(f"train/{k}", row[k])
                if self.last is not None and row is log[-1]:
                    self.live.log_metric("train/images_per_second", self.images_per_row / (now - self.last))
                self.live.next_step()
        except Exception as e:  # noqa: BLE001 - a logger must not end a multi-day run
            self._fail(e)
        self.last = now

    def _open(self):
        import shutil

        from dvclive import Live

        shutil.rmtree(self.directory, ignore_errors=True)
        return Live(str(self.directory), save_dvc_exp=False, dvcyaml=None, report=None)

    def _fail(self, e: Exception) -> None:
        self.failed = True
        print(f"warning: dvclive logging stopped ({type(e).__name__}: {e}); train_log.csv still has every row")

    def close(self) -> None:
        if self.live is not None and not self.failed:
            try:
                self.live.end()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        self.live = None


def body(params, exp, args):
    from flowback.distributed import env

    p = exp.params
    run_dir = params.run_dir(exp.name)
    rank, world, _ = env()
    batches, images, labels = None, None, None
    if p.data.dataset == "digits":
        images, labels = (torch.from_numpy(a) for a in load_split(params, "train"))
    else:
        from flowback.data.batches import ShardBatches

        check_prepared(params)  # streamed shards must match these params, as load_split insists
        tp = p.train
        batches = ShardBatches(p.data.dir, "train", tp.batch_size, tp.seed, tp.checkpoint_every, rank=rank,
                               world=world, workers=tp.workers, shuffle_buffer=tp.shuffle_buffer, flip=tp.flip)
    encoder = None
    if exp.strategy != "none":
        encoder = load_encoder(params.encoder.dir, fallback=encoder_config(params.encoder))
    state = run_dir / ".resume" / "state.pt"
    live = LiveLog(run_dir / "dvclive", p.train.log_every * p.train.batch_size)
    try:
        result = train(exp, images, labels, state, encoder, show_progress=not args.quiet, batches=batches,
                       on_log=live)
    finally:
        live.close()
    if rank != 0:
        return
    save_flow(run_dir / "model.pt", result.model, experiment=exp.name, strategy=exp.strategy,
              position=exp.position, steps=result.steps)
    write_log(run_dir / "train_log.csv", result.log)
    save_json(run_dir / "train.json", result.summary)
    state.unlink(missing_ok=True)
    s = result.summary
    print(f"{exp.name}: {s['steps']} steps in {s['seconds']:.0f} s, final {s['final_bpd']:.3f} bits/dim"
          + (f", alignment loss {s['final_align']:.3f}" if s["final_align"] is not None else ""))


def main(argv=None):
    run_stage("train", body, argv, per_experiment=True)


if __name__ == "__main__":
    main()
