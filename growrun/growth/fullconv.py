"""TINY with a new channel's *full* L2 kernel as fan-out (growth.conv_fanout=full, conv sites).

tiny_math.md section 4 solves the new channels with their L2 kernel restricted to the centre
tap (exact Eckart-Young, the default). Here the whole kernel omega_k (m x kh2 x kw2) is solved.

Notation (one site x --L1--> z --sigma--> h --L2--> a, conv, groups 1, dilation 1). For an L2
output position p = (i, j) and an L2 kernel offset q = (u, v) (kk = kh2 * kw2 of them, row
major), L1's output position feeding tap q of output p is

    l(p, q) = (s2h * i - p2h + u,  s2w * j - p2w + v)

and x_{p+q} denotes L1's input patch at l(p, q) (im2col of L1, with a trailing 1 when L1 has a
bias), or 0 when l(p, q) lies in L2's zero padding. A new channel (alpha_k, omega_k), sigma
linearised at 0 with slope s0, changes L2's output by

    da_{p,c} = s0 sum_k sum_q omega_{k,c,q} alpha_k^T x_{p+q}.

Statistics (sums over samples and L2 output positions p, divided by n samples; FullConvSums):

    S1full           = (1/n) sum_p sum_q x_{p+q} x_{p+q}^T                        (d1, d1)
    M1full[:, (c,q)] = (1/n) sum_p x_{p+q} g_{p,c}                                (d1, m*kk)
    Pfull[e, :, q]   = (1/n) sum_p h_{p,e} x_{p+q}          (h_p: L2's patch)      (d2, d1, kk)

Columns (c, q) are c-major (c * kk + u * kw2 + v), the layout of L2's weight[:, k] flattened,
so vec(omega_k) is the new channel's L2 kernel slice. Computed without materialising the
kk-times larger shifted patch matrix:
  * S1full = sum_l mult(l) x_l x_l^T over L1's output positions l, mult(l) = #{(p, q): l(p, q)
    = l} (the separable count of `multiplicity`); every (p, q) pair with l(p, q) inside L1's
    output contributes x_l x_l^T once, pairs in the padding contribute 0;
  * [Pfull; M1full] is the weight gradient of a convolution with L2's geometry (kernel, stride,
    padding) whose input is the map of L1's patches (d1 channels at L1's output positions) and
    whose output gradient is [h_p; g_p] at L2's output positions (torch.nn.grad.conv2d_weight):
    dW[e, a, q] = sum_{b,p} out[b, e, p] in_pad[b, a, s2 p + q] = sum_p [h_p; g_p]_e x_{p+q, a}.

Objective. The linearised least squares of section 4 with the full kernel is
    min sum_{p,c} |V_perp,p,c - da_{p,c}|^2 / n,     V_perp = V - H dW2*^T, V = -G,
whose cross term is -2 s0 sum_k alpha_k^T N omega_k with (derived like section 4)

    N = (1/n) sum_p sum_q x_{p+q} V_perp,p^T  arranged (d1, m*kk)
      = -M1full - Pfull-term,   Pfull-term[:, (c, q)] = sum_e Pfull[e, :, q] dW2*^T[e, c]
      = -M1full + (Pfull S2^+ M2 per offset)                              (full_matrix)

and whose quadratic term is sum_c sum_{q,q'} Theta_{c,q}^T Sigma_{qq'} Theta_{c,q'} with
Theta = sum_k alpha_k omega_k^T (d1, m*kk) and the cross-offset covariances
Sigma_{qq'} = (1/n) sum_p x_{p+q} x_{p+q'}^T. That metric is Sigma (on (offset, x-feature)
pairs) times the identity on c: it does not factor as (metric on x) x (metric on (c, q)), so
the rank-K optimum is *not* an SVD, and Sigma has (kk d1)^2 entries (81 x S1 for 3x3 kernels).
Approximation (GroMo's FullConv2dGrowingModule, see below): drop the q != q' blocks and replace
each Sigma_qq by their mean S = S1full / kk, the Frobenius-nearest metric of the form
I_kk (x) S. The objective becomes -2 s0 tr(A N Omega^T) + s0^2 tr((A S A^T)(Omega Omega^T)),
minimised over rank K exactly by section 4's SVD with S1 -> S, N -> N above (solve.tiny_solve):
    S^(-1/2) N = U diag(lambda) W^T,  alpha_k = sqrt(lambda_k) S^(-1/2) u_k,  omega_k = sqrt(lambda_k) w_k.
Only approximately optimal for the true objective: neighbouring patches overlap and feature
maps are smooth, so Sigma_{qq'} (q != q') is far from 0 and a spatially smooth omega costs more
than S says; sum_k lambda_k^2 (the logged bottleneck gain) is the approximate objective's
reduction, an optimistic estimate of the true one. What stays exact: the first-order loss
change per gamma^2, s0 sum_k alpha_k^T M1full vec(omega_k) (tiny_solve's first_order; the line
search measures the true loss anyway). With a 1x1 L2 (kk = 1) everything equals the centre-tap
form. In the approximate metric the full form's gain is >= the centre-tap solution's gain in
that metric (its columns are a superset: N's centre columns are the centre-tap N), but not
necessarily >= the centre-tap form's exact gain (which uses S1 = Sigma_cc, no approximation).

GroMo (growingnet/gromo, src/gromo/modules/conv2d_growing_module.py, FullConv2dGrowingModule):
the same S (tensor_s_growth = sum over samples, positions and offsets of the masked unfolded
previous input, i.e. S1full *without* the 1/kk), M_prev (= M1full, layout (d1, m, kk)), the
cross covariance P (offset, d1, d2) and tensor_n = -M_prev + P delta (= N above), then the same
SVD. Dividing S by kk only rescales: lambda -> sqrt(kk) lambda, alpha omega^T -> kk alpha omega^T
(the same directions; GroMo's neurons at gamma are these at gamma / sqrt(kk)), and puts
sum lambda_k^2 in the units of the centre-tap gain (identical for kk = 1). GroMo builds the
masked inputs with a dense (positions x offsets x L1 positions) mask tensor; here the
multiplicity weights and a conv weight gradient give the same sums at ~kk x the cost of P.

Cost: S1full ~ S1 (one weighted Gram of L1's patches); [Pfull; M1full] ~ kk x the flops of
[P | M1]; memory (d2 + m) d1 kk floats (one set, no folds: growth.neurons=adaptive is refused).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn.grad import conv2d_weight

from .solve import TinySolution, tiny_matrix, tiny_solve
from .unfold import conv_geometry, im2col, out_len


@functools.lru_cache(maxsize=64)
def multiplicity(n1: int, n2: int, k2: int, s2: int, p2: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """mult[l] = #{(i, u): s2 * i - p2 + u = l, 0 <= i < n2, 0 <= u < k2} for l in [0, n1):
    how many (L2 output, kernel offset) pairs read L1 output position l (one axis). Counted on
    the CPU and cached per (geometry, device, dtype): the boolean mask and bincount would
    synchronise a GPU on every statistics batch. Read only."""
    i = torch.arange(n2).unsqueeze(1)
    u = torch.arange(k2).unsqueeze(0)
    l = (s2 * i - p2 + u).reshape(-1)
    l = l[(l >= 0) & (l < n1)]
    return torch.bincount(l, minlength=n1).to(device=device, dtype=dtype)


def shifted_sums(X1: torch.Tensor, W: torch.Tensor, batch: int, grid1: tuple[int, int], grid2: tuple[int, int],
                 kernel2, stride2, padding2) -> tuple[torch.Tensor, torch.Tensor]:
    """(S1full sum, C) of one batch (module doc; sums, not divided by n).

    X1: L1's patches, feature-major (d1, B*H1*W1), columns (b, l); W: (D, B*H2*W2), columns
    (b, p), e.g. [h-patches; g] (D = d2 + m). Returns S1full = sum_p sum_q x_{p+q} x_{p+q}^T
    (d1, d1) and C[e, a, q] = sum_p W[e, p] x_{p+q, a}, shape (D, d1, kh2 * kw2).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel2, stride2, padding2
    (H1, W1), (H2, W2) = grid1, grid2
    d1, D = X1.shape[0], W.shape[0]
    xmap = X1.view(d1, batch, H1, W1).transpose(0, 1)
    gout = W.view(D, batch, H2, W2).transpose(0, 1)
    C = conv2d_weight(xmap, (D, d1, kh, kw), gout, (sh, sw), (ph, pw)).reshape(D, d1, kh * kw)
    mult = torch.outer(multiplicity(H1, H2, kh, sh, ph, X1.device, X1.dtype),
                       multiplicity(W1, W2, kw, sw, pw, X1.device, X1.dtype))
    Xw = (X1.view(d1, batch, H1, W1) * mult).view(d1, -1)
    return Xw @ X1.T, C


