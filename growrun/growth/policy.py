"""Growth policy: when to grow, which sites, how many neurons, up to which widths.

Pure functions of the growth config (configs/growth/*.yaml, schema GrowthConfig) and integers:
    growth_steps     the optimizer steps after which a growth event runs (dt may be fractional)
    target_widths    the width each site grows to
    pick_sites       all pending sites, the next one in turn, or the best gain per parameter
    requested_count  fixed, or to_target (ceil of what is left over the remaining steps), capped
                     by the target
    affordable       how many neurons growth.param_budget still allows at a site
    neuron_count     requested_count capped by affordable
    draw_sizes       the statistics and line-search draws, shrunk to fit a small training set
    planned_trajectory the site widths after each planned event (sites=all|round_robin)
    planned_epochs   trainer.epochs for growth.extra_epochs: the epoch of the last planned
                     to_target event, plus extra_epochs
    growth_blocker   why a configuration can never grow (no event, no site below its target, no
                     neuron within the budget) or cannot grow a site it must (net2net, splitting at width 0),
                     as a one-line message naming the keys to change
    bottleneck_fires growth.when=bottleneck: does a site's relative bottleneck Psi / g2 reach
                     growth.when_threshold
    plateau_fires    growth.when=plateau: has the monitored loss stopped improving
    plateau_loss     the loss growth.when=plateau monitors in an epoch's metrics row
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

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


def requested_count(cfg, width: int, start: int, target: int) -> int:
    """How many neurons the schedule asks for at one site: fixed count (also the cap of
    adaptive), or the share of (target - start) for one of `steps` steps; never past the target."""
    k = math.ceil((target - start) / cfg.steps) if cfg.neurons == "to_target" else cfg.count
    return max(0, min(k, target - width))


def affordable(cfg, params: int, params_per_neuron: int) -> int | None:
    """Neurons of params_per_neuron parameters that growth.param_budget still allows on top of
    `params` (None: no budget)."""
    if not cfg.param_budget:
        return None
    return max(0, (cfg.param_budget - params) // max(1, params_per_neuron))


def neuron_count(cfg, width: int, start: int, target: int, params: int, params_per_neuron: int) -> int:
    """requested_count, never past growth.param_budget."""
    k = requested_count(cfg, width, start, target)
    cap = affordable(cfg, params, params_per_neuron)
    return k if cap is None else min(k, cap)


MIN_DRAW = 2  # images per draw: BatchNorm in training mode needs 2 values per channel


def draw_sizes(n_train: int, samples: int, search: int) -> tuple[int, int]:
    """(statistics samples, line-search images) of a growth event: as configured when both fit
    into the n_train training images (the draws are disjoint); otherwise both shrunk in
    proportion to what was asked, each at least MIN_DRAW, together every image."""
    if samples + search <= n_train:
        return samples, search
    if n_train < 2 * MIN_DRAW:
        raise GrowrunError(f"growth needs at least {2 * MIN_DRAW} training images ({MIN_DRAW} for growth.samples, "
                           f"{MIN_DRAW} for growth.line_search.batch_size); the training set has {n_train}")
    n_search = round(n_train * search / (samples + search))
    n_search = min(n_train - MIN_DRAW, max(MIN_DRAW, n_search))
    return n_train - n_search, n_search


def planned_trajectory(cfg, start: dict[str, int], targets: dict[str, int]) -> list[dict[str, int]]:
    """The site widths after each planned growth event, until every site reaches its target:
    requested_count neurons per chosen site (sites=all: every site below its target; round_robin:
    one in turn). The plan of growth.when=schedule and sites=all|round_robin; what growth then
    adds may fall short of it (a rank-deficient solve, growth.param_budget)."""
    if cfg.sites not in ("all", "round_robin") or cfg.when != "schedule":
        raise GrowrunError(f"growth.sites={cfg.sites}, growth.when={cfg.when}: the widths after each event are "
                           "decided during training; a plan needs growth.sites=all|round_robin and "
                           "growth.when=schedule")
    names, widths, turn, plan = list(start), dict(start), 0, []
    while True:
        pending = [n for n in names if widths[n] < targets[n]]
        chosen = pick_sites(cfg.sites, pending, names, turn)
        if not chosen:
            return plan
        for n in chosen:
            widths[n] += requested_count(cfg, widths[n], start[n], targets[n])
        turn = (names.index(chosen[0]) + 1) % len(names)
        plan.append(dict(widths))


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


def growth_blocker(cfg, epochs: int, steps_per_epoch: int | None, start: dict[str, int],
                   targets: dict[str, int], params: int, params_per_neuron: dict[str, int],
                   splits: str = "") -> str | None:
    """Why growth (cfg: the growth config) can add no neuron at all in a run of `epochs` epochs
    of `steps_per_epoch` steps (None: unknown, the schedule is not checked), from the `start`
    widths (a model of `params` parameters) to the `targets` (target_widths, growth.only
    applied), or None when some site can grow. The reason is one line naming the keys to
    change; growth.method=none never has one. splits: the method's verb ("copy", "split") when
    its new neurons come from existing ones (GrowthMethod.splits), so sites at width 0 cannot grow."""
    if cfg.method == "none":
        return None
    if steps_per_epoch is not None and not growth_steps(cfg, steps_per_epoch, epochs):
        return _no_event(cfg, epochs, steps_per_epoch)
    below = [n for n in start if targets[n] > start[n]]
    if not below:
        return _no_room(cfg, start, targets)
    empty = [n for n in below if start[n] == 0]
    if splits and empty:
        return (f"growth.method={cfg.method}: site(s) {', '.join(empty)} start at width 0 and {cfg.method} can only "
                f"{splits} existing neurons; start them at >= 1 neuron "
                f"(model.site_widths, model.start_fraction), leave them out of growth.only, or use another growth "
                f"method")
    cheapest = min(params_per_neuron[n] for n in below)
    if affordable(cfg, params, cheapest) == 0:
        return (f"growth.param_budget={cfg.param_budget}: the starting model already has {params} parameters and "
                f"a neuron needs {cheapest} more, so no site can grow; must be at least {params + cheapest} "
                f"(or 0: no budget)")
    return None


def _no_event(cfg, epochs: int, steps_per_epoch: int) -> str:
    """The blocker when growth_steps is empty (an event follows a step and precedes another)."""
    end = epochs * steps_per_epoch
    if end < 2:
        return (f"trainer.epochs={epochs}: {end} training step(s) of {steps_per_epoch} per epoch, growth needs at "
                f"least 2 (an event comes after a step and before the next); must be larger (or use growth=none)")
    if cfg.last_epoch is not None and cfg.last_epoch < cfg.first_epoch:
        return (f"growth.last_epoch={cfg.last_epoch:g}: before growth.first_epoch={cfg.first_epoch:g}, so no growth "
                f"event ever runs; must be >= growth.first_epoch (or null)")
    return (f"growth.first_epoch={cfg.first_epoch:g}: no growth event within trainer.epochs={epochs} "
            f"({steps_per_epoch} steps per epoch); must be at most {(end - 1) / steps_per_epoch:g}, or trainer.epochs "
            f"larger (or use growth=none)")


def _no_room(cfg, start: dict[str, int], targets: dict[str, int]) -> str:
    """The blocker when every site already starts at (or above) its target width."""
    names = [n for n in start if cfg.only is None or n in cfg.only]
    if not names:
        return f"growth.only=[]: no site to grow; name sites of {', '.join(start)} (or null: all)"
    where = "every site" if cfg.only is None else f"every site of growth.only={list(cfg.only)}"
    target = "raise growth.target_widths" if cfg.target_widths is not None else \
        f"raise growth.target_fraction (now {cfg.target_fraction:g}) or set growth.target_widths"
    return (f"growth.method={cfg.method}: no site can grow, {where} starts at (or above) its target width "
            f"(start {[start[n] for n in names]}, target {[targets[n] for n in names]}); set model.start_fraction "
            f"(null: model.width) or model.site_widths below the target, or {target}, or use growth=none")


# --- growth.when: triggers checked at each scheduled event ------------------------------------

def bottleneck_fires(psi: float, g2: float, threshold: float) -> bool:
    """growth.when=bottleneck: a site grows when its relative bottleneck Psi / g2 >= threshold.
    Psi / g2 in [0, 1] is the share of the functional gradient's energy that the site's existing
    L2 weights cannot follow (tiny_math.md section 3): 1 = fully starved, 0 = nothing to add.
    Without gradient (g2 = 0) the share is undefined: only threshold 0 (always) fires."""
    if not g2 > 0:
        return threshold <= 0
    return psi / g2 >= threshold


def plateau_fires(losses: Sequence[float], patience: int, min_delta: float, used: int = 0) -> bool:
    """growth.when=plateau: True when the best of the last `patience` losses (one per evaluated
    epoch, oldest first) is below the best of all losses before them by at most min_delta,
    and a loss was recorded since the check that last fired (`used`: len(losses) then), so that
    one plateau grows once per new loss, not at every check between two evaluations (dt < 1).
    Fewer than patience + 1 losses: no verdict yet, False."""
    n = len(losses)
    if n <= patience or n <= used:
        return False
    recent, before = min(losses[n - patience:]), min(losses[: n - patience])
    return before - recent <= min_delta  # improved by at most min_delta


def plateau_loss(row: dict, has_val: bool) -> float | None:
    """The loss growth.when=plateau monitors in an epoch's metrics row: the validation loss when
    the run has a validation split (None in an epoch that was not evaluated), else the training
    loss (never the test loss)."""
    if has_val:
        return row.get("val_loss")
    return row.get("train_loss")
