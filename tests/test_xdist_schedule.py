"""The suite's xdist schedule (tests/helpers_xdist.py), on simulated workers: each test runs exactly
once, the workers end together where `load` leaves one alone with its chunk, and steals that
arrive too late (the worker started a test meanwhile) are asked again."""
from __future__ import annotations

import pytest

pytest.importorskip("xdist.scheduler")
from helpers_xdist import LoadThenSteal  # noqa: E402

SHUTDOWN = "shutdown"


class Config:
    def __init__(self, workers: int):
        self.workers = workers

    def getvalue(self, name):
        return {"tx": [f"{self.workers}*popen"]}[name]

    def getoption(self, name):
        return {"maxschedchunk": None}[name]


class Worker:
    """A worker as xdist's remote runs it: it runs a test only once it holds the next one (or the
    shutdown), so two of its tests are outside its queue; a steal takes all the asked tests
    from the queue or none."""

    def __init__(self, name: str):
        self.name, self.queue, self.shutting_down = name, [], False
        self.gateway = type("Gateway", (), {"id": name})
        self.running = self.next = None
        self.ends_at = 0.0
        self.ran, self.steal_asked = [], None

    def send_runtest_some(self, indices):
        assert not self.shutting_down, "tests sent after the shutdown"
        self.queue.extend(indices)

    def shutdown(self):
        self.shutting_down = True
        self.queue.append(SHUTDOWN)

    def send_steal(self, indices):
        assert self.steal_asked is None
        self.steal_asked = list(indices)


def simulate(scheduler_class, durations: list[float], workers: int = 2, late_steals: int = 0):
    """Run the collection on simulated workers; return {worker: (tests run, end time)}.
    The first `late_steals` steals are answered after the worker has taken a test from its queue."""
    sched = scheduler_class(Config(workers))
    nodes = [Worker(f"gw{i}") for i in range(workers)]
    collection = [f"test_{i}" for i in range(len(durations))]
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        sched.add_node_collection(node, collection)
    sched.schedule()
    now = 0.0

    def answer_steals():
        nonlocal late_steals
        for node in nodes:
            if node.steal_asked is not None:
                asked, node.steal_asked = node.steal_asked, None
                if late_steals:  # the worker took one of them meanwhile: it gives none
                    late_steals -= 1
                    sched.remove_pending_tests_from_node(node, [])
                elif all(i in node.queue for i in asked):
                    node.queue = [i for i in node.queue if i not in asked]
                    sched.remove_pending_tests_from_node(node, asked)
                else:
                    sched.remove_pending_tests_from_node(node, [])

    def start_what_can_start():
        for node in nodes:
            if node.next is None and node.queue:
                node.next = node.queue.pop(0)
            if node.running is None and node.next not in (None, SHUTDOWN) and node.queue:
                node.running, node.next = node.next, node.queue.pop(0)
                node.ends_at = now + durations[node.running]

    for _ in range(10 * len(durations) + 100):
        answer_steals()
        start_what_can_start()
        busy = [node for node in nodes if node.running is not None]
        if not busy:
            break
        node = min(busy, key=lambda n: n.ends_at)
        now = node.ends_at
        node.ran.append(node.running)
        done, node.running = node.running, None
        if node.next is SHUTDOWN:
            node.next = None
        sched.mark_test_complete(node, done, durations[done])
    for node in nodes:  # a worker ends when it holds the shutdown and nothing else
        assert node.running is None and node.next in (None, SHUTDOWN), f"{node.name} still holds {node.next}"
    assert sched.tests_finished
    return {node.name: (node.ran, node.ends_at) for node in nodes}


def slow_head(n: int = 200) -> list[float]:
    """A run of long tests, then short ones: `load`'s first chunk (an eighth of the collection per
    worker) gives the long ones to the first worker, the second runs through all the short ones."""
    return [2.0] * (n // 8) + [0.1] * (n - n // 8)


def test_every_test_runs_exactly_once():
    for durations in (slow_head(), [0.5] * 7, [0.1, 5.0] * 40, [1.0] * 3):
        for workers in (2, 3):
            ran = [i for tests, _ in simulate(LoadThenSteal, durations, workers).values() for i in tests]
            assert sorted(ran) == list(range(len(durations)))


def test_workers_end_together_where_load_leaves_one_alone():
    from xdist.scheduler import LoadScheduling

    durations = slow_head()
    ends = {cls: [end for _, end in simulate(cls, durations).values()]
            for cls in (LoadScheduling, LoadThenSteal)}
    load, steal = ends[LoadScheduling], ends[LoadThenSteal]
    assert max(load) - min(load) > 10  # the case: `load`'s last chunk keeps the long tests on one worker
    assert max(steal) - min(steal) <= max(durations)  # the other worker took half of them
    assert max(steal) < max(load) - 5


def test_a_steal_answered_too_late_is_asked_again():
    durations = slow_head()
    result = simulate(LoadThenSteal, durations, late_steals=2)
    ran = sorted(i for tests, _ in result.values() for i in tests)
    assert ran == list(range(len(durations)))
    ends = [end for _, end in result.values()]
    assert max(ends) - min(ends) <= max(durations)
