"""The amplitude line search (tiny_math.md section 5).

Neurons are added as (gamma alpha, gamma omega). To first order the mean loss changes by
p * gamma^2 with p = s0 * sum_k alpha_k^T M1 omega_k (minus d_W when dW2* is applied too,
scaled by gamma^2). The first-order model has no minimum, so its guess is where it predicts a
decrease of half the current loss:

    gamma_0 = min(max_gamma, sqrt(L(0) / (2 |p|)))

From there gamma backtracks geometrically (gamma <- shrink * gamma) on the true training loss
of a held batch, evaluated with the candidate neurons attached by hooks (no module rebuilt),
until the loss has decreased and stops improving; the best gamma seen wins. When no tried
gamma lowers the loss (by more than line_search.min_decrease x L(0): 0 by default, any
decrease; 1e-6 is about the float32 resolution of a mean loss, so that a decrease of a rounding
step, which another summation order may not reproduce, is not taken), gamma = 0: no growth at
this site. No neurons, or a slope p >= 0 (no first-order decrease): gamma = 0 at once, L(0)
measured only. `at_gamma` measures a fixed amplitude instead of searching (growth=firefly: its
candidates go in as trained, gamma = 1).

With line_search.parabola=true the loss is modelled, in t = gamma^2 (the neurons change
the output by gamma^2 at first order), by parabolas L(t) = L(0) + a t + c t^2 (search_gamma):
  * while no tried gamma has lowered the loss, the parabola through L(0) and the two smallest t
    tried: a < 0 < c jumps to its minimum t = -a / (2c) when that is below the next
    backtracking step (never below the last amplitude plain backtracking would try);
  * the search gives up (gamma = 0) once the three smallest t tried all raised the loss and
    lie on one parabola with a > 0 (the one through L(0) and the two smallest predicts the
    third's rise within 10 %): no smaller amplitude lowers the loss either. (A parabola
    through two points only is no proof: far beyond the minimum the loss grows slower than
    t^2 and such fits overestimate a; the third point checks that.) It also gives up once
    the smallest t tried moved the loss by at most 1e-6 L(0) (about the float32 resolution
    of a mean loss): below it the loss changes even less, so nothing it could still find
    would be a measurable decrease;
  * once the best gamma is bracketed, one more evaluation at the minimum of the parabola
    through the best t and its tried neighbours (within them; above the best only up to one
    backtracking step and max_gamma) refines it, unless the parabola promises less than 2 % more
    decrease: the loss is sharp near its minimum (scripts/gamma_profile.py) and the factor-2
    grid in gamma (or a jump) can miss much of the decrease.

`forward` (default: the model) maps the batch's inputs to logits; the controller passes the
part of the network from the site's block on, with the batch's inputs already run through the
part before it (growrun.models.base forward_to / forward_from): the same losses, bit for bit,
without recomputing the unchanged front of the network for every gamma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from growrun.models.site import Neurons, Site, frozen_bn_stats
from growrun.growth.surgery import candidate


@dataclass
class SearchResult:
    gamma: float
    loss_before: float  # L(0)
    loss_at_gamma: float  # L(gamma) with the candidate (= L(0) when gamma = 0)
    predicted: float  # first-order loss change at gamma: p * gamma^2 (<= 0)
    evaluations: int


@torch.no_grad()
def line_search(model: nn.Module, site: Site, neurons: Neurons, moments, slope: float,
                batch: tuple[torch.Tensor, torch.Tensor], loss_fn: Callable, cfg,
                update: Callable[[float], None] | None = None, bn_init: str = "unit",
                forward: Callable | None = None, base: float | None = None,
                attach: Callable | None = None) -> SearchResult:
    """Choose gamma for `neurons` at `site` (see module doc). slope = p (per gamma^2, < 0 for a
    descent direction). `update(scale)` sets L2 to its original weights + scale * dW2* (so
    update(0) restores them exactly) when the best update is applied with the neurons. `base`:
    L(0) when already measured on this batch (not evaluated again; not counted in evaluations).
    `attach()`: a context manager yielding a handle whose .gamma sets what is evaluated, instead
    of candidate(site, neurons, ...) (growth=splitting: splitting.attach, the split at gamma)."""
    x, y = batch
    forward = forward or model
    if neurons.count == 0 or not slope < 0:  # nothing to try (no moments are needed then)
        if base is not None:
            return SearchResult(0.0, base, base, 0.0, 0)
        with frozen_bn_stats(model):
            base = float(loss_fn(forward(x), y))
        return SearchResult(0.0, base, base, 0.0, 1)
    mean, var = moments if moments is not None else (None, None)
    attached = attach() if attach is not None else candidate(site, neurons, mean, var, bn_init)
    with frozen_bn_stats(model), attached as cand:
        def loss_at(gamma: float) -> float:
            cand.gamma = gamma
            if update is not None:
                update(gamma * gamma)
            try:
                return float(loss_fn(forward(x), y))
            finally:
                if update is not None:
                    update(0.0)

        evaluations = int(base is None)
        base = loss_at(0.0) if base is None else base
        best_gamma, best_loss, tried = search_gamma(loss_at, base, slope, cfg)
    return SearchResult(best_gamma, base, best_loss, slope * best_gamma**2, evaluations + tried)


def search_gamma(loss_at: Callable[[float], float], base: float, slope: float, cfg) -> tuple[float, float, int]:
    """(gamma, L(gamma), evaluations) of the search in the module doc, given L(0) = base and the
    slope p < 0; loss_at(gamma) evaluates. cfg: shrink, max_iter, max_gamma, parabola (absent:
    False, the plain backtracking), min_decrease (absent: 0)."""
    fit = getattr(cfg, "parabola", False)
    lowered = base - getattr(cfg, "min_decrease", 0.0) * abs(base)  # what a first decrease must go below
    gamma = min(cfg.max_gamma, math.sqrt(base / (2 * -slope)))
    floor = gamma * cfg.shrink ** (cfg.max_iter - 1)  # the last amplitude plain backtracking tries
    tried: list[tuple[float, float]] = []  # (t = gamma^2, L)
    best_gamma, best_loss = 0.0, base
    while True:
        loss = loss_at(gamma)
        tried.append((gamma * gamma, loss))
        if loss < (best_loss if best_gamma > 0 else lowered):
            best_gamma, best_loss = gamma, loss
        elif best_gamma > 0:
            break  # passed the best amplitude along the backtracking sequence
        step = gamma * cfg.shrink
        if fit and best_gamma == 0 and len(tried) >= 2:
            low = sorted(tried)[:3]
            if abs(low[0][1] - base) <= 1e-6 * abs(base):
                break  # the loss no longer resolves the amplitude
            c, a = _parabola((0.0, base), *low[:2])
            if len(low) == 3 and a > 0:
                t3, rise = low[2][0], low[2][1] - base
                if abs(a * t3 + c * t3 * t3 - rise) <= 0.1 * rise:
                    break  # a parabola rising from t = 0 fits all three: no smaller amplitude helps
            if a < 0 < c:
                step = min(step, max(floor, math.sqrt(-a / (2 * c))))
        if len(tried) >= cfg.max_iter or step < floor * (1 - 1e-9):
            break
        gamma = step
    if fit and best_gamma > 0:
        refined = _refinement(base, tried, best_gamma, best_loss, cfg)
        if refined is not None:
            loss = loss_at(refined)
            tried.append((refined * refined, loss))
            if loss < best_loss:
                best_gamma, best_loss = refined, loss
    return best_gamma, best_loss, len(tried)


def _parabola(p0, p1, p2) -> tuple[float, float]:
    """(c, b) of the parabola c t^2 + b t + const through three points (t, L)."""
    (x0, y0), (x1, y1), (x2, y2) = p0, p1, p2
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    c = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    return c, b


def _refinement(base: float, tried: list[tuple[float, float]], best_gamma: float, best_loss: float,
                cfg) -> float | None:
    """The minimum (as a gamma) of the parabola through the best t and its nearest tried
    neighbours (L(0) counts as tried at t = 0), kept strictly inside them, or up to one
    backtracking step above the best (and max_gamma) when nothing above it was tried; None
    when that parabola is not convex, its minimum is the best t already, or it predicts less
    than 2 % more decrease than the best's L(0) - L(best)."""
    points = sorted({(0.0, base), *tried})
    tb = best_gamma * best_gamma
    i = next(k for k, (t, _) in enumerate(points) if t == tb)
    if i == 0:
        return None
    if i + 1 < len(points):
        three, top = points[i - 1: i + 2], points[i + 1][0]
    elif i >= 2:
        three, top = points[i - 2: i + 1], min(tb / cfg.shrink**2, cfg.max_gamma**2)
    else:
        return None
    c, b = _parabola(*three)
    if not c > 0:
        return None
    t = min(max(-b / (2 * c), points[i - 1][0]), top)
    if not points[i - 1][0] < t < top or abs(t - tb) <= 1e-3 * tb:
        return None
    predicted = best_loss + c * (t - tb) ** 2 + (2 * c * tb + b) * (t - tb)  # the parabola at t
    return math.sqrt(t) if best_loss - predicted >= 0.02 * (base - best_loss) else None


@torch.no_grad()
def at_gamma(model: nn.Module, site: Site, neurons: Neurons, moments, slope: float, gamma: float,
             batch: tuple[torch.Tensor, torch.Tensor], loss_fn: Callable, bn_init: str = "unit",
             forward: Callable | None = None, base: float | None = None) -> SearchResult:
    """No search: the neurons at the fixed amplitude `gamma` (growth=firefly inserts its trained
    candidates as they are, gamma = 1), L(0) (unless `base`) and L(gamma) measured on the batch
    with the candidate attached as line_search does; gamma = 0 when there are no neurons."""
    x, y = batch
    forward = forward or model
    evaluations = int(base is None)
    if base is None:
        with frozen_bn_stats(model):
            base = float(loss_fn(forward(x), y))
    if neurons.count == 0 or gamma == 0:
        return SearchResult(0.0, base, base, 0.0, evaluations)
    mean, var = moments if moments is not None else (None, None)
    with frozen_bn_stats(model), candidate(site, neurons, mean, var, bn_init) as cand:
        cand.gamma = gamma
        loss = float(loss_fn(forward(x), y))
    return SearchResult(gamma, base, loss, slope * gamma**2, evaluations + 1)
