"""The smallest configurable models train, and grow at widths 0-4, without crashing torch's CPU
kernels: with 1 and 2 threads (in turn, in one process), with this CPU's own oneDNN kernels and with the AVX2 ones
(ONEDNN_MAX_CPU_ISA=AVX2 selects them on any x86 CPU with AVX2 or more), so the guard of
growrun.models.layers.conv2d is checked on every x86 machine, not only on AVX2-only ones.
Each case runs tests/cpu_probe.py in a subprocess: a crash or a hang is one failed test that
says which model it was on, never a dead or stuck test session.
"""
from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("cpu_probe.py")
X86 = platform.machine().lower() in ("x86_64", "amd64")
ISAS = ["native"] + (["AVX2"] if X86 else [])
TIMEOUT = 420  # seconds; a normal probe takes ~10 s (minutes on a heavily oversubscribed machine)


@pytest.mark.parametrize("isa", ISAS)
def test_smallest_models_train_and_grow_without_crashing(isa):
    # OpenMP's idle threads sleep instead of spinning: the kernels are the same, and the 2-thread
    # stage does not fight the other test worker for its core (measured beside a 2-thread run: 38 s -> 20 s)
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"} | {"OMP_WAIT_POLICY": "PASSIVE"}
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    try:
        proc = subprocess.run([sys.executable, str(PROBE), "1,2"], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as ex:
        out = ex.stdout.decode() if isinstance(ex.stdout, bytes) else (ex.stdout or "")
        pytest.fail(f"hung for {TIMEOUT} s (ISA {isa}) after: {_last(out)}")
    if proc.returncode != 0 or not proc.stdout.rstrip().endswith("ok"):
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        pytest.fail(f"{how} (ISA {isa}) during: {_last(proc.stdout)}\n{proc.stderr[-2000:]}")


def _last(stdout: str) -> str:
    lines = stdout.strip().splitlines()
    return lines[-1] if lines else "(start-up)"
