"""Test helpers that stop or join runs at chosen points: a KeyboardInterrupt at the n-th arrival
at a growrun.faults point, and the in-place sum across ranks that run as threads."""
from __future__ import annotations

from contextlib import contextmanager

from growrun import faults


@contextmanager
def interrupted_at(monkeypatch, point: str, nth: int):
    """Within the block, the n-th time the code reaches faults point `point` it raises
    KeyboardInterrupt (as a signal would stop it there); the other points run as usual."""
    original, calls = faults.reach, []

    def reach(name):
        calls.append(name)
        if name == point and calls.count(point) == nth:
            raise KeyboardInterrupt
        original(name)

    monkeypatch.setattr(faults, "reach", reach)
    try:
        yield
    finally:
        monkeypatch.setattr(faults, "reach", original)


def summing_reduce(slots: list, barrier, rank: int):
    """reduce(tensors) of rank `rank` among len(slots) ranks run as threads: every rank's tensors
    summed in rank order, in place, as all_reduce does (barrier: a threading.Barrier of them all)."""
    def reduce(tensors):
        slots[rank] = [t.clone() for t in tensors]
        barrier.wait()
        total = [sum(parts[1:], parts[0]) for parts in zip(*slots)]
        barrier.wait()
        for t, s in zip(tensors, total):
            t.copy_(s)
    return reduce
