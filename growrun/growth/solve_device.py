"""Where TINY's float64 solves run: growth.solve_device = auto | model | cpu.

The solves (solve.py: Cholesky / eigh of S1 and S2, triangular solves, the Gram matrix) are
float64. On a server GPU (A100, H100) float64 is fast; on consumer GPUs it runs at 1/32-1/64 of
float32, often slower than the CPU; MPS has no float64 at all. So:

  cpu    the CPU;
  model  the model's device (MPS: the CPU, it has no float64);
  auto   the CPU for a CPU or MPS model; on CUDA the faster of the GPU and the CPU at a float64
         matmul C = A B (n x n, n = 1024), the CPU timed including the transfers a solve there
         pays (A, B to the CPU, C back), timed once per process and device (cached); other
         accelerators: the model's device.

neurons.fit_site moves the site's normalized float64 statistics to this device (`moved`), solves
there, and returns the Proposal on the site's device. The solve's results do not depend on the device beyond float64
round-off.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

CHOICES = ("auto", "model", "cpu")
CPU = torch.device("cpu")
_chosen: dict = {}  # (device, timer) -> device, the auto choice made in this process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def float64_matmul_seconds(device: torch.device, n: int = 1024, repeats: int = 3) -> tuple[float, float]:
    """(seconds on `device`, seconds on the CPU incl. transfers) of a float64 n x n matmul, best
    of `repeats` after one warm-up each."""
    A, B = (torch.randn(n, n, dtype=torch.float64, device=device) for _ in range(2))

    def best(f) -> float:
        f()
        _sync(device)
        out = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            _sync(device)
            out = min(out, time.perf_counter() - t)
        return out

    return best(lambda: A @ B), best(lambda: (A.cpu() @ B.cpu()).to(device))


def faster(device_seconds: float, cpu_seconds: float) -> str:
    """"device" if the device is at least as fast as the CPU, else "cpu"."""
    return "device" if device_seconds <= cpu_seconds else "cpu"


def solve_device(device, choice: str = "auto",
                 timer: Callable[[torch.device], tuple[float, float]] = float64_matmul_seconds) -> torch.device:
    """The device the float64 solves of a model on `device` run on (module doc). `timer(device)`
    -> (device seconds, CPU seconds) is only called for auto on CUDA, once per (device, timer)."""
    if choice not in CHOICES:
        raise ValueError(f"solve_device={choice!r}; allowed: {', '.join(CHOICES)}")
    device = torch.device(device)
    if choice == "cpu" or device.type in ("cpu", "mps"):
        return CPU
    if choice == "model" or device.type != "cuda":
        return device
    key = (str(device), timer)
    if key not in _chosen:
        _chosen[key] = device if faster(*timer(device)) == "device" else CPU
    return _chosen[key]


def moved(stats, device: torch.device):
    """`stats` (a dataclass, e.g. NormalizedStats) with every tensor field on `device`."""
    tensors = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)
               if isinstance(getattr(stats, f.name), torch.Tensor)}
    if all(t.device == device for t in tensors.values()):
        return stats
    return dataclasses.replace(stats, **{k: t.to(device) for k, t in tensors.items()})
