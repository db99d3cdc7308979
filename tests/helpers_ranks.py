"""Data-parallel ranks of `python -m growrun ARGS` forked from the test zygote, without torchrun.

`torchrun --standalone --nproc_per_node=N -m growrun ARGS` starts an agent and N fresh
interpreters (~7 s of start-up each, most of the cost of a small two-rank test). What the ranks
see of torchrun is their environment: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR and MASTER_PORT (init_process_group's env://). `run` forks the N ranks from the zygote
with that environment and does what the agent does when a rank fails: it stops the others
(SIGTERM, then SIGKILL after a grace period). The tests of torchrun's own part (a dead rank
reported by the agent, its exit status) keep launching torchrun itself (tests/test_distributed.py).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import helpers_zygote as zygote

GRACE = 5.0  # seconds between SIGTERM and SIGKILL for the ranks left when one failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], *, cwd, env: dict, ranks: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ranks of `growrun ARGS` run to their end: returncode 0 if every rank exited 0, else the
    first failure's; stdout: each rank's output, rank 0 first (stderr: empty, as torchrun's merge)."""
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(ranks),
                        LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(zygote.Process(args, cwd=cwd, env=rank_env, stdout=zygote.PIPE, stderr=zygote.PIPE,
                                    start_new_session=True))
    deadline, failed = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            if failed is None:
                failed = next((p for p in procs if p.returncode not in (None, 0)), None)
                if failed is not None:  # the agent's way: stop the others, then kill what is left
                    _signal(procs, signal.SIGTERM)
                    deadline = min(deadline, time.monotonic() + GRACE)
            if time.monotonic() > deadline:
                _signal(procs, signal.SIGKILL)
                for p in procs:
                    p.wait()
                break
            time.sleep(0.02)
    finally:
        _signal(procs, signal.SIGKILL)
    failed = failed or next((p for p in procs if p.returncode != 0), None)
    out = "".join(f"[rank {i}]\n{o or ''}{e or ''}" for i, (o, e) in enumerate(p.communicate() for p in procs))
    return subprocess.CompletedProcess(args, 0 if failed is None else failed.returncode, out, "")


def _signal(procs, signum: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signum)
            except ProcessLookupError:
                pass
