"""Run-directory naming and sweep bookkeeping for Hydra.

- `${growrun_uid:}` resolves to a short random id, fixed for this process and inherited by
  its children (env GROWRUN_UID), appended to run/sweep directory names so that runs and sweeps
  started in the same second never share a directory. Jobs of one sweep get their own
  subdirectories (hydra.sweep.subdir = job number).
- SweepStatusCallback records the sweep directory so that the CLI can list, at the end of a
  multirun, the runs that failed (their summary.json status) and exit non-zero.
- Re-running a sweep (the same `growrun train -m ... resume=true` into its hydra.sweep.dir, or
  `growrun resume SWEEP_DIR`): `job_state` says what happens to each job, the same for every
  launcher: a finished job (completed, diverged) is skipped, a job with a checkpoint resumes
  from it, any other starts (over). `sweep_jobs` lists each job's overrides in Hydra's job order
  (BasicSweeper), so that a job never started can be started and a job directory that holds
  another configuration's run is refused (`check_same_job`) before anything is written.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from growrun.errors import GrowrunError
from growrun.rundirs import job_order, job_started, read_summary, sweep_runs

UID_ENV = "GROWRUN_UID"
FINISHED = ("completed", "diverged")  # a re-run sweep skips these jobs
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


def job_state(run_dir: Path) -> tuple[str, str]:
    """What a re-run sweep does with the job of run_dir: ("skip" | "resume" | "start", what the
    directory holds), e.g. ("resume", "interrupted after 3/20 epochs")."""
    from growrun.train.outputs import has_checkpoint

    if not job_started(run_dir):
        return "start", "not started"
    summary = read_summary(run_dir)
    status = summary.get("status", "unknown")
    if status in FINISHED:
        return "skip", status
    if has_checkpoint(run_dir / "checkpoints" / "last.pt"):
        done = f" after {summary['epochs_done']}/{summary['epochs']} epochs" if "epochs_done" in summary else ""
        return "resume", status + done
    return "start", f"{status}, no checkpoint"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The task overrides of each job of `growrun train -m OVERRIDES`, in Hydra's job order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = [o for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_hydra_override()]
    return BasicSweeper.split_arguments(parsed, None)[0]


def swept_keys(overrides: list[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.get_key_element() for o in OverridesParser.create().parse_overrides(list(overrides))
            if o.is_sweep_override() and not o.is_hydra_override()}


def stored_overrides(run_dir: Path) -> list[str]:
    return [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]


def recorded_jobs(sweep_dir: Path) -> list[tuple[Path, list[str]]]:
    """(run dir, overrides) of every job of a sweep: the jobs of its multirun.yaml (those never
    started included) and any other run directory in it, in job order."""
    jobs: dict[Path, list[str]] = {}
    task = _multirun_task(sweep_dir / "multirun.yaml")
    if task is not None:
        jobs = {sweep_dir / str(i): job for i, job in enumerate(sweep_jobs(task))}
    for run_dir in sweep_runs(sweep_dir):
        jobs[run_dir] = stored_overrides(run_dir)
    return sorted(jobs.items(), key=lambda item: job_order(item[0]))


def _multirun_task(path: Path) -> list[str] | None:
    """The sweep's task overrides from its multirun.yaml; None when it is missing or unreadable
    (Hydra writes it before the first job: a sweep killed at that instant started no job)."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    try:
        return [str(o) for o in OmegaConf.load(path).hydra.overrides.task]
    except (OSError, yaml.YAMLError, OmegaConfBaseException, TypeError):  # missing, truncated, not Hydra's
        return None


def rerun_plan(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """One line per job of `growrun train -m OVERRIDES` (cfg: its first job's config) into a
    sweep directory that already holds runs: what it does with the job (skip, resume, start);
    GrowrunError for a job directory that holds a run of other overrides. [] for a new sweep."""
    sweep = OmegaConf.select(cfg, "hydra.sweep.dir", throw_on_resolution_failure=False)
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
    if not isinstance(sweep, str) or subdir != "${hydra.job.num}" or not sweep_runs(Path(sweep)):
        return []
    sweep_dir, jobs, swept = Path(sweep), sweep_jobs(overrides), swept_keys(overrides)
    lines = []
    for i, job in enumerate(jobs):
        run_dir = sweep_dir / str(i)
        if job_started(run_dir):
            check_same_job(sweep_dir, run_dir, job)
        action, held = job_state(run_dir)
        label = " ".join(o for o in job if o.split("=", 1)[0] in swept)
        doing = {"skip": "skipped", "resume": "resuming from its checkpoint", "start": "starting"}[action]
        lines.append(f"job {i}{' (' + label + ')' if label else ''}: {held}, {doing}")
    return lines


def check_same_job(sweep_dir: Path, run_dir: Path, overrides: list[str]) -> None:
    """Refuse (GrowrunError) a job whose directory holds a run of other overrides (apart from
    the keys a resumed run may change): the sweep command is not the one that made the sweep."""
    old, new = _settings(stored_overrides(run_dir)), _settings(overrides)
    if old != new:
        diff = ", ".join(f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        raise GrowrunError(f"hydra.sweep.dir={sweep_dir}: job {run_dir.name} holds a run of other overrides ({diff}); "
                           "re-run the sweep with its own values, or choose another hydra.sweep.dir")


def _settings(overrides: list[str]) -> dict[str, str]:
    """{key: value} of an override list, without the keys a resumed run may change."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from growrun.train.safety import RESUMABLE_CHANGES

    settings = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element().lstrip("+~")
        if key not in RESUMABLE_CHANGES:
            settings[key] = "(deleted)" if o.is_delete() else o.get_value_element_as_str()
    return settings
