"""Adaptive neuron count: keep the TINY neurons whose gain stands above sampling noise.

tiny_math.md section 7. In-sample singular values lambda_k are biased upwards by noise (a pure
noise N still has lambda_1^2 ~ (sqrt(d1) + sqrt(m))^2 sigma^2 / n), so they cannot be compared
with zero. The rule therefore *cross-fits*, using the per-fold sums of SiteStats (samples dealt
into F >= 2 folds f with n_f samples, weights w_f = n_f / n):

  1. N_f = X_f^T V_perp,f / n_f per fold, each fold projected with its own best update
     dW2*_f^T = -S2^+ M2_f, and the whitened Z_f = S1^(-1/2) N_f. The metrics S1, S2 are the
     full-data ones: they do not involve the targets, so sharing them leaks no noise between
     folds, whereas a shared projection (full-data M2) would correlate the folds' noise
     negatively and bias the held-out gains below zero.
  2. For every fold f, fit the TINY directions (u_k, w_k, lambda_k) on the other folds
     (N_-f = weighted mean of the N_g, g != f) and measure on fold f the held-out alignment
         c_k^(f) = u_k^T Z_f w_k = w_k^T N_-f^T S1^+ N_f w_k / lambda_k,
     the component of fold f's bottleneck along the direction fitted without it. Its
     expectation is the true signal along that direction (0 for a direction that is noise).
  3. Noise level: the differences D_f = N_f - N contain no signal, only the folds' sampling
     noise. With E the whitened noise of the full-data Z, modelled as Cov(E_ij, E_kl) =
     R_ik C_jl (a separable, Kronecker model: input-side covariance R, output-side C),
         E[E^T E] = C tr R  ~  sum_f n_f D_f^T S1^+ D_f / ((F - 1) n)            (m x m)
         E[E E^T] = R tr C  ~  the same with S1^(-1/2) D_f D_f^T S1^(-1/2)       (d1 x d1)
         tr R tr C = E|E|^2 ~  the trace of the first,
     (unbiased for iid samples), so the noise of fold f along a fixed unit pair (u, w) has
         tau^2 = (n / n_f) (u^T E[E E^T] u) (w^T E[E^T E] w) / E|E|^2.
     Only u^T S1^(-1/2) D_f, never the d1 x d1 matrix, is needed. The separable model captures
     that conv noise is anisotropic in the input space (correlated positions), which an
     isotropic model (R = I) misses: in simulations it under-estimated conv noise up to ~1.4x.
     Along a fitted noise direction u_k the input-side estimate is inflated (u_k was chosen
     where the other folds' noise is large), which makes the rule conservative for noise
     directions and leaves signal directions (chosen by the signal) unaffected.
  4. c_k = sum_f w_f c_k^(f) with standard error se_k = sum_f w_f tau_k^(f). The c_k^(f) are
     positively correlated (the fits of different f share folds; with F = 2 each fold is the
     other's fitting set), so this bound (the SD of a sum is at most the sum of the SDs) is used
     rather than sqrt(sum_f w_f^2 tau^2), which would be too small. Neurons are kept for
     k = 1, 2, ... while c_k > noise_sigmas * se_k, up to max_count and the number of neurons
     above the solver's threshold on the full data.

Measured (tests/test_growth_neurons.py and 100-seed simulations, noise_sigmas = 2, folds = 2):
pure-noise sites get a neuron in 0-3% of draws (linear and conv, identity and ReLU); a linear
teacher whose missing bottleneck has rank r (singular values 1, 0.6, 0.3, noise 1) gives
exactly r from n ~ 1000 samples on, fewer below (weak directions not yet resolved). The
z-scores c_k / se_k are approximate (the ratio of two estimates from the same folds is biased
up by ~0.2 on conv nulls; the bound in step 4 and the inflation in step 3 compensate). Folds
are the samples dealt within each batch (stats.py), so with BatchNorm in train mode they are
weakly coupled through the batch statistics.
"""
from __future__ import annotations

import torch