@dataclass(eq=False)
class FullConvSums:
    """Running sums of a conv site for conv_fanout=full: S1 = sum_p sum_q x_{p+q} x_{p+q}^T
    (d1, d1) and C[e, a, q] = sum_p [h_p; g_p]_e x_{p+q, a} (d2 + m, d1, kk), kk = kh2 * kw2."""

    S1: torch.Tensor
    C: torch.Tensor
    kernel2: tuple[int, int]

    def tensors(self) -> list[torch.Tensor]:
        return [self.S1, self.C]

    def clone(self) -> "FullConvSums":
        return FullConvSums(self.S1.clone(), self.C.clone(), self.kernel2)

    def zeroed(self) -> "FullConvSums":
        return FullConvSums(torch.zeros_like(self.S1), torch.zeros_like(self.C), self.kernel2)


@dataclass(eq=False)
class FullConvStats:
    """FullConvSums in float64 divided by n: S1full (d1, d1), M1full (d1, m*kk) (columns
    (c, q), c-major), Pfull (d2, d1, kk); kk = kh2 * kw2."""

    S1: torch.Tensor
    M1: torch.Tensor
    P: torch.Tensor
    kk: int


def normalized(sums: FullConvSums, n: int, d2: int, device=None) -> FullConvStats:
    """Float64 statistics divided by n (zeros if n = 0): S1full, M1full = C[d2:] arranged
    (d1, m*kk) with columns (c, q), Pfull = C[:d2] (d2 = L2's fan-in incl. its bias feature)."""
    inv = 1.0 / n if n else 0.0
    S1, C = (t.to(device=device, dtype=torch.float64) * inv for t in sums.tensors())
    M1 = C[d2:].permute(1, 0, 2).reshape(C.shape[1], -1)
    return FullConvStats(S1, M1, C[:d2], sums.kernel2[0] * sums.kernel2[1])


