"""Where a command line's run (or sweep) will write, checked before Hydra creates anything.

Hydra creates the run directory and writes .hydra/ (config.yaml, overrides.yaml) before the run
starts, so two faults used to leave damage or a traceback:

- a run directory that already holds another run: its .hydra/overrides.yaml was replaced by
  the new command's (then `growrun resume` would continue the old run with the new config),
  although the run itself then refused to start;
- an output directory that cannot be created (a parent is a file, or not writable): a
  NotADirectoryError / PermissionError traceback from Hydra.

`check_output_dir` refuses both with one line. A directory Hydra names from the clock
(`${now:...}`) is checked for writability at its fixed part (e.g. outputs/runs/).
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from growrun.errors import GrowrunError
from growrun.rundirs import run_status, sweep_runs

# What a run writes once it trains: a directory with none of these (a run that failed before
# training, e.g. on a missing data file: .hydra/, summary.json "failed") may be reused.
RUN_FILES = ("metrics.csv", "growth.csv", "checkpoints")


def check_output_dir(cfg: DictConfig, multirun: bool) -> None:
    """Raise GrowrunError if the run (sweep) directory of the composed cfg cannot be written, or
    already holds a run (sweep) and cfg.resume is false."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path, fixed = _output_path(cfg, key)
    if path is None:
        return
    _check_writable(key, path)
    if not fixed or cfg.resume:
        return
    if multirun:
        _check_no_sweep(key, path)
    elif holds_run(path):
        raise GrowrunError(f"{key}={path}: already holds a run ({_status(path)}); add resume=true to continue it, "
                           f"or choose another {key}")


def holds_run(path: Path) -> bool:
    """Whether `path` is a directory with the training outputs of a growrun run in it."""
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def _output_path(cfg: DictConfig, key: str) -> tuple[Path | None, bool]:
    """(the directory, True) when `key` resolves; else (its part before the first
    interpolation, False), e.g. outputs/runs for outputs/runs/${now:...}_${growrun_uid:}."""
    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    if isinstance(value, str) and value:
        return Path(value), True
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False)
    raw = OmegaConf.to_container(node, resolve=False).get(name) if isinstance(node, DictConfig) else None
    if not isinstance(raw, str):
        return None, False
    fixed = raw.split("${", 1)[0]
    return Path(fixed.rpartition("/")[0] or "."), False


def _check_writable(key: str, path: Path) -> None:
    """The nearest existing directory on the way to `path` must be a writable directory."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise GrowrunError(f"{key}={path}: cannot create it, {existing} is a file, not a directory; choose another "
                           f"{key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GrowrunError(f"{key}={path}: cannot write into {existing} (permission denied); choose a writable "
                           f"{key}")


def _check_no_sweep(key: str, path: Path) -> None:
    runs = [r for r in sweep_runs(path) if holds_run(r)]
    if runs:
        raise GrowrunError(f"{key}={path}: already holds a sweep ({len(runs)} runs); `growrun resume {path}` "
                           f"continues it, or choose another {key}")


def _status(path: Path) -> str:
    return f"status {run_status(path)}"
