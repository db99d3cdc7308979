"""Run-directory naming and sweep bookkeeping for Hydra.

- `${growrun_uid:}` resolves to a short random id, fixed for this process and inherited by
  its children (env GROWRUN_UID), appended to run/sweep directory names so that runs and sweeps
  started in the same second never share a directory. Jobs of one sweep get their own
  subdirectories (hydra.sweep.subdir = job number).
- SweepStatusCallback records the sweep directory so that the CLI can list, at the end of a
  multirun, the runs that failed (their summary.json status) and exit non-zero.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

UID_ENV = "GROWRUN_UID"
_last_sweep_dir: list[Path] = []


def run_uid() -> str:
    if UID_ENV not in os.environ:
        os.environ[UID_ENV] = secrets.token_hex(3)
    return os.environ[UID_ENV]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("growrun_uid"):
        OmegaConf.register_new_resolver("growrun_uid", run_uid)


class SweepStatusCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _last_sweep_dir.append(Path(str(config.hydra.sweep.dir)))


def last_sweep_dir() -> Path | None:
    return _last_sweep_dir[-1] if _last_sweep_dir else None


def run_status(run_dir: Path) -> str:
    """completed | failed | interrupted | running-or-crashed (no summary.json)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "incomplete"


def sweep_runs(sweep_dir: Path) -> list[Path]:
    """Run directories of a sweep (those holding a .hydra/ folder), in job order."""
    runs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()] if sweep_dir.is_dir() else []
    return sorted(runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
