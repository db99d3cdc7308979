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

growth.normalize, the choices (`normalized` does the last two; K new neurons, r_in / r_out the
site's reference norms: the existing neurons' mean fan-in / fan-out norm, at width 0 He's
expectations sqrt(2) and sqrt(2 m / K), m = L2's output width, the latter GradMax's own reference):
    none      as solved, at the searched amplitude gamma.
    fan_in    after the search, c_k = r_in / |a_k| (above): fan-ins at r_in, the same function.
    fan_out   after the search, the fan-out as inserted (W2 column times surgery's per-channel
              factor f_k: sqrt(var_k + eps) with bn_init=unit on an affine BatchNorm, else 1) put at
              r_out, the same function: c_k = |w_k| f_k / r_out (1 where the fan-out is 0), the
              column divided by c_k and c_k moved before sigma, onto the new BN channel's weight
              and bias when the site has an affine BatchNorm (insert_neurons(bn_weight=c): the
              fan-in's scale means nothing to BN), else onto the fan-in and bias (moments c_k m,
              c_k^2 v) as fan_in does. Fan-ins keep their searched scale.
    mean_norm GradMax's rule (google-research/growneuron, layers.grow_new_layer,
              scale_method="mean_norm": each new weight vector normalised to norm
              scale x the mean norm of the existing ones of that layer) for every method: fan-ins
              at r_in (c_k as fan_in; a zero fan-in stays 0, GradMax's epsilon = 0), fan-outs as
              inserted at s r_out, s = growth.gradmax_scale: w_k -> w_k s r_out / (|w_k| f_k)
              (f_k as for fan_out, from the rescaled moments). The norms are the amplitude, so
              there is no line search: gamma = 1, L(1) measured and logged, the neurons inserted
              even when it is above L(0) (as GradMax and firefly insert theirs). Not function
              preserving for methods with a non-zero fan-in; the neuron's contribution is its
              proposal's times g_k = c_k s r_out / (|w_k| f_k), so the predicted first-order change
              is sum_k g_k s0 alpha_k^T M1 omega_k. For growth=gradmax (fan-in 0, fan-outs already
              s x the same reference) it gives GradMax's own neurons (up to float rounding).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from growrun.models.site import Neurons, Site
from .surgery import fanout_scale

NORMALIZE = ("none", "fan_in", "fan_out", "mean_norm")


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


def reference_norms(site: Site, k: int) -> tuple[float, float]:
    """(r_in, r_out) of the module doc for k new neurons at `site`."""
    if site.width:
        return existing_norms(site)
    return math.sqrt(2.0), math.sqrt(2.0 * site.out_width / max(k, 1))


class Normalized(NamedTuple):
    """What to insert: insert_neurons(site, neurons, mean, var, bn_weight=bn_weight); gain: each
    neuron's contribution relative to the one given to `normalized` (float64, K; 1: the same)."""
    neurons: Neurons
    mean: torch.Tensor | None
    var: torch.Tensor | None
    bn_weight: torch.Tensor | None
    gain: torch.Tensor


def normalized(site: Site, neurons: Neurons, mean: torch.Tensor | None, var: torch.Tensor | None, how: str,
               bn_init: str = "unit", scale: float = 0.5) -> Normalized:
    """The neurons (at their amplitude, moments m, v of their pre-activations or None without
    BatchNorm) under growth.normalize=`how` (module doc); scale: growth.gradmax_scale (mean_norm)."""
    if how not in NORMALIZE:
        raise ValueError(f"normalize={how!r}; allowed: {', '.join(NORMALIZE)}")
    k = neurons.count
    gain = torch.ones(k, dtype=torch.float64, device=neurons.w1.device)
    if how == "none":
        return Normalized(neurons, mean, var, None, gain)
    if how in ("fan_in", "mean_norm"):
        c = rebalance_factors(site, neurons.w1)
        neurons, mean, var = _moved_before_sigma(neurons, mean, var, c)  # the same function
        if how == "fan_in":
            return Normalized(neurons, mean, var, None, gain)
    f = fanout_scale(site, mean, var, bn_init)
    norms = _fan_out_norms(neurons.w2) * (1.0 if f is None else f.detach().double().to(neurons.w2.device))
    r_out = reference_norms(site, k)[1]
    if how == "mean_norm":
        g = torch.where(norms > 0, scale * r_out / norms.clamp_min(1e-300), torch.ones_like(norms))
        out = Neurons(neurons.w1, neurons.b1, _columns_times(neurons.w2, g))
        return Normalized(out, mean, var, None, g.to(gain))
    c = torch.where(norms > 0, norms / r_out, torch.ones_like(norms))  # fan_out
    if site.bn is not None and site.bn.affine:  # insert_neurons divides the columns by bn_weight
        return Normalized(neurons, mean, var, c.to(neurons.w1), gain)
    neurons, mean, var = _moved_before_sigma(neurons, mean, var, c)
    return Normalized(neurons, mean, var, None, gain)


def _moved_before_sigma(neurons: Neurons, mean, var, c: torch.Tensor):
    """rebalance(neurons, c) with the moments of the pre-activations (c m, c^2 v)."""
    if mean is not None:
        cm = c.to(mean)
        mean, var = cm * mean, cm * cm * var
    return rebalance(neurons, c), mean, var


def _columns_times(w2: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W2 columns (dim 1) times g_k."""
    return w2 * g.to(w2).view(1, -1, *([1] * (w2.dim() - 2)))
