"""New neurons of one site by every method (tiny_math.md, sections 3, 4, 6).

`propose(site, stats, method, count)` turns a site's statistics into a Proposal: the neurons in
the layers' own shapes (site.Neurons), the TINY spectrum, the site's bottleneck Psi and best
update dW2*, and the predicted first-order change of the mean loss per gamma^2.

Conventions
  * fan-in vectors live in x-space: L1's fan-in (conv: (C_in, kh, kw) flattened like
    weight.view(K, -1)) followed by the bias entry when L1 has a bias (-> Neurons.b1);
  * fan-out vectors live in L2's output space (R^m). For conv the new channel's L2 kernel is
    zero except its centre tap (kh2 // 2, kw2 // 2), which holds omega_k (conv_fanout="center");
    with conv_fanout="full" (tiny and tiny_noproj only) omega_k is the whole kernel slice,
    a vector of R^(m * kh2 * kw2) laid out like L2.weight[:, k] flattened (growrun.growth.fullconv,
    which documents the formulas and why it is only approximately optimal); every other method
    refuses conv_fanout="full" on conv sites (gradmax, random, zero and firefly use the centre
    tap, net2net copies whole kernel slices anyway: run them with conv_fanout="center");
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
  * net2net (Net2WiderNet, Chen, Goodfellow, Shlens, ICLR 2016): each new neuron copies an
    existing neuron j of the site (Proposal.copy_of): its L1 row (+ bias) and, at insertion, its
    BatchNorm channel (weight, bias, running mean / variance: surgery.insert_copies), so the copy
    computes exactly j's activation, in training mode (identical batch statistics) and in eval
    mode. The fan-out W2[:, j] (conv: the whole input-channel kernel slice) is split among the
    r_j = 1 + (copies of j) replicas: each gets W2[:, j] / r_j, so the function is unchanged
    (first order 0, no line search, gamma = 1). Which neurons are copied
    (growth.net2net_pick): "random" (a random permutation of the site's neurons, cycled when
    more neurons are requested than exist: spread without replacement as far as possible) or
    "largest" (the neurons by decreasing fan-out norm |W2[:, j]|, ties by index, cycled).
    Symmetry-breaking noise (growth.net2net_noise = s > 0): copy k of j gets W2[:, j] / r_j +
    e_k and j itself W2[:, j] / r_j - sum_k e_k, e_k ~ N(0, (s rms(W2[:, j] / r_j))^2) per entry:
    the replicas' fan-outs differ (so do their gradients) while their sum, hence the function,
    stays exactly the same (the paper's noise on the new fan-ins would change the function).
    Copies are made from the site's weights at insertion (net2net_copies), so a neighbouring site
    grown earlier in the same event is copied as it is then. A site of width 0 has nothing to
    copy (refused up front: growrun/config/growable.py).
  * firefly (Firefly neural architecture descent, Wu, Liu, Stone, Liu, NeurIPS 2020): new
    neurons drawn at small scale, trained for a few steps on the statistics batches, the `count`
    of largest first-order loss decrease kept (growrun.growth.firefly, which documents the
    formulas and the reference code). It needs the model and the statistics batches, not only
    the statistics: propose(..., firefly=hook), hook(site, count) -> (Neurons, per-neuron
    first-order change per gamma^2), made by firefly.proposer (the controller does so per site).
  * splitting (splitting steepest descent, Liu, Wang, Wu, Liu, NeurIPS 2019): existing neurons i
    split into w_i +- gamma v_i with half the fan-out each, v_i the eigenvector of the most
    negative eigenvalue of i's splitting matrix (growrun.growth.splitting documents the formulas).
    Proposal.copy_of: the split neurons; Proposal.neurons: their split directions v_k (fan-in
    shape; w2 = W2[:, i] / 2); per_neuron / first_order: the predicted change per gamma^2, second
    order in gamma: (1/2) lambda_min,k r^2. propose(..., splitting=hook), hook(site, count) ->
    (split neurons, directions, per-neuron change), made by splitting.event_hook.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import fullconv
from .site import Neurons, Site
from .solve import best_update, bottleneck, gradmax_directions, tiny_matrix, tiny_solve
from .solve_device import moved, solve_device as pick_solve_device
from .stats import SiteStats
from .unfold import site_dims

METHODS = ("tiny", "tiny_noproj", "gradmax", "random", "zero", "net2net", "firefly", "splitting")
FULL_FANOUT_METHODS = ("tiny", "tiny_noproj")  # conv_fanout="full" on conv sites (fullconv.py)
NET2NET_PICKS = ("random", "largest")
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
            generator: torch.Generator | None = None, net2net_pick: str = "random",
            net2net_noise: float = 0.0, solve_device: str = "auto", firefly=None, splitting=None) -> Proposal:
    """Neurons of `method` for `site` from its statistics (see the module doc for each method).
    firefly: method "firefly" only, the hook (site, count) -> (Neurons, per-neuron first-order
    change) that trains and selects its candidates (growrun.growth.firefly.proposer).
    splitting: method "splitting" only, the hook (site, count) -> (split neurons, directions,
    per-neuron change per gamma^2) (growrun.growth.splitting.event_hook)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    if net2net_pick not in NET2NET_PICKS:
        raise ValueError(f"net2net_pick={net2net_pick!r}; allowed: {', '.join(NET2NET_PICKS)}")
    if conv_fanout not in ("center", "full"):
        raise ValueError(f"conv_fanout={conv_fanout!r}; allowed: center, full")
    full = conv_fanout == "full" and site.is_conv
    if full and method not in FULL_FANOUT_METHODS:
        raise ValueError(f"conv_fanout='full': not with method={method!r} on conv site {site.name}; "
                         f"allowed: {', '.join(FULL_FANOUT_METHODS)} (or conv_fanout='center')")
    if full and stats.full is None:
        raise ValueError(f"site {site.name}: conv_fanout='full' needs statistics collected with "
                         f"conv_fanout='full' (stats.collect_statistics)")
    if stats.dims != site_dims(site):
        raise ValueError(f"site {site.name}: statistics have dims {stats.dims}, the site needs "
                         f"{site_dims(site)} (stale statistics?)")
    count = max(int(count), 0)
    # float64 solves on growth.solve_device (solve_device.py); the Proposal comes back on the site's device
    ns = moved(stats.normalized(), pick_solve_device(stats.S1.device, solve_device))
    s0 = SLOPE_AT_ZERO[site.activation]
    dev = ns.S1.device
    dW2T, d_w = best_update(ns.S2, ns.M2, rel_eps)
    psi = bottleneck(ns.g2, d_w)
    d1, _, m = stats.dims
    lambdas = torch.zeros(0, dtype=torch.float64)
    gain = 0.0
    if method == "net2net":
        return _net2net_proposal(site, count, net2net_pick, net2net_noise, generator, psi, d_w, dW2T)
    if method == "firefly":
        return _firefly_proposal(site, count, firefly, psi, d_w, dW2T)
    if method == "splitting":
        return _splitting_proposal(site, count, splitting, psi, d_w, dW2T)
    M1 = ns.M1  # (d1, m); conv_fanout="full": M1full (d1, m * kh2 * kw2), omega whole kernels
    if full:
        fs = fullconv.normalized(stats.full, ns.n, stats.dims[1], dev)
        M1 = fs.M1
        N = fullconv.full_matrix(fs.M1, fs.P, dW2T) if method == "tiny" else fullconv.full_matrix(fs.M1)
        sol = fullconv.full_solve(fs, N, count, rel_eps=rel_eps, s0=s0, g2=ns.g2)
        alpha, omega, lambdas, gain = sol.alpha, sol.omega, sol.lambdas, sol.gain
    elif method in ("tiny", "tiny_noproj"):
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
    per_neuron = s0 * (alpha @ M1.to(alpha) * omega).sum(1)  # s0 alpha_k^T M1 omega_k
    dw2, db2 = _best_update_tensors(site, dW2T)
    return Proposal(method, to_neurons(site, alpha, omega), lambdas.to(dw2.device), gain, float(per_neuron.sum()),
                    psi, d_w, dw2, db2, per_neuron.to(dw2.device))


