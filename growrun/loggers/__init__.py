"""logger=...: where a run is logged besides its CSV files (configs/logger/, LoggerConfig in
growrun/config/schema.py). metrics.csv, growth.csv and summary.json stay the record and are
always written; a backend gets each row right after it is on disk, with the values as written
there (floats as their 8-digit CSV text), so what it shows equals the files.

    check_backends(cfg.logger)                 before the run: a backend not installed is a
                                               one-line GrowrunError naming its extra
    Loggers.open(cfg, run_dir, resumed_step)   on rank 0; resumed_step: the step of the
                                               checkpoint a resumed run continues (None: a new run)
    .epoch(rows) / .growth(rows)               listeners of the metrics.csv / growth.csv CsvLog
    .checkpointed(step)                        the run wrote a checkpoint at step (a backend that
                                               cannot take values back sends them then; without
                                               checkpoints, at once)
    .finish(summary)                           summary.json's content, once, at the end; a
                                               completed run first sends the report's figures
                                               (growrun.report.run_plots; with matplotlib)
    .close()

Nothing is logged per training step: epochs and growth events only. A backend whose start fails
(a server that cannot be reached) stops the run before it trains, with one line; a backend that
fails later is warned about once and dropped, and the run and its CSV files go on. A resumed run
continues the backend's run and drops what the backend holds after the checkpoint's step, so a
step is never logged twice (each backend says how).
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from growrun.errors import GrowrunError
from growrun.files import atomic_write

log = logging.getLogger("growrun")

# logger.<key>: (module of growrun.loggers, its class, the package it needs, the pip extra)
BACKENDS = {"tensorboard": ("tensorboard", "TensorBoard", "tensorboard", "tensorboard"),
            "mlflow": ("mlflow", "MLflow", "mlflow", "mlflow"),
            "wandb": ("wandb", "WandB", "wandb", "wandb")}


IDS_FILE = "loggers.json"  # <run dir>/loggers.json: each backend's run id, so that a resumed run continues it


def read_ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_ids(run_dir: Path, ids: dict) -> None:
    atomic_write(run_dir / IDS_FILE, lambda f: f.write(json.dumps(ids, indent=1).encode()))


@contextmanager
def png_files(images: dict[str, bytes]):
    """The figures as files {file name: path} in a temporary directory, removed afterwards (for
    backends that take files: MLflow artifacts, wandb.Image)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / name for name in images}
        for name, path in paths.items():
            path.write_bytes(images[name])
        yield paths


def chosen(opts) -> list[str]:
    return [name for name in BACKENDS if getattr(opts, name, False)]


def check_backends(opts) -> None:
    """GrowrunError for the first chosen backend whose package is not installed."""
    for name in chosen(opts):
        package, extra = BACKENDS[name][2:]
        try:
            importlib.import_module(package)
        except ImportError:
            raise GrowrunError(f"logger.{name}=true: needs the {package} package, which is not installed; "
                               f"pip install 'growrun[{extra}]' (or choose another logger)") from None


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric cells of a CSV row as floats (the CSV's text read back); text cells left out."""
    out = {}
    for key, value in row.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            pass
    return out


def summary_numbers(summary: dict) -> dict[str, float]:
    """The final numbers of summary.json: the final losses and accuracies, best accuracy, size,
    compute and times."""
    keys = ("best_test_acc", "best_epoch", "params", "flops_per_image", "train_flops", "growth_flops",
            "total_seconds", "growth_seconds")
    return numbers({**summary.get("final", {}), **{k: summary[k] for k in keys if k in summary}})


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """A resolved config as {dotted key: int | float | str | bool} (None and lists as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and math.isnan(value)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class Loggers:
    """The chosen backends of one run (rank 0), each call fanned out to all of them."""

    def __init__(self, backends: list, run_dir: Path, checkpoints: bool = True):
        self.backends, self.run_dir, self.checkpoints = backends, run_dir, checkpoints

    @classmethod
    def open(cls, cfg, run_dir: Path, resumed_step: int | None, config: dict) -> "Loggers":
        backends = []
        for name in chosen(cfg.logger):
            module, cls_name = BACKENDS[name][:2]
            backend_cls = getattr(importlib.import_module(f"growrun.loggers.{module}"), cls_name)
            try:
                backends.append(backend_cls(cfg.logger, Path(run_dir), resumed_step, config))
            except GrowrunError:
                for b in backends:
                    b.close()
                raise
        return cls(backends, Path(run_dir), checkpoints=bool(cfg.trainer.checkpoint))

    def epoch(self, rows: list[dict]) -> None:
        self._each("epoch", rows)
        if not self.checkpoints:
            self._each("checkpointed", int(rows[-1]["step"]))

    def growth(self, rows: list[dict]) -> None:
        self._each("growth", rows)
        if not self.checkpoints:
            self._each("checkpointed", int(rows[-1]["step"]))

    def checkpointed(self, step: int) -> None:
        self._each("checkpointed", step)

    def finish(self, summary: dict) -> None:
        if summary.get("status") == "completed" and self.backends:
            self._plots()
        self._each("finish", summary)

    def _plots(self) -> None:
        """The figures `growrun report RUN_DIR` would draw, to each backend (`plots(images)`)."""
        from growrun.report import run_plots

        try:
            images, skipped = run_plots(self.run_dir)
        except Exception as ex:  # noqa: BLE001  (the figures are an extra: the run is done)
            log.warning("loggers: the report's figures were not drawn (%s: %s)", type(ex).__name__, ex)
            return
        if not images:
            log.info("loggers: no figure to send (%s)", "; ".join(skipped))
            return
        self._each("plots", images)

    def close(self) -> None:
        self._each("close")
        self.backends = []

    def _each(self, what: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, what)(*args)
            except Exception as ex:  # noqa: BLE001  (a logger never stops the run; the CSV files have it all)
                log.warning("logger %s failed in %s (%s: %s); it is dropped for the rest of the run (the CSV "
                            "files go on)", backend.name, what, type(ex).__name__, ex)
                self.backends.remove(backend)
                try:
                    backend.close()
                except Exception:  # noqa: BLE001
                    pass
