"""Find the runs to report on and read what each one wrote.

A path given to `growrun report` may be
    - a run directory (it holds `.hydra/`),
    - a sweep directory (its subdirectories are runs; growrun.rundirs.sweep_runs),
    - a directory of sweeps or runs (e.g. outputs/multirun): every run or sweep one level down.

Each run is read into a Run: composed config (.hydra/config.yaml), overrides
(.hydra/overrides.yaml), metrics.csv, growth.csv (absent when growth.method=none) and
summary.json (absent while running or after a crash). A run is *ok* only if its status is
`completed` and its metrics are readable and end with a test accuracy; every other run keeps
the reason it cannot be used, so that the report lists it instead of dropping it.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from growrun.errors import GrowrunError
from growrun.rundirs import run_status, sweep_runs


@dataclass
class Run:
    path: Path
    name: str = ""  # shown in the report: the path relative to the runs' common parent
    status: str = "incomplete"
    reason: str | None = None  # why the run cannot be used (None: ok)
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    metrics: list[dict[str, float | None]] = field(default_factory=list)
    growth: list[dict[str, object]] | None = None  # None: no growth.csv
    summary: dict | None = None
    budget: dict | None = None  # budget.json of a run with a compute budget (growrun.train.budget)

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def method(self) -> str:
        """growth.method of the run's config ("none": a fixed network)."""
        return str((self.config.get("growth") or {}).get("method", "none"))


def is_equal_compute(run: Run) -> bool:
    """A fixed network trained for a given compute (growth.method=none with a budget.json)."""
    return run.method == "none" and run.budget is not None


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Every run directory under the given paths (see the module docstring), without repeats."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise GrowrunError(f"{path}: no such directory; give a run directory, a sweep directory "
                               "or a directory of sweeps")
        if not path.is_dir():
            raise GrowrunError(f"{path}: not a directory; give a run directory, a sweep directory "
                               "or a directory of sweeps")
        runs = _runs_in(path)
        if not runs:
            raise GrowrunError(f"{path}: no growrun runs found (a run directory holds .hydra/; a sweep "
                               "directory holds run directories)")
        found += runs
    unique: dict[Path, Path] = {}
    for run in found:
        unique.setdefault(run.resolve(), run)
    return list(unique.values())


def _runs_in(path: Path) -> list[Path]:
    if (path / ".hydra").is_dir():
        return [path]
    runs = sweep_runs(path)
    if runs:
        return runs
    nested: list[Path] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        nested += sweep_runs(child)
    return nested


def load_runs(paths: list[Path]) -> list[Run]:
    dirs = find_run_dirs(paths)
    names = _display_names(dirs)
    return [read_run(d, name) for d, name in zip(dirs, names)]


def _display_names(dirs: list[Path]) -> list[str]:
    if len(dirs) == 1:
        return [dirs[0].resolve().name]
    resolved = [d.resolve() for d in dirs]
    common = Path(os.path.commonpath(resolved))
    return [str(d.relative_to(common)) or d.name for d in resolved]


def read_run(path: Path, name: str = "") -> Run:
    run = Run(path=path, name=name or path.name, status=run_status(path))
    problems: list[str] = []
    try:
        run.summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        run.summary = None
    try:
        run.config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text()) or {}
        run.overrides = [str(o) for o in (yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or [])]
    except (OSError, yaml.YAMLError) as ex:
        problems.append(f"unreadable .hydra config ({_short(ex)})")
    try:
        run.metrics = [{k: _number(v) for k, v in row.items()} for row in _read_csv(path / "metrics.csv")]
    except (OSError, ValueError, csv.Error) as ex:
        problems.append(f"unreadable metrics.csv ({_short(ex)})")
    try:
        run.budget = json.loads((path / "budget.json").read_text())
    except FileNotFoundError:
        run.budget = None
    except (OSError, ValueError) as ex:
        problems.append(f"unreadable budget.json ({_short(ex)})")
    growth_csv = path / "growth.csv"
    if growth_csv.exists():
        try:
            run.growth = [_growth_row(row) for row in _read_csv(growth_csv)]
        except (OSError, ValueError, csv.Error) as ex:
            problems.append(f"unreadable growth.csv ({_short(ex)})")
    run.reason = _reason(run, problems)
    return run


def _reason(run: Run, problems: list[str]) -> str | None:
    if run.status != "completed":
        if run.status == "incomplete":
            what = "incomplete: no readable summary.json (still running, or killed)"
        else:
            what = run.status
        error = (run.summary or {}).get("error")
        return f"{what}: {error}" if error else what
    if problems:
        return "; ".join(problems)
    if not run.metrics:
        return "metrics.csv has no rows"
    last = run.metrics[-1]
    if last.get("test_acc") is None:
        return "the last metrics.csv row has no test_acc"
    done = (run.summary or {}).get("epochs_done")
    if done is not None and last.get("epoch") is not None and int(last["epoch"]) != int(done):
        return f"metrics.csv ends at epoch {int(last['epoch'])} but summary.json says {done} epochs done"
    if run.method != "none" and run.growth is None:
        return f"growth.csv missing (growth.method={run.method})"
    return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, strict=True))
    for i, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"line {i} does not match the header")
    return rows


def _number(text: str) -> float | None:
    """A CSV cell as a float; empty cells (e.g. no evaluation that epoch) are None."""
    if text == "":
        return None
    value = float(text)
    return None if math.isnan(value) else value


GROWTH_TEXT_COLUMNS = ("site", "method", "reason", "trigger", "lambdas_top")  # the other growth.csv columns are numbers


def _growth_row(row: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, text in row.items():
        if key in GROWTH_TEXT_COLUMNS:
            out[key] = text
        else:
            out[key] = _number(text)
    return out


def _short(ex: Exception) -> str:
    text = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {text[0]}" if text else type(ex).__name__
