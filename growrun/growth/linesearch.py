"""The amplitude line search (tiny_math.md section 5).

Neurons are added as (gamma alpha, gamma omega). To first order the mean loss changes by
p * gamma^2 with p = s0 * sum_k alpha_k^T M1 omega_k (minus d_W when dW2* is applied too,
scaled by gamma^2). The first-order model has no minimum, so its guess is where it predicts a
decrease of half the current loss:

    gamma_0 = min(max_gamma, sqrt(L(0) / (2 |p|)))

From there gamma backtracks geometrically (gamma <- shrink * gamma) on the true training loss
of a held batch, evaluated with the candidate neurons attached by hooks (no module rebuilt),
until the loss has decreased and stops improving; the best gamma seen wins. When no tried
gamma lowers the loss, gamma = 0: no growth at this site. No neurons, or a slope p >= 0 (no
first-order decrease): gamma = 0 at once, L(0) measured only. `at_gamma` measures a fixed
amplitude instead of searching (growth=firefly: its candidates go in as trained, gamma = 1).

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

from growrun.growth.site import Neurons, Site, frozen_bn_stats
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
        gamma = min(cfg.max_gamma, math.sqrt(base / (2 * -slope)))
        best_gamma, best_loss = 0.0, base
        for _ in range(cfg.max_iter):
            loss = loss_at(gamma)
            evaluations += 1
            if loss < best_loss:
                best_gamma, best_loss = gamma, loss
            elif best_gamma > 0:
                break  # passed the best amplitude along the backtracking sequence
            gamma *= cfg.shrink
    return SearchResult(best_gamma, base, best_loss, slope * best_gamma**2, evaluations)


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
