"""Fault injection for the crash tests (tests/test_faults.py), off unless the environment asks.

GROWRUN_KILL_AT=POINT[:N] makes the process kill itself with SIGKILL the N-th time (default 1)
it reaches POINT, as a crash of the machine or an OOM kill would, at a moment a test can name:

    step      after an optimizer step (and the growth event due at it, if any)
    stats     in a growth event, after the statistics pass, before any neuron is added
    search    in a growth event, after a site's line search, before its neurons are inserted
    write:F   in the replacement of file F (e.g. write:last.pt), after the temporary file is
              written, before any rename
    rotate    in a checkpoint replacement, after last.pt became prev.pt, before the new last.pt
"""
from __future__ import annotations

import os
import signal

ENV = "GROWRUN_KILL_AT"
_counts: dict[str, int] = {}


def reach(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.rpartition(":")
    if not nth.isdigit():
        name, nth = spec, "1"
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
