"""Reading run and sweep directories: a run's status (its summary.json), whether Hydra set a
job up, and a sweep's runs in job order. Files only (no Hydra, no torch), so that every layer
(config checks, compute budgets, the sweep bookkeeping of growrun/sweep.py, the report, the
launchers) reads run directories the same way without importing the layers above it."""
from __future__ import annotations

import json
from pathlib import Path


def read_summary(run_dir: Path) -> dict:
    """summary.json; {"status": "incomplete"} when it is missing or unreadable."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"status": "incomplete"}


def run_status(run_dir: Path) -> str:
    """completed | failed | diverged | interrupted | incomplete (running or crashed: no summary.json)."""
    return read_summary(run_dir).get("status", "unknown")


def job_started(run_dir: Path) -> bool:
    """Whether Hydra set the job of run_dir up: .hydra/overrides.yaml, the last file it writes
    before the task runs (log file, config.yaml, hydra.yaml, overrides.yaml). A job killed
    before that (e.g. a parallel launcher's job killed with the sweep) counts as never started,
    as does one killed between creating overrides.yaml and writing it (an empty file; a written
    one holds at least `[]`)."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    return overrides.is_file() and overrides.stat().st_size > 0


def sweep_runs(sweep_dir: Path) -> list[Path]:
    """Run directories of a sweep (the jobs Hydra set up: job_started), in job order."""
    runs = [p for p in sweep_dir.iterdir() if job_started(p)] if sweep_dir.is_dir() else []
    return sorted(runs, key=job_order)


def job_order(p: Path) -> tuple:
    """Sort key of a sweep's run directories: numbered jobs by number, then any others by name."""
    return not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name
