"""New neurons of one site by every method (tiny_math.md, sections 3, 4, 6).

`propose(site, stats, method, count)` turns a site's statistics into a Proposal: the neurons in
the layers' own shapes (site.Neurons), the TINY spectrum, the site's bottleneck Psi and best
update dW2*, and the predicted first-order change of the mean loss per gamma^2.

Conventions
  * fan-in vectors live in x-space: L1's fan-in (conv: (C_in, kh, kw) flattened like
    weight.view(K, -1)) followed by the bias entry when L1 has a bias (-> Neurons.b1);
  * fan-out vectors live in L2's output space (R^m). For conv the new channel's L2 kernel is
    zero except its centre tap (kh2 // 2, kw2 // 2), which holds omega_k (conv_fanout="center");
  * s0 = sigma'(0+) = 1 for "relu" and "identity".
Methods
  * tiny / tiny_noproj: solve.tiny_solve with N = -M1 + P S2^+ M2, resp. N = -M1.
  * gradmax: fan-in 0; omega_k = top-K right singular vectors of M1, each of norm
    gradmax_scale * (mean norm of the existing fan-outs W2[:, j], for conv the whole kernel
    slice). Width-0 site: the reference is the norm an L2 column has in expectation under He
    init of L2 at its new width K: sqrt(m * kk * 2 / (K * kk)) = sqrt(2 m / K).
  * random: He (kaiming normal, fan_in) draws: fan-in entries N(0, 2 / fan_in(L1)) with bias 0,
    fan-out entries N(0, 2 / ((width + K) * kh2 * kw2)) (L2's fan-in after growth; for conv at the
    centre tap like every other method). Then omega_k -> -omega_k wherever alpha_k^T M1 omega_k
    > 0: the same random direction with the sign whose first-order loss change is <= 0.
  * zero: fan-in as random, fan-out 0 (function preserving, first order 0).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .site import Neurons, Site
from .solve import best_update, bottleneck, gradmax_directions, tiny_matrix, tiny_solve
from .stats import SiteStats
from .unfold import site_dims

METHODS = ("tiny", "tiny_noproj", "gradmax", "random", "zero")
SLOPE_AT_ZERO = {"relu": 1.0, "identity": 1.0}


@dataclass(eq=False)
class Proposal:
    """What a method proposes for one site (tensors float32 on the site's device).

    neurons: K new neurons at amplitude 1 (K may be below the requested count: TINY and GradMax
      return only directions above the rank threshold).
    lambdas: the whole TINY spectrum lambda (float64, decreasing; empty for other methods).
    bottleneck_gain: sum of lambda_k^2 over the kept neurons (linearised reduction of Psi).
    first_order: predicted change of the mean loss per gamma^2, s0 * sum_k alpha_k^T M1 omega_k.
    per_neuron: its terms s0 * alpha_k^T M1 omega_k, one per neuron (float64).
    psi, d_w: the site's bottleneck Psi = g2 - d_W and the best update's first-order gain d_W.
    dw2, db2: the best update dW2* of L2's weight (L2's weight shape) and bias (or None).
    """

    method: str
    neurons: Neurons
    lambdas: torch.Tensor
    bottleneck_gain: float
    first_order: float
    psi: float
    d_w: float
    dw2: torch.Tensor
    db2: torch.Tensor | None
    per_neuron: torch.Tensor

    @property
    def count(self) -> int:
        return self.neurons.count

    def take(self, k: int) -> "Proposal":
        """The first k neurons (TINY and GradMax: the strongest), with their own first-order
        change and bottleneck gain (sum of their lambda_k^2)."""
        k = max(0, min(int(k), self.count))
        per = self.per_neuron[:k]
        return dataclasses.replace(self, neurons=self.neurons.take(k), per_neuron=per, first_order=float(per.sum()),
                                   bottleneck_gain=float(self.lambdas[:k].square().sum()))


def to_neurons(site: Site, alpha: torch.Tensor, omega: torch.Tensor) -> Neurons:
    """Fan-ins alpha (K, d1) and fan-outs omega (K, m) -> Neurons in the layers' shapes."""
    l1, l2 = site.l1, site.l2
    dev, dt = l1.weight.device, l1.weight.dtype
    K = alpha.shape[0]
    alpha, omega = alpha.to(dev, dt), omega.to(dev, dt)
    b1 = alpha[:, -1].contiguous() if l1.bias is not None else None
    w1 = (alpha[:, :-1] if l1.bias is not None else alpha).reshape(K, *l1.weight.shape[1:]).contiguous()
    if site.is_conv:
        kh, kw = l2.kernel_size
        w2 = omega.new_zeros(site.out_width, K, kh, kw)
        w2[:, :, kh // 2, kw // 2] = omega.T
    else:
        w2 = omega.T.contiguous()
    return Neurons(w1, b1, w2)


def _reference_norm(site: Site, K: int) -> float:
    """Mean norm of the existing fan-outs W2[:, j] (width-0: He expectation sqrt(2 m / K))."""
    W2 = site.l2.weight.detach().to(torch.float64)
    if site.width == 0:
        return math.sqrt(2.0 * site.out_width / max(K, 1))
    return float(W2.transpose(0, 1).reshape(site.width, -1).norm(dim=1).mean())


def _he(shape, fan_in: int, generator) -> torch.Tensor:
    dev = generator.device if generator is not None else "cpu"
    std = math.sqrt(2.0 / fan_in) if fan_in > 0 else 0.0
    return torch.randn(*shape, generator=generator, dtype=torch.float64, device=dev) * std


def propose(site: Site, stats: SiteStats, method: str, count: int, *, conv_fanout: str = "center",
            gradmax_scale: float = 0.5, rel_eps: float = 1e-7,
            generator: torch.Generator | None = None) -> Proposal:
    """Neurons of `method` for `site` from its statistics (see the module doc for each method)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    if conv_fanout not in ("center", "full"):
        raise ValueError(f"conv_fanout={conv_fanout!r}; allowed: center, full")
    if conv_fanout == "full" and site.is_conv:
        raise NotImplementedError("conv_fanout='full' is not implemented; use 'center'")
    if stats.dims != site_dims(site):
        raise ValueError(f"site {site.name}: statistics have dims {stats.dims}, the site needs "
                         f"{site_dims(site)} (stale statistics?)")
    count = max(int(count), 0)
    ns = stats.normalized()
    s0 = SLOPE_AT_ZERO[site.activation]
    dev = ns.S1.device
    dW2T, d_w = best_update(ns.S2, ns.M2, rel_eps)
    psi = bottleneck(ns.g2, d_w)
    d1, _, m = stats.dims
    lambdas = torch.zeros(0, dtype=torch.float64)
    gain = 0.0
    if method in ("tiny", "tiny_noproj"):
        N = tiny_matrix(ns.M1, ns.P, dW2T) if method == "tiny" else tiny_matrix(ns.M1)
        sol = tiny_solve(ns.S1, N, ns.M1, count, rel_eps=rel_eps, s0=s0, g2=ns.g2)
        alpha, omega, lambdas, gain = sol.alpha, sol.omega, sol.lambdas, sol.gain
    elif method == "gradmax":
        dirs, _ = gradmax_directions(ns.M1, count, rel_eps)
        omega = dirs * (gradmax_scale * _reference_norm(site, dirs.shape[0]))
        alpha = torch.zeros(dirs.shape[0], d1, dtype=torch.float64, device=dev)
    else:
        bias1 = site.l1.bias is not None
        alpha = _he((count, d1), d1 - bias1, generator).to(dev)
        if bias1:
            alpha[:, -1] = 0.0
        if method == "zero":
            omega = torch.zeros(count, m, dtype=torch.float64, device=dev)
        else:
            kk = site.l2.kernel_size[0] * site.l2.kernel_size[1] if site.is_conv else 1
            omega = _he((count, m), (site.width + count) * kk, generator).to(dev)
            per = (alpha @ ns.M1 * omega).sum(1)  # alpha_k^T M1 omega_k
            omega = torch.where((per > 0).unsqueeze(1), -omega, omega)
    per_neuron = s0 * (alpha @ ns.M1.to(alpha) * omega).sum(1)  # s0 alpha_k^T M1 omega_k
    D = dW2T.T  # (m, d2)
    db2 = None
    if site.l2.bias is not None:
        db2, D = D[:, -1], D[:, :-1]
    wdev, wdt = site.l2.weight.device, site.l2.weight.dtype
    dw2 = D.reshape(site.l2.weight.shape).to(wdev, wdt)
    return Proposal(method, to_neurons(site, alpha, omega), lambdas.to(wdev), gain, float(per_neuron.sum()), psi, d_w,
                    dw2, None if db2 is None else db2.to(wdev, wdt), per_neuron)
