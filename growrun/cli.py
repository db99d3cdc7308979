"""The `growrun` command: train (Hydra app), resume, report.

    growrun train [hydra flags] [overrides]    one run, or a sweep with -m
    growrun resume DIR [overrides]             continue a run (or every unfinished run of a sweep)
    growrun report DIR [DIR ...] [--out OUT]   comparison table and plots

User-facing failures print one line `growrun: error: ...` and exit with status 2.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from growrun.child import SignalForwarder, signal_exit
from growrun.errors import GrowrunError

log = logging.getLogger("growrun")

USAGE = """usage: growrun COMMAND [ARGS]

commands:
  train [OVERRIDES]      train one run (or a sweep with -m); `growrun train --help` lists the config
  resume DIR [OVERRIDES] continue the run in DIR, or every unfinished run of the sweep in DIR
  report DIR [DIR ...]   comparison table and plots of a sweep (or of several runs or sweeps)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    handlers = {"train": train, "resume": resume, "report": report}
    if command not in handlers:
        return _fail(f"unknown command {command!r}; choose one of {', '.join(handlers)}")
    try:
        return handlers[command](rest)
    except GrowrunError as ex:
        return _fail(str(ex))
    except KeyboardInterrupt as ex:  # growrun.errors.Interrupted: a signal; the run wrote its checkpoint
        print("growrun: interrupted", file=sys.stderr)
        return 128 + getattr(ex, "signum", 2)


def _fail(message: str) -> int:
    print(f"growrun: error: {message}", file=sys.stderr)
    return 2


def train(rest: list[str]) -> int:
    """Run the Hydra app after checking every run's config (see growrun.config.precheck)."""
    from hydra._internal.utils import _run_hydra, get_args_parser

    from growrun.config import store  # noqa: F401  (registers the schema)
    from growrun.config.precheck import CONFIG_MODULE, CONFIG_NAME, precheck
    from growrun.rundirs import run_status, sweep_runs
    from growrun.sweep import last_sweep_dir, register_resolvers, rerun_plan
    from growrun.train.distributed import rank_arguments

    register_resolvers()
    parser = get_args_parser()
    parser.prog = "growrun train"
    args = parser.parse_args(rest)
    rank_arguments(args)  # under torchrun: ranks other than 0 write no Hydra output of their own
    if not (args.help or args.hydra_help or args.info or args.shell_completion):
        first = precheck(args)
        if "optuna" in str(first.hydra.sweeper.get("_target_", "")) and not args.multirun:
            return _fail("hparams_search: a search is a sweep of trials; add -m (growrun train -m hparams_search=...)")
        if args.multirun and not args.cfg:
            for line in rerun_plan(first, args.overrides):  # a re-run sweep: skip, resume or start each job
                print(f"growrun: {line}", file=sys.stderr)
    _run_hydra(args=args, args_parser=parser, task_function=_task,
               config_path=CONFIG_MODULE, config_name=CONFIG_NAME)
    sweep = last_sweep_dir() if args.multirun else None
    if sweep is not None:
        bad = [(p.name, run_status(p)) for p in sweep_runs(sweep) if run_status(p) != "completed"]
        if bad:
            listed = ", ".join(f"{name} ({status})" for name, status in bad)
            return _fail(f"{len(bad)} run(s) of the sweep {sweep} did not complete: {listed}")
    return 0


