"""Growth policy: when to grow, which sites, how many neurons, up to which widths.

Pure functions of the growth config (configs/growth/*.yaml, schema GrowthConfig) and integers:
    growth_steps     the optimizer steps after which a growth event runs (dt may be fractional)
    target_widths    the width each site grows to
    pick_sites       all pending sites, the next one in turn, or the best gain per parameter
    neuron_count     fixed, to_target (ceil of what is left over the remaining steps), or capped
                     by the target and the parameter budget
    planned_epochs   trainer.epochs for growth.extra_epochs: the epoch of the last planned
                     to_target event, plus extra_epochs
"""
from __future__ import annotations

import itertools
import math

from growrun.errors import GrowrunError


def growth_steps(cfg, steps_per_epoch: int, epochs: int) -> list[int]:
    """Global step counts at which growth is due: first_epoch, then every dt epochs, up to
    last_epoch (default: the end of training, exclusive)."""
    end = epochs * steps_per_epoch
    last = end - 1 if cfg.last_epoch is None else min(end - 1, round(cfg.last_epoch * steps_per_epoch))
    return list(itertools.takewhile(lambda s: s <= last, _event_steps(cfg, steps_per_epoch)))


def _event_steps(cfg, steps_per_epoch: int):
    """Event i at step round((first_epoch + i * dt) * steps_per_epoch), at least one step after
    event i - 1: rounded per event, so a fractional dt does not drift (dt = 0.25 of 390 steps
    gives 4 events per epoch, the 4th at its end), and never before step 1."""
    step = 0
    for i in itertools.count():
        step = max(step + 1, round((cfg.first_epoch + i * cfg.dt) * steps_per_epoch))
        yield step


def target_widths(cfg, names: list[str], full: list[int], current: list[int]) -> dict[str, int]:
    """growth.target_widths (one per site) or ceil(target_fraction * full width); never below
    the current width. Sites outside growth.only keep their width."""
    if cfg.target_widths is not None:
        if len(cfg.target_widths) != len(names):
            raise GrowrunError(f"growth.target_widths={list(cfg.target_widths)}: needs {len(names)} widths, one per "
                               f"site ({', '.join(names)})")
        targets = [int(w) for w in cfg.target_widths]
    else:
        targets = [int(math.ceil(cfg.target_fraction * f - 1e-9)) for f in full]
    only = set(names) if cfg.only is None else set(cfg.only)
    unknown = only - set(names)
    if unknown:
        raise GrowrunError(f"growth.only={sorted(unknown)}: no such site; sites are {', '.join(names)}")
    return {n: max(t, c) if n in only else c for n, t, c in zip(names, targets, current)}


def pick_sites(mode: str, pending: list[str], order: list[str], turn: int,
               scores: dict[str, float] | None = None) -> list[str]:
    """The sites to grow at this event. round_robin: the first pending site at or after
    position `turn` of `order`; best_gain: the pending site with the largest score."""
    if not pending:
        return []
    if mode == "all":
        return list(pending)
    if mode == "round_robin":
        n = len(order)
        for i in range(n):
            name = order[(turn + i) % n]
            if name in pending:
                return [name]
    if mode == "best_gain":
        assert scores is not None
        return [max(pending, key=lambda n: (scores.get(n, 0.0), -order.index(n)))]
    raise ValueError(f"growth.sites={mode}")


def neuron_count(cfg, width: int, start: int, target: int, params: int, params_per_neuron: int) -> int:
    """How many neurons to ask for at one site: fixed count, or the share of (target - start)
    for one of `steps` steps; never past the target, nor past growth.param_budget."""
    left = target - width
    if cfg.neurons == "to_target":
        k = math.ceil((target - start) / cfg.steps)
    else:  # fixed, and the cap of adaptive
        k = cfg.count
    k = max(0, min(k, left))
    if cfg.param_budget:
        k = min(k, max(0, (cfg.param_budget - params) // max(1, params_per_neuron)))
    return k


def planned_events(cfg, start: dict[str, int], targets: dict[str, int]) -> int:
    """Growth events until every site reaches its target with neurons=to_target: a site
    needing d neurons gets ceil(d / steps) per visit, so ceil(d / ceil(d / steps)) visits;
    sites=all visits every site at each event, round_robin / best_gain one site per event."""
    visits = [math.ceil(d / math.ceil(d / cfg.steps)) for d in (targets[n] - start[n] for n in start) if d > 0]
    if not visits:
        return 0
    return max(visits) if cfg.sites == "all" else sum(visits)


def planned_epochs(cfg, events: int, steps_per_epoch: int) -> int:
    """The epoch in which the last of `events` growth events falls (the steps of
    growth_steps), plus growth.extra_epochs."""
    if events == 0:
        return cfg.extra_epochs
    last_step = next(itertools.islice(_event_steps(cfg, steps_per_epoch), events - 1, None))
    return math.ceil(last_step / steps_per_epoch) + cfg.extra_epochs
