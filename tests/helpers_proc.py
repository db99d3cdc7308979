"""Processes seen through Linux /proc: a process's stat fields (stat) and whether it is alive and
not a zombie (alive). Used by test_faults_cli.py and test_launchers.py."""
from __future__ import annotations

from pathlib import Path


def stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...]; None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = stat(pid)
    return fields is not None and fields[0] != "Z"
