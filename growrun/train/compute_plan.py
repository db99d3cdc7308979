"""optim.schedule_over=compute: the clock of the learning-rate schedule in planned training FLOPs.

A growing run's early steps are cheap (a narrow network), so a schedule over steps spends much of
its decay where little compute is spent. With this clock the schedule advances by compute:

    c(s) = sum over the first s steps of  TRAIN_FLOPS_PER_FORWARD x F(widths at that step) x B

F: forward FLOPs per image (growrun.models.count_flops) of the model at the widths the growth
plan gives after each event (growrun.growth.policy.planned_trajectory, events at
policy.growth_steps: a step after event k's step trains at widths k); B: trainer.batch_size.
The plan is made from the initial architecture and the config, so a resumed run has the same
clock; what growth actually adds may fall short of the plan (a rank-deficient solve, a
parameter budget), and the clock does not follow that. A fixed network's clock is its steps
times a constant: the same schedule as over steps.
"""
from __future__ import annotations

import bisect
import logging
from typing import Callable

from growrun.growth import policy
from growrun.models import build_model, count_flops, full_site_widths, initial_arch

log = logging.getLogger("growrun")


def planned_segments(cfg, num_classes: int, input_shape, steps_per_epoch: int, epochs: int) -> list[tuple[int, int]]:
    """[(first step, FLOPs per training step from it on)], ascending steps, the first at 0."""
    from growrun.train.trainer import TRAIN_FLOPS_PER_FORWARD

    arch = initial_arch(cfg.model, num_classes, input_shape)
    model = build_model(arch)
    per_step = TRAIN_FLOPS_PER_FORWARD * cfg.trainer.batch_size
    segments = [(0, per_step * count_flops(model, input_shape))]
    if cfg.growth.method == "none":
        return segments
    names = list(model.sites())
    start = {n: s.width for n, s in model.sites().items()}
    targets = policy.target_widths(cfg.growth, names, full_site_widths(arch, cfg.model), list(start.values()))
    plan = policy.planned_trajectory(cfg.growth, start, targets)
    steps = policy.growth_steps(cfg.growth, steps_per_epoch, epochs)
    for step, widths in zip(steps, plan):
        grown = build_model({**arch, "hidden": [widths[n] for n in names]})
        assert {n: s.width for n, s in grown.sites().items()} == widths
        segments.append((step, per_step * count_flops(grown, input_shape)))
    return segments


def clock(segments: list[tuple[int, int]]) -> Callable[[int], int]:
    """c(s): the FLOPs of the first s steps under the segments (exact integers)."""
    starts = [s for s, _ in segments]
    before = [0]  # FLOPs of the steps before each segment
    for (a, f), (b, _) in zip(segments, segments[1:]):
        before.append(before[-1] + (b - a) * f)

    def c(s: int) -> int:
        k = bisect.bisect_right(starts, s) - 1
        return before[k] + (s - starts[k]) * segments[k][1]

    return c


def schedule_plan(cfg, num_classes: int, input_shape, steps_per_epoch: int, epochs: int):
    """(clock, events) of the LR schedule: the clock in steps, or in planned compute
    (optim.schedule_over=compute); the steps of the growth events that add neurons by the plan,
    for re-warming (optim.rewarm_epochs > 0; else none). The plan is built once, only if needed."""
    from growrun.train.optim import by_steps

    over_compute, rewarm = cfg.optim.schedule_over == "compute", cfg.optim.rewarm_epochs > 0
    if not (over_compute or rewarm):
        return by_steps, []
    segments = planned_segments(cfg, num_classes, input_shape, steps_per_epoch, epochs)
    events = [s for s, _ in segments[1:]] if rewarm else []
    if not over_compute:
        return by_steps, events
    c = clock(segments)
    total = epochs * steps_per_epoch
    if len(segments) > 1:
        log.info("optim.schedule_over=compute: %d planned widths; the first half of the compute ends at step %d "
                 "of %d", len(segments), _half(c, total), total)
    return c, events


def _half(c: Callable[[int], int], total: int) -> int:
    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi) // 2
        if 2 * c(mid) >= c(total):
            hi = mid
        else:
            lo = mid + 1
    return lo
