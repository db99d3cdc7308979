"""What differs between a CPU and a CUDA device, for the code of both the trainer and growth:

    synchronize   wait for the device's queued work (CUDA runs asynchronously: a wall-clock
                  reading without it times the queueing, not the work)
    Stopwatch     seconds of device work between start() and stop(), summed over laps; on CUDA
                  each lap is a pair of timing events, read (one synchronisation) only when
                  the total is asked for, so that timing adds no host sync inside a hot loop
    set_tf32      TF32 for float32 matmuls and convolutions on Ampere and later GPUs
    exact_fp32    TF32 off inside the block, restored after it
    no_autotune   cuDNN's autotuner (benchmark mode) off inside the block: a growth event runs
                  convolutions of shapes it sees once (statistics and search batches, candidate
                  widths, batch-1 FLOP counts), each of which the autotuner would time first

TF32 policy (trainer.tf32, default false): training steps and evaluation use TF32 only when the
user asks for it; growth events never do. Their statistics, full-kernel sums and line-search
losses are compared with thresholds that assume float32 rounding (growth.rel_eps,
line_search.min_decrease, 1e-6 L(0)); TF32 keeps 10 mantissa bits, ~1e-3 relative. PyTorch's own
default is TF32 on for cuDNN convolutions and off for matmuls; growrun sets both explicitly.
On a CPU none of this changes a number.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Block until `device`'s queued work is done (CUDA); nothing elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Summed seconds of the work between start() and stop() on `device` (module doc)."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
        self._done = 0.0
        self._laps: list = []  # CUDA: (start event, stop event) not yet read
        self._t0: float | None = None
        self._event = None

    def start(self) -> None:
        if self.cuda:
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._laps.append((self._event, end))
        else:
            self._done += time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        if self._laps:
            self._laps[-1][1].synchronize()
            self._done += sum(a.elapsed_time(b) for a, b in self._laps) / 1000.0
            self._laps = []
        return self._done

    def add(self, seconds: float) -> None:
        """Count seconds measured elsewhere (e.g. restored from a checkpoint)."""
        self._done += seconds


def _new_tf32_api() -> bool:
    """torch >= 2.9 sets TF32 through fp32_precision ("tf32" | "ieee"); reading the older
    allow_tf32 flags after anything used the new API raises, so only one API is ever used."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def tf32_flags() -> tuple:
    """The current (matmul, cuDNN convolution) TF32 settings, as set_tf32_flags takes them back."""
    if _new_tf32_api():
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def tf32_enabled() -> tuple[bool, bool]:
    """(matmul, cuDNN convolution) TF32 on, as set by set_tf32."""
    return tuple(v in (True, "tf32") for v in tf32_flags())


def set_tf32(allowed: bool) -> None:
    if _new_tf32_api():
        set_tf32_flags(("tf32", "tf32") if allowed else ("ieee", "ieee"))
    else:
        set_tf32_flags((allowed, allowed))


def set_tf32_flags(flags: tuple) -> None:
    if _new_tf32_api():
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = flags
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@contextmanager
def exact_fp32():
    """TF32 off for float32 matmuls and convolutions inside the block (growth events)."""
    saved = tf32_flags()
    set_tf32(False)
    try:
        yield
    finally:
        set_tf32_flags(saved)


@contextmanager
def no_autotune():
    """cuDNN benchmark mode off inside the block (growth events), restored after it."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