def full_matrix(M1full: torch.Tensor, Pfull: torch.Tensor | None = None,
                dW2T: torch.Tensor | None = None) -> torch.Tensor:
    """N = -M1full - Pfull-term (module doc), (d1, m*kk); -M1full without projection.
    Pfull (d2, d1, kk), dW2T = -S2^+ M2 (d2, m)."""
    N = -M1full.to(torch.float64)
    if Pfull is not None and dW2T is not None and Pfull.shape[0]:
        d1 = N.shape[0]
        N = N - torch.einsum("eaq,ec->acq", Pfull.to(torch.float64), dW2T).reshape(d1, -1)
    return N


def full_solve(stats: FullConvStats, N: torch.Tensor, count: int, *, rel_eps: float = 1e-7, s0: float = 1.0,
               g2: float | None = None) -> TinySolution:
    """The K = count neurons of the approximate objective (module doc): tiny_solve with the
    metric S = S1full / kk and N (d1, m*kk). omega rows are vec(L2 kernel slices), (K, m*kk);
    first_order = s0 sum_k alpha_k^T M1full omega_k is exact."""
    return tiny_solve(stats.S1 / stats.kk, N, stats.M1, count, rel_eps=rel_eps, s0=s0, g2=g2)


def approx_objective(alpha: torch.Tensor, omega: torch.Tensor, S: torch.Tensor, N: torch.Tensor,
                     s0: float = 1.0) -> torch.Tensor:
    """The approximate objective (minus |V_perp|^2 / n) of neurons alpha (K, d1), omega (K, m*kk):
    -2 s0 tr(A N Omega^T) + s0^2 tr((A S A^T)(Omega Omega^T)), S = S1full / kk. Its minimum
    over K neurons is -sum_k lambda_k^2."""
    return -2 * s0 * (alpha @ N * omega).sum() + s0 ** 2 * ((alpha @ S @ alpha.T) * (omega @ omega.T)).sum()


class FullConvAccumulator:
    """The extra sums of one conv site in the statistics pass (stats._SiteRecorder calls add
    with each batch's L1 input x and the recorder's feature-major [h-patches; g] matrix W)."""

    def __init__(self, site, d1: int, D: int, device, dtype) -> None:
        self.site = site
        k1, s1, p1 = conv_geometry(site.l1)
        k2, s2, p2 = conv_geometry(site.l2)
        self.geo1, self.geo2 = (k1, s1, p1), (k2, s2, p2)
        self.bias1 = site.l1.bias is not None
        kk = k2[0] * k2[1]
        self.sums = FullConvSums(torch.zeros(d1, d1, dtype=dtype, device=device),
                                 torch.zeros(D, d1, kk, dtype=dtype, device=device), k2)

    def add(self, x: torch.Tensor, W: torch.Tensor, grid2: tuple[int, int], matrix, pad) -> None:
        """x (B, C_in, H, W) L1's input; W (D, B*H2*W2); matrix(role, rows, cols, like) a scratch
        allocator; pad: a flat scratch for the padded copy of x."""
        (k1, s1, p1), (k2, s2, p2) = self.geo1, self.geo2
        B = x.shape[0]
        grid1 = (out_len(x.shape[2], k1[0], s1[0], p1[0]), out_len(x.shape[3], k1[1], s1[1], p1[1]))
        d1 = self.sums.S1.shape[0]
        X1 = matrix("x1full", d1, B * grid1[0] * grid1[1], x)
        im2col(x, k1, s1, p1, ones_row=self.bias1, dest=X1, pad_buffer=pad)
        S, C = shifted_sums(X1, W, B, grid1, grid2, k2, s2, p2)
        self.sums.S1.add_(S)
        self.sums.C.add_(C)
