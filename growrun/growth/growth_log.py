"""The vocabulary of growth.csv: its columns, and the helpers that decide what a site's row says
(why a site's statistics are unusable, which stage cut its neuron count, its best_gain score).
Used by growrun.train.events, which writes the rows.

A site may get fewer neurons than the schedule requested, 0 included; the row's `reason` names
the first stage that cut the count: "adaptive" (the adaptive rule kept fewer), "rank" (fewer
directions above the solver's threshold), "budget" (growth.param_budget), "no_gain" (the line
search found no gamma that lowers the loss), "nonfinite" / "degenerate" (the site's statistics
hold NaN or inf / a zero gradient: that site is not grown at this event, training goes on),
"trigger" (growth.when did not fire: the site's Psi / g2 below growth.when_threshold, or no
plateau of the monitored loss; policy.bottleneck_fires / plateau_fires); "" when all requested
neurons were added. The row's `trigger` names what fired (schedule / bottleneck / plateau; ""
when it did not). A plateau check that does not fire skips the event's statistics pass.
(splitting: "rank" also when fewer neurons have a negative splitting eigenvalue.)"""
from __future__ import annotations

import dataclasses
import math

import torch

from growrun.growth.neurons import Proposal

COLUMNS = [
    "event", "epoch", "step", "site", "method", "samples", "requested", "added", "reason", "trigger", "width_after",
    "params_after",
    "psi", "d_w", "lambdas_top", "bottleneck_gain", "first_order", "gamma", "predicted_gain",
    "loss_before", "loss_candidate", "loss_after", "measured_gain",
    "fanin_norm", "fanin_ref", "fanout_norm", "fanout_ref",
    "stats_seconds", "solve_seconds", "search_seconds",
]


def unusable_stats(stats, fits_gradient: bool) -> str:
    """Why a site's statistics cannot be used: "nonfinite" (NaN / inf anywhere), "degenerate"
    (zero gradient energy g2: nothing to fit for a method whose neurons are fitted to the
    gradient, GrowthMethod.fits_gradient), or "" if fine."""
    if not all(bool(torch.isfinite(t).all()) for t in stats.tensors()):
        return "nonfinite"
    return "degenerate" if fits_gradient and float(stats.g2) <= 0 else ""


def zeroed(stats):
    """The same statistics with every sum zeroed (a proposal of 0 neurons from them is empty)."""
    full = getattr(stats, "full", None)  # conv_fanout=full sums (fullconv.FullConvSums)
    return dataclasses.replace(stats, **{f: torch.zeros_like(getattr(stats, f))
                                         for f in ("S1", "S2", "M1_folds", "M2_folds", "P_folds", "g2")},
                               **({"full": full.zeroed()} if full is not None else {}))


def cut_reason(trail: list[tuple[str, int]]) -> str:
    """The first stage of the trail that lowered the neuron count ("" if none did)."""
    for (_, before), (stage, after) in zip(trail, trail[1:]):
        if after < before:
            return stage
    return ""


def score(proposal: Proposal, site) -> float:
    """Expected first-order gain per added parameter (best_gain site choice)."""
    gain = proposal.bottleneck_gain if proposal.bottleneck_gain > 0 else -proposal.first_order
    return gain / max(1, proposal.count * site.params_per_neuron()) if proposal.count else -math.inf


def skipped_rows(event: int, step: int, steps_per_epoch: int, method: str, sites: dict, requested: dict,
                 params: int) -> list[dict]:
    """growth.csv rows of an event whose trigger did not fire (growth.when=plateau): one per site
    it would have considered (`requested`: site name -> neurons asked), added 0, reason "trigger"."""
    return [{"event": event, "epoch": round(step / steps_per_epoch, 4), "step": step, "site": n, "method": method,
             "added": 0, "reason": "trigger", "trigger": "", "requested": k, "width_after": sites[n].width,
             "params_after": params} for n, k in requested.items()]
