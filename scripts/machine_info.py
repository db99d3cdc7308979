"""The machine a benchmark ran on, for the records in bench/*.json (bench_*.py import this).

growrun.machine.describe() (CPU model from /proc/cpuinfo, its vector extensions, cores, torch
and its oneDNN / MKL build, ONEDNN_MAX_CPU_ISA, CUDA device) plus whether avx2 / avx512f are
present, torch's thread count, the python version, the date (UTC, ISO 8601) and the load
average (1, 5, 15 min) when called: on a shared machine, timings taken under load
(load above the cores) are slower, the more so for multi-threaded linear algebra.
"""
from __future__ import annotations

import datetime
import os
import platform

import torch

from growrun.machine import describe


def machine_info() -> dict:
    info = describe()
    ext = info["vector_extensions"]
    return {**info, "avx2": "avx2" in ext, "avx512f": "avx512f" in ext, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


if __name__ == "__main__":
    for key, value in machine_info().items():
        print(f"{key:20s} {value}")
