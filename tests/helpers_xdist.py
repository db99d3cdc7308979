"""pytest-xdist's `load` schedule with a work-stealing end (conftest's pytest_xdist_make_scheduler).

`load` hands the workers chunks of the collection in order; once no test is left to hand out, it
shuts every worker down as soon as that worker reports, and a worker keeps the rest of its last
chunk even when the others have nothing left to do (measured: one of two workers ended 18-25 s
before the other). Here a worker that runs out of tests takes half of the queued tail of the
busiest worker instead (xdist's `steal` command, as in `--dist worksteal`); a worker is shut down
only when nothing is left to take. Until that end the schedule is `load`'s, so the workers run
the same tests side by side as before.

A worker holds two of its tests outside its queue (the one it runs and the next, which pytest
needs for teardown), so only the tests after those can be taken; a steal is all or nothing, and
an empty answer (the worker took one of them meanwhile) makes the scheduler ask again.
"""
from __future__ import annotations

from xdist.scheduler import LoadScheduling

HELD = 2  # the running test and the next one: not in the worker's queue


class LoadThenSteal(LoadScheduling):
    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.stealing_from = None  # the worker asked for tests, until it answers
        self.ending = False  # every test has been handed out once

    def check_schedule(self, node, duration: float = 0) -> None:
        if node.shutting_down:
            return
        if self.pending and not self.ending:
            super().check_schedule(node, duration)  # `load`'s chunks while any are left
            return
        self.ending = True
        self._end_game()

    def _end_game(self) -> None:
        up = {node: pending for node, pending in self.node2pending.items() if not node.shutting_down}
        idle = [node for node, pending in up.items() if len(pending) < HELD]
        if not idle:
            return
        if self.pending:  # tests taken from a busy worker (or a crashed one's): share them among the idle
            share = -(-len(self.pending) // len(idle))
            for node in idle:
                self._send_tests(node, share)
            return
        if self.stealing_from is not None:
            return
        victim = max(up, key=lambda node: len(up[node]))
        take = (len(up[victim]) - HELD) // 2
        if take > 0:  # (then the victim holds >= 4 tests: it is not idle)
            victim.send_steal(up[victim][-take:])
            self.stealing_from = victim
            return
        for node in idle:
            node.shutdown()

    def remove_pending_tests_from_node(self, node, indices) -> None:
        """The answer to a steal: the tests the worker gave up (none if it had started one)."""
        self.stealing_from = None
        taken = set(indices)
        self.node2pending[node] = [i for i in self.node2pending[node] if i not in taken]
        self.pending.extend(indices)
        self._end_game()

    def remove_node(self, node):
        if self.stealing_from is node:
            self.stealing_from = None
        return super().remove_node(node)
