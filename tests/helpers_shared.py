"""Trained runs that several tests read, built once per test session even under pytest-xdist.

A module-scoped fixture is built once per worker process: with `make test`'s two workers, a
fixture that trains for 10-20 s is often built twice. `built_once` builds it in the directory the
workers share (tmp_path_factory's base's parent under xdist, the documented place), the first
worker under a file lock, the others waiting for it and reading what it built. Tests only read it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory `name` after build(directory) filled it, once per session; a build that
    failed (raised) is not reused: the next test builds it again and fails the same way."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    target = base / name
    with FileLock(f"{target}.lock"):
        if not (target / ".built").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            build(target)
            (target / ".built").touch()
    return target