from .solve import gram_eigh, psolve, tiny_matrix
from .solve_device import moved
from .stats import NormalizedStats, SiteStats


def cross_validated_gains(ns: NormalizedStats, *, projection: bool, rel_eps: float = 1e-7,
                          max_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, se): held-out alignments c_k and their standard errors (module doc, steps 1-4) for
    k < min(max_count, neurons available on the full data)."""
    live = [f for f, k in enumerate(ns.n_folds) if k > 0]
    if len(live) < 2:
        raise ValueError("the adaptive count needs statistics with at least 2 non-empty folds")
    nf = torch.tensor([float(ns.n_folds[f]) for f in live], dtype=torch.float64)
    n, F, (d1, m) = float(nf.sum()), len(live), ns.M1.shape
    w = nf / n
    if projection:
        D = psolve(ns.S2, torch.cat([ns.M2_folds[f] for f in live], dim=1), rel_eps)  # S2^+ M2_f
        Ns = [tiny_matrix(ns.M1_folds[f], ns.P_folds[f], -D[:, i * m:(i + 1) * m]) for i, f in enumerate(live)]
    else:
        Ns = [tiny_matrix(ns.M1_folds[f]) for f in live]
    Y = psolve(ns.S1, torch.cat(Ns, dim=1), rel_eps)
    K = (torch.cat(Ns, dim=1).T @ Y).view(F, m, F, m).permute(0, 2, 1, 3).cpu()  # K[f, g] = N_f^T S1^+ N_g

    def quad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (sum_f a_f N_f)^T S1^+ (sum_g b_g N_g)
        return torch.einsum("f,g,fgij->ij", a, b, K)

    avail = int(gram_eigh(quad(w, w), rel_eps, ns.g2)[2].sum())
    limit = min(avail, m if max_count is None else int(max_count))
    eye = torch.eye(F, dtype=torch.float64)
    dev = [eye[f] - w for f in range(F)]  # N_f - N = sum_g dev[f]_g N_g
    C = sum(nf[f] * quad(dev[f], dev[f]) for f in range(F)) / ((F - 1) * n)
    C = 0.5 * (C + C.T)
    total = float(torch.trace(C))
    c = torch.zeros(limit, dtype=torch.float64)
    se = torch.zeros(limit, dtype=torch.float64)
    for f in range(F):
        u = torch.where(torch.arange(F) == f, torch.zeros(()), nf) / (n - nf[f])
        mu, W, _ = gram_eigh(quad(u, u), rel_eps)
        Wk, muk = W[:, :limit], mu[:limit]
        ok = muk > 0
        inv = torch.where(ok, muk, torch.ones_like(muk)).rsqrt() * ok
        c += w[f] * (Wk * (quad(u, eye[f]) @ Wk)).sum(0) * inv
        # u_k^T R u_k with u_k = S1^(-1/2) N_-f w_k / lambda_k:  |D_g^T S1^+ N_-f w_k|^2 / lambda_k^2
        row = sum(nf[g] * (quad(dev[g], u) @ Wk).square().sum(0) for g in range(F)) / ((F - 1) * n) * inv ** 2
        var = row * (Wk * (C @ Wk)).sum(0) / total if total > 0 else torch.zeros_like(muk)
        se += w[f] * ((n / nf[f]) * var).clamp_min(0).sqrt()
    return c, se


def adaptive_count(stats: SiteStats, *, projection: bool, noise_sigmas: float, max_count: int,
                   rel_eps: float = 1e-7, device: torch.device | None = None) -> int:
    """Number of leading TINY neurons whose held-out gain exceeds noise_sigmas standard errors
    (module doc), at most max_count. Needs statistics collected with folds >= 2. device: where
    the float64 solves run (growth.solve_device; None: the statistics' device)."""
    if max_count <= 0:
        return 0
    ns = stats.normalized()
    c, se = cross_validated_gains(ns if device is None else moved(ns, device), projection=projection,
                                  rel_eps=rel_eps, max_count=max_count)
    above = c > noise_sigmas * se
    return int(above.long().cumprod(0).sum()) if above.numel() else 0