def _task(cfg) -> dict:
    """Hydra's task function: one run in its own output directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from growrun.launch import launcher_kind, requeue_if_preempted, resume_requeued, set_job_threads
    from growrun.rundirs import read_summary
    from growrun.sweep import job_state

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    resume_requeued(cfg, hydra_cfg, run_dir)  # submitit requeued this job: continue its run
    if multirun and cfg.resume:
        action, held = job_state(run_dir)
        if action == "skip":  # a re-run sweep: this job has finished
            log.info("job %s: %s, skipped", hydra_cfg.job.num, held)
            return read_summary(run_dir)
    set_job_threads(cfg, hydra_cfg)
    from growrun.train.run import run  # (torch: not imported by a job that is skipped)

    try:
        return _objective(run(cfg, run_dir), cfg.optimized_metric)
    except KeyboardInterrupt as ex:  # growrun.errors.Interrupted: stopped by a signal, checkpoint written
        if launcher_kind(hydra_cfg) != "submitit":
            raise  # the signal ends the sweep
        requeue_if_preempted(getattr(ex, "signum", 0))  # SIGUSR2: submitit requeues the job and exits
        return read_summary(run_dir)  # SIGTERM / SIGINT (scancel): this job ends, the others go on
    except GrowrunError as ex:
        if multirun:
            # The sweep goes on; the run's summary.json says "failed" and the CLI lists it.
            print(f"growrun: error: [{run_dir}] {ex}", file=sys.stderr)
            return {"status": "failed", "error": str(ex)}
        sys.exit(_fail(str(ex)))


def _objective(summary: dict, metric: str | None):
    """The task's return value: the summary, or for a search (optimized_metric) the number the
    sweeper optimises (NaN when the run has none: Optuna marks the trial failed)."""
    if metric is None:
        return summary
    value = summary
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else float("nan")


def resume(rest: list[str]) -> int:
    """Re-run a run's own overrides in its directory with resume=true, in a child process that
    SIGTERM / SIGINT / SIGHUP / SIGUSR2 to this one reach (growrun.child); a run stopped by a
    signal ends the resume with its non-zero status. A sweep: each job of it (its multirun.yaml,
    so also the jobs never started) in turn, skipping the finished ones (growrun.sweep.job_state)."""
    from growrun.rundirs import job_started
    from growrun.sweep import job_state, recorded_jobs, stored_overrides

    if not rest:
        raise GrowrunError("resume needs a run or sweep directory: growrun resume DIR [OVERRIDES]")
    target, extra = Path(rest[0]), rest[1:]
    jobs = [(target, stored_overrides(target))] if job_started(target) else recorded_jobs(target)
    if not jobs:
        raise GrowrunError(f"{target}: not a growrun run or sweep directory (no .hydra/overrides.yaml inside)")
    todo = []
    for run_dir, overrides in jobs:
        action, held = job_state(run_dir)
        if action == "skip" and len(jobs) > 1:
            print(f"growrun: skipping {run_dir} ({held})", file=sys.stderr)
        else:  # a single run is always continued (e.g. a completed one with more trainer.epochs)
            todo.append((run_dir, overrides, "starting" if action == "start" else "resuming", held))
    statuses = []
    with SignalForwarder() as signals:
        for i, (run_dir, overrides, doing, held) in enumerate(todo):
            overrides = [o for o in overrides if not o.startswith(("resume=", "hydra.run.dir="))]
            command = [sys.executable, "-m", "growrun", "train", *overrides, *extra,
                       "resume=true", f"hydra.run.dir={run_dir}"]
            print(f"growrun: {doing} {run_dir} ({held})", file=sys.stderr)
            statuses.append(signals.run(command))
            if signals.received or signal_exit(statuses[-1]):
                return _interrupted(run_dir, statuses[-1], signals.received, len(todo) - i - 1)
    return next((code for code in statuses if code), 0)


def _interrupted(run_dir: Path, status: int, received: list[int], left: int) -> int:
    """A resumed run stopped by a signal: say so, resume nothing more; a non-zero status (the
    child's, else 128 + the signal)."""
    import signal

    signum = received[0] if received else status - 128
    untouched = f"; {left} more run(s) of the sweep not resumed" if left else ""
    print(f"growrun: {run_dir} interrupted by {signal.Signals(signum).name}{untouched}", file=sys.stderr)
    return status or 128 + signum


def report(rest: list[str]) -> int:
    from growrun.report.cli import report_main

    return report_main(rest)