def _best_update_tensors(site: Site, dW2T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW2*^T (d2, m) -> (dW2* in L2's weight shape, its bias part or None), on L2's device and dtype."""
    D = dW2T.T  # (m, d2)
    db2 = None
    if site.l2.bias is not None:
        db2, D = D[:, -1], D[:, :-1]
    wdev, wdt = site.l2.weight.device, site.l2.weight.dtype
    return D.reshape(site.l2.weight.shape).to(wdev, wdt), None if db2 is None else db2.to(wdev, wdt)


# --- firefly ---------------------------------------------------------------------------------------

def _firefly_proposal(site: Site, count: int, firefly, psi: float, d_w: float, dW2T: torch.Tensor) -> Proposal:
    """firefly's Proposal: the hook's kept candidates (best first) and their scores."""
    if firefly is None:
        raise ValueError("method='firefly' trains candidates on the model and the statistics batches: pass "
                         "firefly=growrun.growth.firefly.proposer(model, batches, loss_fn, ...)")
    neurons, per_neuron = firefly(site, count)
    dw2, db2 = _best_update_tensors(site, dW2T)
    per_neuron = per_neuron.to(dw2.device, torch.float64)
    return Proposal("firefly", neurons, torch.zeros(0, dtype=torch.float64, device=dw2.device), 0.0,
                    float(per_neuron.sum()), psi, d_w, dw2, db2, per_neuron)


def _splitting_proposal(site: Site, count: int, hook, psi: float, d_w: float, dW2T: torch.Tensor) -> Proposal:
    """splitting's Proposal: the hook's split neurons (most negative lambda_min first), their
    directions (as `neurons`) and predicted changes per gamma^2."""
    if hook is None:
        raise ValueError("method='splitting' measures its splitting matrices on the model and the statistics "
                         "batches: pass splitting=growrun.growth.splitting.event_hook(...)")
    sources, directions, per_neuron = hook(site, count)
    dw2, db2 = _best_update_tensors(site, dW2T)
    per_neuron = per_neuron.to(dw2.device, torch.float64)
    return Proposal("splitting", directions, torch.zeros(0, dtype=torch.float64, device=dw2.device), 0.0,
                    float(per_neuron.sum()), psi, d_w, dw2, db2, per_neuron, copy_of=sources)


# --- net2net (Net2WiderNet) ---------------------------------------------------------------------

def _fanout_norms(site: Site) -> torch.Tensor:
    """|W2[:, j]| per existing neuron j (conv: the whole kernel slice), float64."""
    W2 = site.l2.weight.detach().to(torch.float64)
    return W2.transpose(0, 1).reshape(site.width, -1).norm(dim=1)


def net2net_sources(site: Site, count: int, pick: str = "random",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The existing neuron each of `count` new neurons copies (int64 on L1's device): an order of
    the site's neurons (random: a permutation drawn by `generator`; largest: by decreasing fan-out
    norm, ties by index), cycled when count exceeds the width."""
    if pick not in NET2NET_PICKS:
        raise ValueError(f"net2net_pick={pick!r}; allowed: {', '.join(NET2NET_PICKS)}")
    dev = site.l1.weight.device
    count = max(int(count), 0)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    if site.width == 0:
        raise ValueError(f"site {site.name}: net2net copies existing neurons; a site of width 0 has none")
    if pick == "largest":
        order = torch.argsort(-_fanout_norms(site), stable=True)
    else:
        gdev = generator.device if generator is not None else "cpu"
        order = torch.randperm(site.width, generator=generator, device=gdev)
    return order.to(dev)[torch.arange(count, device=dev) % site.width]


def net2net_copies(site: Site, sources: torch.Tensor,
                   noise: torch.Tensor | None = None) -> tuple[Neurons, torch.Tensor]:
    """(the new neurons, the new value of L2's weight) for copies of the site's neurons
    `sources`, from the site's current weights (module doc): fan-in rows and bias entries copied,
    every replica of j (j and its copies) with fan-out W2[:, j] / r_j. `noise` (relative, L2's
    weight shape with len(sources) input units; fewer output rows are zero-padded: outputs added
    since it was drawn) adds e_k = noise_k * rms(W2[:, j] / r_j) to copy k and -e_k to j."""
    W1, W2 = site.l1.weight.detach(), site.l2.weight.detach()
    sources = sources.to(W1.device, torch.long)
    K = sources.numel()
    view = (1, -1, *([1] * (W2.dim() - 2)))
    replicas = 1 + torch.bincount(sources, minlength=site.width)[: site.width]
    split = W2 / replicas.to(W2).view(view)
    w2 = split.index_select(1, sources).clone()
    if noise is not None and K:
        noise = noise.to(W2)
        if noise.shape[0] < W2.shape[0]:
            noise = torch.cat([noise, noise.new_zeros(W2.shape[0] - noise.shape[0], *noise.shape[1:])])
        rms = w2.transpose(0, 1).reshape(K, -1).square().mean(1).sqrt()
        e = noise * rms.view(view)
        w2 = w2 + e
        split = split.index_add(1, sources, -e)
    b1 = None if site.l1.bias is None else site.l1.bias.detach().index_select(0, sources).clone()
    return Neurons(W1.index_select(0, sources).clone(), b1, w2), split


def _net2net_proposal(site: Site, count: int, pick: str, noise: float, generator, psi: float, d_w: float,
                      dW2T: torch.Tensor) -> Proposal:
    """net2net's Proposal: copies of `count` neurons (function preserving: first order 0)."""
    sources = net2net_sources(site, count, pick, generator)
    K = sources.numel()
    rel = None
    if noise > 0 and K:
        gdev = generator.device if generator is not None else "cpu"
        shape = (site.out_width, K, *site.l2.weight.shape[2:])
        rel = noise * torch.randn(*shape, generator=generator, dtype=torch.float64, device=gdev)
        rel = rel.to(site.l2.weight)
    neurons, _ = net2net_copies(site, sources, rel)
    dw2, db2 = _best_update_tensors(site, dW2T)
    per_neuron = torch.zeros(K, dtype=torch.float64, device=dw2.device)
    return Proposal("net2net", neurons, torch.zeros(0, dtype=torch.float64, device=dw2.device), 0.0, 0.0, psi, d_w,
                    dw2, db2, per_neuron, copy_of=sources, copy_noise=rel)
