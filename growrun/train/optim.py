"""Optimizers and per-step learning-rate schedules (configs/optim/*.yaml).

Weight decay applies to conv/linear weights; BatchNorm parameters and biases (tensors of one
dimension) are exempt unless optim.decay_norm_and_bias is set. Groups are built in
model.named_parameters() order, so a model rebuilt from its checkpointed architecture gets an
optimizer whose state_dict loads position by position, grown parameters included.

The schedule is a LambdaLR stepped once per batch:
    warm-up   lr * (s + 1) / W                        for s < W = warmup_epochs * steps/epoch
    cosine    lr * (r + (1 - r) * (1 + cos(pi t)) / 2) t = (c(s) - c(W)) / (c(T) - c(W)),
                                                       r = min_lr_ratio
    step      lr * step_gamma ** (number of milestones m with c(s) >= m * c(T))
    constant  lr
with T the run's steps and c the schedule's clock: optim.schedule_over=steps, c(s) = s;
optim.schedule_over=compute, c(s) = the planned training FLOPs of the first s steps
(growrun.train.compute_plan: a growing run's cheap early steps then move the schedule less).
Re-warming (optim.rewarm_epochs > 0): after a planned growth event at step e, the steps s with
s - e < R = rewarm_epochs * steps/epoch take the schedule's factor times (s - e + 1) / R.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    decay, exempt = [], []
    for _, p in model.named_parameters():
        (exempt if p.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": exempt, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"optim.name={cfg.name}")


def by_steps(s: int) -> int:
    """The schedule clock of optim.schedule_over=steps: the step itself."""
    return s


def rewarm_factor(step: int, events: Sequence[int], length: int) -> float:
    """(step - e + 1) / length for the last event step e <= step while step - e < length, else 1.
    An event at step e comes after e optimizer steps: step e (0-based) is the first one after it."""
    k = bisect.bisect_right(events, step) - 1
    if length <= 0 or k < 0:
        return 1.0
    return min(1.0, (step - events[k] + 1) / length)


def lr_factor(step: int, total_steps: int, cfg, steps_per_epoch: int,
              clock: Callable[[int], int] = by_steps, events: Sequence[int] = ()) -> float:
    """The multiplier of cfg.lr at optimizer step `step` (0-based) of a run of total_steps; events:
    the planned growth events' steps, for re-warming."""
    rewarm = int(round(getattr(cfg, "rewarm_epochs", 0.0) * steps_per_epoch)) if events else 0
    return _schedule_factor(step, total_steps, cfg, steps_per_epoch, clock) * rewarm_factor(step, events, rewarm)


def _schedule_factor(step: int, total_steps: int, cfg, steps_per_epoch: int, clock: Callable[[int], int]) -> float:
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        t = min(1.0, (clock(step) - clock(warmup)) / max(1, clock(total_steps) - clock(warmup)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        passed = sum(clock(step) >= m * clock(total_steps) for m in cfg.milestones)
        return cfg.step_gamma ** passed
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int, epochs: int,
                    total_steps: int | None = None, clock: Callable[[int], int] = by_steps,
                    events: Sequence[int] = ()) -> LambdaLR:
    """total_steps: the run's steps when not epochs x steps_per_epoch (trainer.budget_flops);
    clock: the schedule's clock (growrun.train.compute_plan for optim.schedule_over=compute);
    events: the planned growth events' steps (compute_plan.schedule_plan), for re-warming."""
    total = max(1, steps_per_epoch * epochs if total_steps is None else total_steps)
    events = sorted(events)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg, steps_per_epoch, clock, events))
