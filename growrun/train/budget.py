"""trainer.budget_flops: a fixed network (growth=none) trained for a compute budget instead of a
number of epochs, so that it can be compared with a grown network at equal compute.

A training step of the model costs TRAIN_FLOPS_PER_FORWARD x F x B FLOPs (F: forward FLOPs per
image, growrun.models.count_flops; B: trainer.batch_size, the global batch), the trainer's own
count (trainer.train_flops). The run takes S = floor(budget / that) steps: trainer.epochs becomes
ceil(S / steps per epoch), the last epoch stops after step S (it may be partial; it is evaluated
like every last epoch), and the learning-rate schedule spans the S steps. Its training compute
is then at most the budget, less than one step below it. A resumed run plans the same steps.
"""
from __future__ import annotations

import logging
import math

from growrun.errors import GrowrunError
from growrun.models import count_flops

log = logging.getLogger("growrun")


def budget_steps(budget: float, flops_per_step: int) -> int:
    return int(budget // flops_per_step)


def plan_budget(cfg, model, input_shape, steps_per_epoch: int) -> int | None:
    """The run's number of steps under trainer.budget_flops (None: no budget); sets trainer.epochs."""
    from growrun.train.trainer import TRAIN_FLOPS_PER_FORWARD

    t = cfg.trainer
    if t.budget_flops is None:
        return None
    forward = count_flops(model, input_shape)
    per_step = TRAIN_FLOPS_PER_FORWARD * forward * t.batch_size
    steps = budget_steps(t.budget_flops, per_step)
    if steps < 1:
        raise GrowrunError(f"trainer.budget_flops={t.budget_flops:g}: less than one training step of this model "
                           f"({per_step:g} FLOPs: {TRAIN_FLOPS_PER_FORWARD} x {forward} per image x batch "
                           f"{t.batch_size}); must be at least {per_step:g}")
    t.epochs = math.ceil(steps / steps_per_epoch)
    log.info("trainer.budget_flops=%g: %d steps of %g FLOPs (%d epochs, the last %s)", t.budget_flops, steps,
             per_step, t.epochs, "whole" if steps % steps_per_epoch == 0 else
             f"{steps % steps_per_epoch} of {steps_per_epoch} steps")
    return steps
