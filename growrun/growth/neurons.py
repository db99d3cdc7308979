"""What every growth method's proposal is made of (tiny_math.md, sections 3, 4, 6): the pieces
the methods in growrun.growth.methods share.

    Proposal         what a method proposes for one site: the neurons in the layers' shapes
                     (site.Neurons) at amplitude 1, the TINY spectrum, the site's bottleneck Psi
                     and best update dW2*, and the predicted first-order change of the mean loss
                     per gamma^2
    fit_site         a site's statistics normalised on the solve device, its best update dW2*
                     and bottleneck Psi (every method logs them), after checking them against the site
    SiteFit.proposal a Proposal from fan-ins alpha and fan-outs omega (tiny, gradmax, random, zero)
    SiteFit.of       a Proposal from neurons a method made itself (firefly, splitting, net2net)
    to_neurons       alpha (K, d1), omega (K, m) -> Neurons in the layers' shapes
    reference_norm, he_normal   the scales gradmax and random / zero draw at

Conventions
  * fan-in vectors live in x-space: L1's fan-in (conv: (C_in, kh, kw) flattened like
    weight.view(K, -1)) followed by the bias entry when L1 has a bias (-> Neurons.b1);
  * fan-out vectors live in L2's output space (R^m). For conv the new channel's L2 kernel is
    zero except its centre tap (kh2 // 2, kw2 // 2), which holds omega_k (conv_fanout="center");
    with conv_fanout="full" (methods with full_fanout: tiny, tiny_noproj) omega_k is the whole
    kernel slice, a vector of R^(m * kh2 * kw2) laid out like L2.weight[:, k] flattened
    (growrun.growth.fullconv, which documents the formulas and why it is only approximately optimal);
  * s0 = sigma'(0+) = 1 for "relu" and "identity".
Each method's own formulas are documented in its module (growrun/growth/methods/).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from growrun.models.site import Neurons, Site
from .solve import best_update, bottleneck
from .solve_device import moved, solve_device as pick_solve_device
from .stats import NormalizedStats, SiteStats
from .unfold import site_dims

SLOPE_AT_ZERO = {"relu": 1.0, "identity": 1.0}


@dataclass(eq=False)
class Proposal:
    """What a method proposes for one site (tensors float32 on the site's device).

    neurons: K new neurons at amplitude 1 (K may be below the requested count: TINY and GradMax
      return only directions above the rank threshold).
    lambdas: the whole TINY spectrum lambda (float64, decreasing; empty for other methods).
    bottleneck_gain: sum of lambda_k^2 over the kept neurons (linearised reduction of Psi).
    first_order: predicted change of the mean loss per gamma^2, s0 * sum_k alpha_k^T M1 omega_k.
    per_neuron: its terms s0 * alpha_k^T M1 omega_k, one per neuron (float64); firefly: each
      neuron's score s_k = (1/n) sum_i <g_i, c_k(x_i)>, exact to first order in gamma^2 (firefly.py).
    psi, d_w: the site's bottleneck Psi = g2 - d_W and the best update's first-order gain d_W.
    dw2, db2: the best update dW2* of L2's weight (L2's weight shape) and bias (or None).
    copy_of: net2net only: the existing neuron each new neuron copies (int64, K); the neurons
      are then made from the site's weights at insertion (net2net_copies). splitting: the
      existing neurons split (distinct), `neurons` then holds their split directions.
    copy_noise: net2net only: the fan-out noise, relative (growth.net2net_noise times N(0, 1)
      draws, L2's weight shape with K input units), or None.
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
    copy_of: torch.Tensor | None = None
    copy_noise: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.neurons.count

    def take(self, k: int) -> "Proposal":
        """The first k neurons (TINY and GradMax: the strongest), with their own first-order
        change and bottleneck gain (sum of their lambda_k^2)."""
        k = max(0, min(int(k), self.count))
        per = self.per_neuron[:k]
        return dataclasses.replace(self, neurons=self.neurons.take(k), per_neuron=per, first_order=float(per.sum()),
                                   bottleneck_gain=float(self.lambdas[:k].square().sum()),
                                   copy_of=None if self.copy_of is None else self.copy_of[:k],
                                   copy_noise=None if self.copy_noise is None else self.copy_noise[:, :k])


def to_neurons(site: Site, alpha: torch.Tensor, omega: torch.Tensor) -> Neurons:
    """Fan-ins alpha (K, d1) and fan-outs omega (K, m) -> Neurons in the layers' shapes.
    Conv: omega (K, m) fills the centre tap; omega (K, m * kh2 * kw2) is the whole kernel slice,
    w2[c, k, u, v] = omega[k, (c * kh2 + u) * kw2 + v] (conv_fanout="full", fullconv.py)."""
    l1, l2 = site.l1, site.l2
    dev, dt = l1.weight.device, l1.weight.dtype
    K = alpha.shape[0]
    alpha, omega = alpha.to(dev, dt), omega.to(dev, dt)
    b1 = alpha[:, -1].contiguous() if l1.bias is not None else None
    w1 = (alpha[:, :-1] if l1.bias is not None else alpha).reshape(K, *l1.weight.shape[1:]).contiguous()
    if site.is_conv:
        kh, kw = l2.kernel_size
        if omega.shape[1] == site.out_width * kh * kw:
            w2 = omega.reshape(K, site.out_width, kh, kw).transpose(0, 1).contiguous()
        else:
            w2 = omega.new_zeros(site.out_width, K, kh, kw)
            w2[:, :, kh // 2, kw // 2] = omega.T
    else:
        w2 = omega.T.contiguous()
    return Neurons(w1, b1, w2)


def reference_norm(site: Site, K: int) -> float:
    """Mean norm of the existing fan-outs W2[:, j] (width-0: He expectation sqrt(2 m / K))."""
    W2 = site.l2.weight.detach().to(torch.float64)
    if site.width == 0:
        return math.sqrt(2.0 * site.out_width / max(K, 1))
    return float(W2.transpose(0, 1).reshape(site.width, -1).norm(dim=1).mean())


def he_normal(shape, fan_in: int, generator) -> torch.Tensor:
    """He (kaiming normal, fan_in) draws N(0, 2 / fan_in), float64, on the generator's device."""
    dev = generator.device if generator is not None else "cpu"
    std = math.sqrt(2.0 / fan_in) if fan_in > 0 else 0.0
    return torch.randn(*shape, generator=generator, dtype=torch.float64, device=dev) * std


@dataclass(eq=False)
class SiteFit:
    """A site's statistics as every method starts from them (fit_site): normalised float64
    statistics on the solve device, the best update dW2*^T (d2, m), its gain d_W, Psi, s0."""
    site: Site
    stats: SiteStats
    ns: NormalizedStats
    dW2T: torch.Tensor
    d_w: float
    psi: float
    s0: float

    @property
    def device(self) -> torch.device:
        return self.ns.S1.device

    def proposal(self, method: str, alpha: torch.Tensor, omega: torch.Tensor, M1: torch.Tensor | None = None,
                 lambdas: torch.Tensor | None = None, gain: float = 0.0) -> Proposal:
        """The Proposal of fan-ins alpha (K, d1) and fan-outs omega (K, m; or whole kernels against
        M1 = M1full): per-neuron first order s0 alpha_k^T M1 omega_k."""
        M1 = self.ns.M1 if M1 is None else M1
        lambdas = torch.zeros(0, dtype=torch.float64) if lambdas is None else lambdas
        per_neuron = self.s0 * (alpha @ M1.to(alpha) * omega).sum(1)  # s0 alpha_k^T M1 omega_k
        dw2, db2 = self.best_update()
        return Proposal(method, to_neurons(self.site, alpha, omega), lambdas.to(dw2.device), gain,
                        float(per_neuron.sum()), self.psi, self.d_w, dw2, db2, per_neuron.to(dw2.device))

    def of(self, method: str, neurons: Neurons, per_neuron: torch.Tensor, *, first_order: float | None = None,
           copy_of: torch.Tensor | None = None, copy_noise: torch.Tensor | None = None) -> Proposal:
        """The Proposal of neurons a method made itself, with their predicted changes per gamma^2
        (first_order: their sum unless given)."""
        dw2, db2 = self.best_update()
        per_neuron = per_neuron.to(dw2.device, torch.float64)
        first = float(per_neuron.sum()) if first_order is None else first_order
        return Proposal(method, neurons, torch.zeros(0, dtype=torch.float64, device=dw2.device), 0.0, first,
                        self.psi, self.d_w, dw2, db2, per_neuron, copy_of=copy_of, copy_noise=copy_noise)

    def best_update(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dW2* in L2's weight shape and its bias part (or None), on L2's device and dtype."""
        site, D = self.site, self.dW2T.T  # (m, d2)
        db2 = None
        if site.l2.bias is not None:
            db2, D = D[:, -1], D[:, :-1]
        wdev, wdt = site.l2.weight.device, site.l2.weight.dtype
        return D.reshape(site.l2.weight.shape).to(wdev, wdt), None if db2 is None else db2.to(wdev, wdt)


def fit_site(site: Site, stats: SiteStats, method: str, *, full_fanout: bool = False, conv_fanout: str = "center",
             solve_device: str = "auto", rel_eps: float = 1e-7) -> SiteFit:
    """The site's statistics checked against it and normalised on growth.solve_device
    (solve_device.py: float64 solves), its best update dW2* and bottleneck Psi. full_fanout:
    whether `method` can use conv_fanout="full" on a conv site (else refused, as is "full"
    without statistics collected for it)."""
    if conv_fanout not in ("center", "full"):
        raise ValueError(f"conv_fanout={conv_fanout!r}; allowed: center, full")
    full = conv_fanout == "full" and site.is_conv
    if full and not full_fanout:
        raise ValueError(f"conv_fanout='full': not with method={method!r} on conv site {site.name}; "
                         f"use a method with full fan-outs (tiny, tiny_noproj) or conv_fanout='center'")
    if full and stats.full is None:
        raise ValueError(f"site {site.name}: conv_fanout='full' needs statistics collected with "
                         f"conv_fanout='full' (stats.collect_statistics)")
    if stats.dims != site_dims(site):
        raise ValueError(f"site {site.name}: statistics have dims {stats.dims}, the site needs "
                         f"{site_dims(site)} (stale statistics?)")
    ns = moved(stats.normalized(), pick_solve_device(stats.S1.device, solve_device))
    dW2T, d_w = best_update(ns.S2, ns.M2, rel_eps)
    return SiteFit(site, stats, ns, dW2T, d_w, bottleneck(ns.g2, d_w), SLOPE_AT_ZERO[site.activation])
