"""TINY's statistics from the training steps themselves (growth.stats=training; tiny_math.md
section 2): no separate statistics pass.

The sums S1, S2, M1, M2, P, g2, n of stats.py are accumulated on the last training batches
before a growth event (its *window*, see window_starts): forward pre-hooks on L1 and L2 capture
x and h of the training forward, and a tensor hook on L2's output a receives, during the
training backward, the gradient of the batch's *mean* loss. With B the batch size (per rank),

    g_i = B * d(mean loss)/d a_i = d loss_i / d a_i,

the per-sample gradient the separate pass takes; the products are added right there, inside the
hook (stats._SiteRecorder.accumulate, the same code and fold rule as the pass). Nothing is
computed twice: the forward and backward are the training step's own.

How it differs from the separate pass (growth.stats=pass):
  * the samples are the window's training batches (augmented, as trained on), not a fresh
    unaugmented draw of growth.samples images;
  * the weights move during the window (one optimizer step per batch): the statistics describe
    the models of the last few steps, not exactly the model that grows. With optim.lr = 0 and
    the same batches, both give the same sums (tests/test_stats_training.py);
  * BatchNorm in train mode couples the samples of a batch (g_i is the gradient of the batch
    loss): the same in both, since the pass also runs in train mode.
Forward passes without gradients (evaluation) are not recorded.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from growrun.devices import Stopwatch, exact_fp32

from growrun.models.site import Site
from .stats import SiteStats, _Scratch, _SiteRecorder


def window_starts(events: Sequence[int], samples: int, batch_size: int) -> dict[int, int]:
    """{first step of the window: event step}. An event at step s (growth after optimizer step
    s) records steps max(s - k + 1, previous event + 1) .. s, k = ceil(samples / batch_size):
    the last k batches, never one trained before the previous event (the model differed)."""
    k = max(1, math.ceil(samples / batch_size))
    starts, previous = {}, 0
    for s in sorted(events):
        starts[max(s - k + 1, previous + 1)] = s
        previous = s
    return starts


class _TrainingRecorder(_SiteRecorder):
    """A site recorder fed by training steps: g arrives through a tensor hook on a."""

    def __init__(self, site: Site, folds: int, device, dtype, scratch: _Scratch) -> None:
        super().__init__(site, folds, device, dtype)
        self.scratch = scratch
        self.batches = 0  # training batches recorded (their index decides the fold)
        self.clock = Stopwatch(device)  # time spent adding products (CUDA: timed by events, no sync)

    def _pre1(self, m, args) -> None:
        if torch.is_grad_enabled():
            super()._pre1(m, args)

    def _pre2(self, m, args) -> None:
        if torch.is_grad_enabled():
            super()._pre2(m, args)

    def _post2(self, _m, _args, out):
        if torch.is_grad_enabled() and out.requires_grad and self.x is not None and self.h is not None:
            out.register_hook(self._on_grad)
        else:
            self.reset()

    def _on_grad(self, grad: torch.Tensor) -> None:
        self.clock.start()
        with exact_fp32():  # the products in float32 even when training steps use TF32 (growrun.devices)
            self.accumulate(grad.detach() * grad.shape[0], self.batches, self.scratch)
        self.batches += 1
        self.clock.stop()

    def state(self) -> dict:
        return {"S1": self.S1, "C": self.C, "Q": self.Q, "n_folds": self.n_folds, "batches": self.batches}

    def load(self, state: dict) -> None:
        for key in ("S1", "C", "Q", "n_folds"):
            getattr(self, key).copy_(state[key])
        self.batches = int(state["batches"])


class TrainingStats:
    """Records the statistics of `sites` from the training steps while attached."""

    def __init__(self, sites: Sequence[Site], folds: int = 2, state: dict | None = None) -> None:
        first = next(iter(sites[0].l1.parameters()))
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        scratch = _Scratch()
        self.recorders = [_TrainingRecorder(s, folds, first.device, dtype, scratch) for s in sites]
        for rec in self.recorders:
            if state is not None:
                rec.load(state[rec.site.name])
        self.handles: list = []

    @property
    def names(self) -> list[str]:
        return [r.site.name for r in self.recorders]

    @property
    def seconds(self) -> float:
        return sum(r.clock.seconds for r in self.recorders)

    @property
    def batches(self) -> int:
        return min((r.batches for r in self.recorders), default=0)

    def attach(self) -> None:
        if not self.handles:
            for rec in self.recorders:
                self.handles += rec.hooks()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for rec in self.recorders:
            rec.reset()

    def state_dict(self) -> dict:
        """The partial sums (a checkpoint inside the window resumes exactly)."""
        return {rec.site.name: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in rec.state().items()}
                for rec in self.recorders}

    def finish(self) -> dict[str, SiteStats]:
        """Stop recording; {site name: SiteStats} of the batches recorded."""
        self.detach()
        return {rec.site.name: rec.finish() for rec in self.recorders}


def gather_window(window: dict, dist) -> dict | None:
    """A checkpoint's record of an open window (rank 0's result; None on other ranks): the
    partial sums of this process, or with several ranks {"ranks": [each rank's, on the CPU]}, since
    each rank's sums come from its own share of the batches (the event sums them across ranks)."""
    if not dist.active:
        return window
    cpu = {site: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()}
           for site, state in window.items()}
    ranks = dist.gather(cpu)
    return None if ranks is None else {"ranks": ranks}


def rank_window(window: dict, rank: int, world: int) -> dict:
    """This rank's partial sums from gather_window's record. Saved by another number of ranks
    (or one process): rank 0 takes the sum of all, the others start from zero, so the event's
    sum across ranks is still the recorded total."""
    ranks = window["ranks"] if "ranks" in window else [window]
    if len(ranks) == world:
        return ranks[rank]
    return {site: {k: (sum(r[site][k] for r in ranks) * (rank == 0) if torch.is_tensor(v) and k != "batches"
                       else v) for k, v in state.items()}
            for site, state in ranks[0].items()}
