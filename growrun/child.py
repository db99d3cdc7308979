"""Run a child process that the signals sent to this one reach.

`growrun resume` trains in a child process (`growrun train ... resume=true`). With
subprocess.call, SIGTERM ended the parent and left the child training on, orphaned, still
writing into the run directory. Inside `SignalForwarder`, SIGTERM, SIGINT, SIGHUP and the
preemption signal (SIGUSR2) sent to this process are passed on to the running child, which
stops as a signalled run does (a checkpoint, status `interrupted`, a non-zero exit), and this
process waits for it:

    with SignalForwarder() as signals:
        status = signals.run(command)       # 128 + N when signal N ended the child
        if signals.received: ...            # stop here, start nothing more

The child runs in its own process group: a Ctrl-C in a terminal (SIGINT to the whole
foreground group) then reaches it once, forwarded, instead of twice (for a run, a second
signal means "exit at once", without the checkpoint). A consequence: Ctrl-Z stops this
process only, not the child.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from growrun.train.safety import PREEMPT_SIGNAL

FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
if PREEMPT_SIGNAL is not None and PREEMPT_SIGNAL not in FORWARDED:  # a scheduler's warning (SIGUSR2)
    FORWARDED += (PREEMPT_SIGNAL,)


class SignalForwarder:
    """A context manager: while active, the FORWARDED signals to this process are recorded in
    `received` and sent on to the child that `run` is waiting for; on exit the previous
    handlers are restored."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._sent = 0  # how many of `received` were sent to the child
        self._child: subprocess.Popen | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "SignalForwarder":
        for signum in FORWARDED:
            self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    def run(self, command: list[str]) -> int:
        """Start `command` in its own process group, pass on the signals received from now on
        (and any that arrived while it started), wait for it: its exit status, 128 + N when
        signal N killed it. Once a signal was received nothing more starts: 128 + N at once."""
        if self.received:
            return 128 + self.received[0]
        self._child = subprocess.Popen(command, **_own_process_group())
        try:
            self._forward()
            code = self._child.wait()
        finally:
            self._child = None
        return 128 - code if code < 0 else code

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        self._forward()

    def _forward(self) -> None:
        """Send the child every received signal it has not been sent yet. Runs in the signal
        handler too: send_signal does not block while wait() holds the child."""
        child = self._child
        while child is not None and self._sent < len(self.received):
            signum = self.received[self._sent]
            self._sent += 1
            child.send_signal(signum)


def _own_process_group() -> dict:
    """Popen arguments that start the child as the leader of a new process group."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # noqa: PLW1509 (no threads run in the parent at this point)


def signal_exit(code: int) -> bool:
    """Whether a child's exit status says that one of the FORWARDED signals ended it (killed, or
    the 128 + N of a run that stopped on the signal)."""
    return code - 128 in FORWARDED
