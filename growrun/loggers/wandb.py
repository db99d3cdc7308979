"""logger=wandb: a Weights & Biases run in the project logger.project (entity logger.entity),
named logger.name or the run directory's name; logger.mode=offline writes it under
<run dir>/wandb for a later `wandb sync` (no account, no network).

    config                     the resolved config (nested, as W&B shows it)
    metrics/<column>           each numeric metrics.csv column per epoch, at the training step
    growth/<site>/<column>     each numeric growth.csv column per growth event and site
    summary                    the summary's final numbers (run.summary)
    plots/<figure>             the report's figures as images, at the last step (a completed run)

Like MLflow, W&B cannot take values back, so values go to it when the run writes its next
checkpoint (every epoch by default; at once with trainer.checkpoint=false): a stopped process
never sent the steps after its last checkpoint, and a run that ends other than completed drops
them (its resume logs them again). A process killed outright (SIGKILL, out of memory) may also
lose what W&B's service had not yet written of the last checkpoint's interval (offline, its .wandb
file is written in batches): those steps are then missing from W&B, never doubled; the CSV files
have them. The W&B run id is kept in <run dir>/loggers.json:
a resumed run continues the same W&B run (resume="allow"; offline, a new offline directory of the
same run id, which `wandb sync` joins). A run W&B cannot start (not logged in, no network) is a
one-line error before the run trains, naming logger.mode=offline.
"""
from __future__ import annotations

import secrets
import string
from collections import defaultdict
from pathlib import Path

from growrun.errors import GrowrunError
from growrun.loggers import numbers, png_files, read_ids, summary_numbers, write_ids


class WandB:
    name = "wandb"

    def __init__(self, opts, run_dir: Path, resumed_step: int | None, config: dict):
        import wandb

        ids = read_ids(run_dir)
        stored = ids.get("wandb") if resumed_step is not None else None
        run_id = stored or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        try:
            self.run = wandb.init(project=opts.project, entity=opts.entity, name=opts.name or run_dir.name,
                                  id=run_id, resume="allow", mode=opts.mode, dir=str(run_dir),
                                  config=None if stored else config,
                                  settings=wandb.Settings(silent=True, console="off", init_timeout=60))
        except Exception as ex:  # noqa: BLE001  (not logged in, no network, ...: one line)
            raise GrowrunError(f"logger.wandb: cannot start a W&B run in mode {opts.mode} ({type(ex).__name__}: "
                               f"{str(ex).splitlines()[0] if str(ex) else ''}); run `wandb login`, or use "
                               "logger.mode=offline and `wandb sync` later") from None
        write_ids(run_dir, {**ids, "wandb": run_id})
        self.pending: dict[int, dict[str, float]] = defaultdict(dict)  # step -> values not sent yet
        self.last_step = resumed_step or 0

    def epoch(self, rows: list[dict]) -> None:
        for row in rows:
            step = int(row["step"])
            self.pending[step].update({f"metrics/{k}": v for k, v in numbers(row).items() if k != "step"})
            self.last_step = step

    def growth(self, rows: list[dict]) -> None:
        for row in rows:
            step = int(row["step"])
            self.pending[step].update({f"growth/{row['site']}/{k}": v for k, v in numbers(row).items() if k != "step"})

    def checkpointed(self, step: int) -> None:
        """The run wrote a checkpoint at `step`: send what was logged up to it, in step order."""
        for s in sorted(self.pending):
            self.run.log(self.pending[s], step=s)
        self.pending.clear()

    def plots(self, images: dict[str, bytes]) -> None:
        import wandb

        self.checkpointed(self.last_step)  # the history up to the last step first: W&B steps only go up
        with png_files(images) as paths:  # wandb.Image copies the file into the run
            self.run.log({f"plots/{name.removesuffix('.png')}": wandb.Image(str(path)) for name, path in paths.items()},
                         step=self.last_step)

    def finish(self, summary: dict) -> None:
        if summary.get("status") == "completed":
            self.checkpointed(self.last_step)
        else:  # after the last checkpoint: a resumed run logs these steps again
            self.pending.clear()
        self.run.summary.update({f"summary/{k}": v for k, v in summary_numbers(summary).items()})
        self.run.summary["status"] = summary.get("status", "")
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)

    def close(self) -> None:
        pass
