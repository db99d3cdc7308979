"""logger=mlflow: an MLflow run (MlflowClient), in logger.tracking_uri (e.g. sqlite:///mlflow.db,
http://host:5000; None: MLflow's default, $MLFLOW_TRACKING_URI) under the experiment
logger.project, named logger.name or the run directory's name.

    params                     the resolved config, flattened (optim.lr, growth.method, ...)
    metrics/<column>           each numeric metrics.csv column per epoch, at the training step
    growth/<site>/<column>     each numeric growth.csv column per growth event and site
    summary/<key>              the summary's final numbers, at the last step
    artifacts                  metrics.csv, growth.csv, summary.json at the end, and the
                               report's figures under plots/ (a completed run)
MLflow keys cannot hold ':', so `width:layer1.0` is logged as `width/layer1.0`. The run's status
follows summary.json (completed: FINISHED, interrupted: KILLED, else FAILED).

Values reach MLflow when the run's next checkpoint is written (every epoch by default;
`checkpointed`), since MLflow cannot delete what it was sent: a process killed after a checkpoint
never sent the steps after it, which the resumed run trains and logs again. The MLflow run id is
kept in <run dir>/loggers.json, so a resumed run continues the same MLflow run (status back to
RUNNING; the params are not logged again), and first sends the CSV files' rows (up to the
checkpoint) that MLflow lacks (a kill between a checkpoint and its sending). So MLflow holds each
CSV cell once, equal to the files, after any kill.
A tracking server that cannot be reached is a one-line error before the run trains.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from growrun.errors import GrowrunError
from growrun.loggers import flat_config, numbers, png_files, read_ids, summary_numbers, write_ids

STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}


def _key(name: str) -> str:
    return name.replace(":", "/")


class MLflow:
    name = "mlflow"

    def __init__(self, opts, run_dir: Path, resumed_step: int | None, config: dict):
        # fail fast on an unreachable server (MLflow's own default retries for minutes)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        ids = read_ids(run_dir)
        stored = ids.get("mlflow", {}) if resumed_step is not None else {}
        uri = opts.tracking_uri or stored.get("tracking_uri")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.uri = self.client.tracking_uri
            if stored.get("run_id") and stored.get("tracking_uri") == self.uri:
                self.run_id = stored["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self._create(opts, run_dir, config)
                stored = {}
        except Exception as ex:  # noqa: BLE001  (whatever the store raises: one line)
            raise GrowrunError(f"logger.mlflow: cannot use the tracking store {uri or '(MLflow default)'} "
                               f"({type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}); "
                               "check logger.tracking_uri") from None
        write_ids(run_dir, {**ids, "mlflow": {"run_id": self.run_id, "tracking_uri": self.uri}})
        self.pending: list = []  # metrics not sent yet: sent at the next checkpoint
        self.last_step = resumed_step or 0
        if stored:
            self._backfill()

    def _backfill(self) -> None:
        """Send the CSV files' (key, step) values the MLflow run lacks (the files hold the rows up
        to the checkpoint the run resumes from)."""
        import csv

        have = {(key, m.step) for key in self.client.get_run(self.run_id).data.metrics
                for m in self.client.get_metric_history(self.run_id, key)}
        for name, log_rows in (("metrics.csv", self.epoch), ("growth.csv", self.growth)):
            if (self.run_dir / name).is_file():
                with open(self.run_dir / name, newline="") as f:
                    log_rows(list(csv.DictReader(f)))
        self.pending = [m for m in self.pending if (m.key, m.step) not in have]
        self.checkpointed(self.last_step)

    def _create(self, opts, run_dir: Path, config: dict) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(opts.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(opts.project)
        run = self.client.create_run(experiment_id, run_name=opts.name or run_dir.name,
                                     tags={"growrun.run_dir": str(run_dir)})
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]

    def checkpointed(self, step: int) -> None:
        """The run wrote a checkpoint at `step`: send what was logged up to it."""
        metrics, self.pending = self.pending, []
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def epoch(self, rows: list[dict]) -> None:
        for row in rows:
            step = int(row["step"])
            self._log({f"metrics/{_key(k)}": v for k, v in numbers(row).items() if k != "step"}, step)
            self.last_step = step

    def growth(self, rows: list[dict]) -> None:
        for row in rows:
            step = int(row["step"])
            self._log({f"growth/{row['site']}/{k}": v for k, v in numbers(row).items() if k != "step"}, step)

    def plots(self, images: dict[str, bytes]) -> None:
        with png_files(images) as paths:
            for path in paths.values():
                self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def finish(self, summary: dict) -> None:
        step = max(self.last_step, int(summary.get("step", 0)))
        final = summary_numbers(summary)
        if summary.get("status") != "completed":  # after the last checkpoint: a resumed run logs these again
            self.pending = []
        self._log({f"summary/{k}": v for k, v in final.items()}, step)
        self.checkpointed(step)
        for name in ("metrics.csv", "growth.csv", "summary.json"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, status=STATUS.get(summary.get("status"), "FAILED"))

    def close(self) -> None:
        pass
