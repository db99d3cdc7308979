"""What keeps a run safe from its surroundings: the run-directory lock, stop signals, and the
check that a resumed run continues the configuration it was started with."""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from growrun.errors import GrowrunError

log = logging.getLogger("growrun")
LOCK_FILE = ".lock"
# keys a resumed run may change: the run's length and how it is run, not what it computes
RESUMABLE_CHANGES = ("resume", "trainer.epochs", "growth.extra_epochs", "trainer.progress", "trainer.threads",
                     "trainer.checkpoint", "trainer.checkpoint_every", "trainer.checkpoint_minutes",
                     "trainer.deterministic", "dataset.root", "dataset.verify", "device", "logger")


class RunLock:
    """An exclusive flock on <run dir>/.lock for as long as a process trains in the directory;
    the kernel releases it when the process ends, however it ends (no stale locks)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GrowrunError(f"{self.path.parent} is being trained by another growrun process (pid {owner}); "
                               "wait for it to end or stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (harmless, reused next time)
            self.fd = None


def _preemption_signal() -> int | None:
    """The signal a scheduler sends before it preempts a job or its time runs out: submitit's
    convention, SIGUSR2 unless $SUBMITIT_PREEMPT_SIGNAL names another (`#SBATCH --signal`);
    None where the platform has no such signal."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


PREEMPT_SIGNAL = _preemption_signal()


class StopSignals:
    """SIGTERM / SIGINT / the preemption signal (PREEMPT_SIGNAL, SIGUSR2): the first one asks
    the run to stop after the current step (it then writes a checkpoint and ends with status
    "interrupted"); a second one ends the process at once (the last complete checkpoint stays),
    except SIGTERM and the preemption signal after each other, which SLURM sends together around
    a preemption: the run still stops after its step, with the preemption signal as the reason
    (under submitit, growrun.launch then has the job requeued). Active only in the main thread."""

    SIGNALS = tuple(dict.fromkeys(s for s in (signal.SIGTERM, signal.SIGINT, PREEMPT_SIGNAL) if s is not None))

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and {signum, self.received} == {signal.SIGTERM, PREEMPT_SIGNAL}:
            log.warning("%s after %s: still stopping after the current step", name,
                        signal.Signals(self.received).name)
            self.received = PREEMPT_SIGNAL
            return
        if self.received is not None:
            log.warning("second %s: stopping now", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("%s received: finishing the current step, then writing a checkpoint and stopping "
                    "(send it again to stop at once)", name)


def config_differences(stored: dict, current: dict) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between the checkpoint's
    config and the current one, except RESUMABLE_CHANGES. A key the checkpoint's growrun did
    not have yet is no difference while it keeps its schema default (new keys default to the
    behaviour from before they existed)."""
    from growrun.config.validate import upgrade_config

    a, b = _flatten(upgrade_config(stored)), _flatten(current)
    missing = object()
    defaults = _schema_defaults()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or key.startswith(tuple(k + "." for k in RESUMABLE_CHANGES)):
            continue
        old, new = a.get(key, missing), b.get(key, missing)
        if old is missing and key in defaults and new == defaults[key]:
            continue
        if old != new:
            diffs.append(f"{key}: {_show(old, missing)} -> {_show(new, missing)}")
    return diffs


def check_resume_config(stored: dict, current: dict, path: Path) -> None:
    diffs = config_differences(stored, current)
    if diffs:
        raise GrowrunError(f"resume: the config differs from the one {path} was trained with ({'; '.join(diffs)}); "
                           f"only {', '.join(RESUMABLE_CHANGES[1:])} may change; start a new run directory instead")


def _schema_defaults() -> dict[str, Any]:
    from omegaconf import OmegaConf

    from growrun.config.schema import TrainConfig
    return _flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def _show(value: Any, missing: object) -> str:
    return "(absent)" if value is missing else repr(value)
