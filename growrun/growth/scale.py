"""The scale of new neurons against the site's existing ones, and rebalancing it.

Norms, per neuron j of a site (conv: the whole kernel slices):
    fan-in  |W1[j]|       L1's row j (C_in x kh x kw for conv; the bias entry is not counted)
    fan-out |W2[:, j]|    L2's column j (C_out x kh x kw for conv)
`existing_norms` gives the mean of each over the site's current neurons, `neuron_norms` the mean
of each over new neurons as inserted; growth.csv logs both at every insertion.

Rebalancing (growth.normalize=fan_in). For sigma with sigma(c u) = c sigma(u), c > 0 (relu,
identity), a neuron (a, w) computes the same function as (c a, w / c); with BatchNorm between L1
and sigma set to the new channel's measured moments (surgery), the moments scale by c and c^2
and the function is again the same. `rebalance_factors` returns per neuron

    c_k = r / |a_k|   (1 where |a_k| = 0: GradMax's zero fan-in has nothing to rebalance)

with r the mean fan-in norm of the site's existing neurons, or, for a site of width 0, the norm a
He-initialised fan-in row has in expectation, sqrt(d * 2 / d) = sqrt(2). New neurons then start
with fan-ins of the layer's own scale, whatever amplitude the line search chose; the fan-out
carries the amplitude. Under BatchNorm the fan-in's norm does not change the function but sets
its learning speed (the gradient of a scale-invariant weight is orthogonal to it and scales as
1 / |a|), so a fan-in 30x larger than its neighbours barely trains.
"""
from __future__ import annotations

import math

import torch

from .site import Neurons, Site

NORMALIZE = ("none", "fan_in")


def _fan_in_norms(w1: torch.Tensor) -> torch.Tensor:
    return w1.detach().double().reshape(w1.shape[0], -1).norm(dim=1)


def _fan_out_norms(w2: torch.Tensor) -> torch.Tensor:
    return w2.detach().double().transpose(0, 1).reshape(w2.shape[1], -1).norm(dim=1)


def existing_norms(site: Site) -> tuple[float, float]:
    """(mean fan-in norm, mean fan-out norm) of the site's current neurons (nan, nan at width 0)."""
    if site.width == 0:
        return math.nan, math.nan
    return float(_fan_in_norms(site.l1.weight).mean()), float(_fan_out_norms(site.l2.weight).mean())


def neuron_norms(w1: torch.Tensor, w2: torch.Tensor) -> tuple[float, float]:
    """(mean fan-in norm, mean fan-out norm) of neurons with fan-in rows w1 (K, ...) and fan-out
    columns w2 (m, K, ...), e.g. the new slices of L1 / L2 after insertion (nan, nan if K = 0)."""
    if w1.shape[0] == 0:
        return math.nan, math.nan
    return float(_fan_in_norms(w1).mean()), float(_fan_out_norms(w2).mean())


def rebalance_factors(site: Site, w1: torch.Tensor) -> torch.Tensor:
    """c_k (module doc) for new fan-in rows w1 (K, ...) at `site`, float64 on w1's device."""
    norms = _fan_in_norms(w1)
    ref = existing_norms(site)[0] if site.width else math.sqrt(2.0)
    return torch.where(norms > 0, ref / norms.clamp_min(1e-300), torch.ones_like(norms))


def rebalance(neurons: Neurons, c: torch.Tensor) -> Neurons:
    """Neurons with fan-in (and bias) times c_k and fan-out divided by c_k."""
    c = c.to(neurons.w1)
    cin = c.view(-1, *([1] * (neurons.w1.dim() - 1)))
    cout = c.view(1, -1, *([1] * (neurons.w2.dim() - 2)))
    b1 = None if neurons.b1 is None else neurons.b1 * c
    return Neurons(neurons.w1 * cin, b1, neurons.w2 / cout)
