"""What a job needs from the Hydra launcher that runs it (presets in configs/hydra/launcher/).

    hydra/launcher=basic        Hydra's default: the jobs one after another, in this process
    hydra/launcher=parallel     n_jobs jobs at a time on this machine (hydra-joblib-launcher)
    hydra/launcher=slurm        every job a task of a SLURM job array (hydra-submitit-launcher)
    hydra/launcher=slurm_local  the same submitit machinery in local processes (a SLURM dry run)

Threads: trainer.threads=0 (the default, torch's choice) in a job of `parallel` becomes
cores // n_jobs, and in a submitit job hydra.launcher.cpus_per_task, so that jobs x threads
never exceeds the cores. An explicit trainer.threads is kept.

Preemption (submitit): the scheduler's warning signal (SIGUSR2, `#SBATCH --signal=USR2@
signal_delay_s`: before the time limit, and at a preemption where the cluster sends it) stops
the run after its step with a checkpoint, status `interrupted` (growrun.train.safety); the
signal is then handed to submitit's own handler, which requeues the job (`scontrol requeue`; in
local mode the job restarts at once). The requeued job is the same job run again: it finds the
checkpoint of its interrupted run in its run directory and continues from it (`resume_requeued`;
a job SLURM requeues by itself, e.g. after a node failure, likewise). No other job can find a
checkpoint there without resume=true, since the command line refuses a sweep directory that
holds runs. SIGTERM or SIGINT to a submitit job (scancel) ends it as `interrupted`; its result
says so and the sweep's other jobs go on.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from growrun.errors import GrowrunError
from growrun.train.safety import PREEMPT_SIGNAL

log = logging.getLogger("growrun")
REQUEUED = ("interrupted", "incomplete")  # the run of a job that submitit or SLURM requeues


def launcher_kind(hydra_cfg: DictConfig) -> str:
    """basic | joblib | submitit: the kind of launcher running this job."""
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    name = target.rsplit(".", 1)[-1]
    if name in ("SlurmLauncher", "LocalLauncher"):
        return "submitit"
    return "joblib" if name == "JoblibLauncher" else "basic"


def check_launcher(cfg: DictConfig) -> None:
    """Refuse (one line) a SLURM sweep where SLURM's commands are missing."""
    if str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")).endswith(".SlurmLauncher") \
            and not (shutil.which("sbatch") and shutil.which("srun")):
        raise GrowrunError("hydra/launcher=slurm: sbatch/srun not found, this is not a SLURM machine; "
                           "hydra/launcher=slurm_local runs the same jobs here")


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_jobs(n_jobs: int) -> int:
    """How many jobs joblib runs at once for n_jobs (-1: all CPUs, -2: all but one, ...)."""
    return max(1, n_jobs if n_jobs > 0 else cores() + 1 + n_jobs)


def set_job_threads(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """trainer.threads=0 under a parallel or submitit launcher: the job's share of the cores."""
    kind, launcher = launcher_kind(hydra_cfg), hydra_cfg.launcher
    if kind == "joblib":
        jobs = parallel_jobs(int(launcher.n_jobs))
        if cfg.trainer.threads == 0:
            cfg.trainer.threads = max(1, cores() // jobs)
            log.info("trainer.threads=%d: %d cores / %d parallel jobs", cfg.trainer.threads, cores(), jobs)
        elif cfg.trainer.threads * jobs > cores():
            log.warning("trainer.threads=%d x %d parallel jobs > %d cores: the jobs will slow each other down",
                        cfg.trainer.threads, jobs, cores())
    elif kind == "submitit" and cfg.trainer.threads == 0 and launcher.get("cpus_per_task"):
        cfg.trainer.threads = int(launcher.cpus_per_task)
        log.info("trainer.threads=%d: hydra.launcher.cpus_per_task", cfg.trainer.threads)


def resume_requeued(cfg: DictConfig, hydra_cfg: DictConfig, run_dir: Path) -> None:
    """A submitit job whose run directory holds the checkpoint of its interrupted (or killed) run
    was requeued: set resume=true, so that it continues from the checkpoint."""
    from growrun.rundirs import run_status
    from growrun.train.outputs import has_checkpoint

    if cfg.resume or launcher_kind(hydra_cfg) != "submitit" or run_status(run_dir) not in REQUEUED:
        return
    if has_checkpoint(run_dir / "checkpoints" / "last.pt"):
        cfg.resume = True
        log.warning("job requeued: %s holds its checkpoint (status %s); resuming from it", run_dir, run_status(run_dir))


def requeue_if_preempted(signum: int) -> None:
    """In a submitit job stopped by the preemption signal (its checkpoint written): call
    submitit's handler for it, which StopSignals restored, so that submitit requeues the job
    (and exits). Anything else returns."""
    handler = signal.getsignal(signum) if signum == PREEMPT_SIGNAL else None
    if callable(handler):
        log.warning("%s: checkpoint written; submitit requeues the job, which then resumes from it",
                    signal.Signals(signum).name)
        handler(signum, None)
