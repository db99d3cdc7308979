"""Solvers of TINY growth: pure functions, float64 in and out (tiny_math.md, sections 3-4, 6).

Pseudo-inverses use a relative threshold: eigenvalues e <= rel_eps * e_max of a PSD matrix are
dropped. `psolve(S, B)` = S^+ B computes this exactly but fast:
  * features with S_ii = 0 (dead units, unused inputs) are removed first; this is exact, since
    S is PSD, so their rows and columns vanish and S^+ is block diagonal;
  * small matrices (d <= EIGH_BELOW): eigendecomposition, the reference definition;
  * large ones: Cholesky (at d = 4608: factor + check + solve ~1.3 s against ~11-17 s for
    eigh on this 2-core machine). It is used only when
    S is safely far from the threshold: lambda_min(S) > CHOL_SAFETY * rel_eps * lambda_max(S),
    where lambda_max comes from a few block power iterations and lambda_min from a few block
    inverse iterations with the Cholesky factor (Ritz values, i.e. lambda_min is over- and
    lambda_max under-estimated by little; the safety factor 10 covers that). Then S^+ = S^-1
    and the solve equals the eigh reference to float64 round-off. Otherwise (factorisation
    fails, or S is near-singular) the eigh path is taken.

Cholesky solves S^-1 B = L^-T (L^-1 B) (S = L L^T) are two triangular solves (chol_solve):
torch.cholesky_solve first copies L (d = 4608: 170 MB), which made the check's 8-column solves
4x slower (130 vs 31 ms CPU time at d = 4608).

TINY (section 4) without ever forming S1^(-1/2): with Y = S1^+ N (d1 x m) and the small m x m
Gram matrix  N^T S1^+ N = (S1^(-1/2) N)^T (S1^(-1/2) N) = W diag(lambda^2) W^T,
    u_k = S1^(-1/2) N w_k / lambda_k,   alpha_k = sqrt(lambda_k) S1^(-1/2) u_k = Y w_k / sqrt(lambda_k),
    omega_k = sqrt(lambda_k) w_k.
On the Cholesky path (S1 = L L^T) one triangular solve does it: Z = L^-1 N (d1 x m),
    N^T S1^-1 N = Z^T Z,   alpha_k = L^-T (Z w_k) / sqrt(lambda_k)   (K columns, not m),
half the flops of Y = S1^-1 N; the eigh path (the reference) computes Y as above.
Neurons are kept when lambda_k^2 > rel_eps * max(lambda_1^2, g2): the relative threshold of the
spectrum, and an absolute floor at rel_eps of the gradient energy g2 so that round-off in N
(e.g. N = 0 in exact arithmetic) never yields neurons. Spectrum entries below it are reported 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EIGH_BELOW = 384      # psolve: eigendecomposition for d <= this (cheap and the reference)
CHOL_SAFETY = 10.0    # psolve: Cholesky only if lambda_min > CHOL_SAFETY * rel_eps * lambda_max


def _sym(S: torch.Tensor) -> torch.Tensor:
    return 0.5 * (S + S.transpose(-1, -2))


def _orth(Q: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Q).Q


def pinv_solve_eigh(S: torch.Tensor, B: torch.Tensor, rel_eps: float) -> tuple[torch.Tensor, int]:
    """(S^+ B, rank) by eigendecomposition, eigenvalues <= rel_eps * max dropped (reference)."""
    e, Q = torch.linalg.eigh(_sym(S))
    top = float(e[-1]) if e.numel() else 0.0
    keep = e > rel_eps * top if top > 0 else torch.zeros_like(e, dtype=torch.bool)
    Qk, ek = Q[:, keep], e[keep]
    return Qk @ ((Qk.T @ B) / ek.unsqueeze(1)), int(keep.sum())


def chol_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """S^-1 B = L^-T (L^-1 B) for S = L L^T (L lower triangular)."""
    Z = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, Z, upper=True)


def _well_conditioned(S: torch.Tensor, L: torch.Tensor, rel_eps: float) -> bool:
    """Is lambda_min(S) > CHOL_SAFETY * rel_eps * lambda_max(S)?  (estimates, see module doc).

    lambda_max: Ritz value of 4 block power steps (8 vectors), at least max_i S_ii.
    lambda_min: 1 / the top Ritz value of S^-1 over up to 8 block inverse-iteration steps with
    the Cholesky factor (Q^T S^-1 Q comes free with the solve), and at most the smallest pivot
    L_ii^2 (pivots are Schur complements, >= lambda_min). Both estimates of lambda_min are >= it.
    """
    d = S.shape[0]
    gen = torch.Generator(device=S.device).manual_seed(12345)
    Q0 = _orth(torch.randn(d, min(d, 8), generator=gen, dtype=S.dtype, device=S.device))
    Q = Q0
    for _ in range(4):
        Z = S @ Q
        ritz_max = float(torch.linalg.eigvalsh(_sym(Q.T @ Z))[-1])
        Q = _orth(Z)
    limit = CHOL_SAFETY * rel_eps * max(ritz_max, float(S.diagonal().max()))
    lam_min, prev, Q = float(L.diagonal().min()) ** 2, None, Q0
    for _ in range(8):
        Y = chol_solve(L, Q)
        top = float(torch.linalg.eigvalsh(_sym(Q.T @ Y))[-1])  # <= 1 / lambda_min
        lam_min = min(lam_min, 1.0 / top) if top > 0 else 0.0
        if lam_min <= limit:
            return False
        if prev is not None and abs(prev - top) <= 1e-2 * top:
            break
        prev, Q = top, _orth(Y)
    return lam_min > limit


def _factor(S: torch.Tensor, rel_eps: float, method: str):
    """(idx, Sl, L) for psolve: the live features (S_ii > 0; idx None when all are live), S on
    them, and Sl's Cholesky factor when the Cholesky path applies, else None (eigh path)."""
    if method not in ("auto", "eigh", "cholesky"):
        raise ValueError(f"method={method!r}")
    d = S.shape[0]
    live = S.diagonal() > 0
    r = int(live.sum()) if d else 0
    idx = live.nonzero().squeeze(1) if r < d else None
    Sl = S if idx is None else S[idx][:, idx]  # symmetric; LAPACK reads one triangle
    if r and (method == "cholesky" or (method == "auto" and r > EIGH_BELOW)):
        L, info = torch.linalg.cholesky_ex(Sl)
        if int(info) == 0 and (method == "cholesky" or _well_conditioned(Sl, L, rel_eps)):
            return idx, Sl, L
        if method == "cholesky":
            raise torch.linalg.LinAlgError("psolve: Cholesky failed (S not positive definite)")
    return idx, Sl, None


def _scatter(Xl: torch.Tensor, idx: torch.Tensor | None, d: int) -> torch.Tensor:
    """Rows of the live features back into d rows (dead rows 0)."""
    if idx is None:
        return Xl
    out = Xl.new_zeros(d, Xl.shape[1])
    out[idx] = Xl
    return out


def psolve_info(S: torch.Tensor, B: torch.Tensor, rel_eps: float = 1e-7, *,
                method: str = "auto") -> tuple[torch.Tensor, int, str]:
    """(S^+ B, rank of S after thresholding, path used: "eigh" | "cholesky" | "zero").

    S: (d, d) symmetric PSD, B: (d, k). method: "auto", "eigh" (reference) or "cholesky"
    (forced; only for well-conditioned S).
    """
    S, B = S.to(torch.float64), B.to(torch.float64)
    idx, Sl, L = _factor(S, rel_eps, method)
    if Sl.shape[0] == 0:
        return B.new_zeros(S.shape[0], B.shape[1]), 0, "zero"
    Bl = B if idx is None else B[idx]
    if L is not None:
        Xl, rank, path = chol_solve(L, Bl), Sl.shape[0], "cholesky"
    else:
        (Xl, rank), path = pinv_solve_eigh(Sl, Bl, rel_eps), "eigh"
    return _scatter(Xl, idx, S.shape[0]), rank, path


def psolve(S: torch.Tensor, B: torch.Tensor, rel_eps: float = 1e-7, *, method: str = "auto") -> torch.Tensor:
    """S^+ B with the relative eigenvalue threshold rel_eps (see module doc)."""
    return psolve_info(S, B, rel_eps, method=method)[0]


def best_update(S2: torch.Tensor, M2: torch.Tensor, rel_eps: float = 1e-7, *,
                method: str = "auto") -> tuple[torch.Tensor, float]:
    """Section 3: (dW2*^T = -S2^+ M2  of shape (d2, m),  d_W = tr(M2^T S2^+ M2) >= 0).

    dW2* = argmin_D |V - H D^T|^2 with V = -G: the best change of L2's weights (and bias, last
    row) alone; d_W is its first-order decrease of the mean loss.
    """
    Y = psolve(S2, M2, rel_eps, method=method)
    d_w = float((M2.to(torch.float64) * Y).sum()) if Y.numel() else 0.0
    return -Y, max(d_w, 0.0)


def bottleneck(g2: float, d_w: float) -> float:
    """Section 3: Psi = |V_perp|^2 / n = g2 - d_W (clipped at 0 against round-off)."""
    return max(float(g2) - float(d_w), 0.0)


def tiny_matrix(M1: torch.Tensor, P: torch.Tensor | None = None, dW2T: torch.Tensor | None = None) -> torch.Tensor:
    """Section 4: N = X^T V_perp / n = -M1 - P dW2*^T (= -M1 + P S2^+ M2); -M1 without projection."""
    N = -M1.to(torch.float64)
    if P is not None and dW2T is not None and P.shape[1]:
        N = N - P.to(torch.float64) @ dW2T
    return N


@dataclass(eq=False)
class TinySolution:
    """alpha (K, d1) fan-ins, omega (K, m) fan-outs, lambdas: the whole spectrum (min(d1, m),
    decreasing, entries below the threshold set to 0), gain = sum_k lambda_k^2 of the K kept,
    first_order = s0 * sum_k alpha_k^T M1 omega_k (mean-loss change per gamma^2)."""

    alpha: torch.Tensor
    omega: torch.Tensor
    lambdas: torch.Tensor
    gain: float
    first_order: float


def _sign_fix(W: torch.Tensor) -> torch.Tensor:
    """Deterministic signs: the largest-magnitude entry of each column is positive."""
    if W.numel() == 0:
        return W
    pick = W.abs().argmax(0)
    s = torch.sign(W[pick, torch.arange(W.shape[1], device=W.device)])
    return W * torch.where(s == 0, torch.ones_like(s), s)


def gram_eigh(G: torch.Tensor, rel_eps: float, g2: float | None = None):
    """Eigen-pairs of a PSD Gram matrix G = N^T S1^+ N, decreasing: (mu = lambda^2, W, keep)
    with keep = mu > rel_eps * max(mu_1, g2) (and mu_1 > 0), see the module doc."""
    mu, W = torch.linalg.eigh(_sym(G))
    mu, W = mu.flip(0).clamp_min(0.0), _sign_fix(W.flip(1))
    top = float(mu[0]) if mu.numel() else 0.0
    floor = rel_eps * max(top, float(g2) if g2 is not None else 0.0)
    keep = mu > floor if top > 0 else torch.zeros_like(mu, dtype=torch.bool)
    return mu, W, keep


def tiny_solve(S1: torch.Tensor, N: torch.Tensor, M1: torch.Tensor, count: int, *,
               rel_eps: float = 1e-7, s0: float = 1.0, g2: float | None = None,
               method: str = "auto") -> TinySolution:
    """Section 4: the K = count best neurons for N (fewer if the spectrum has fewer above the
    threshold): S1^(-1/2) N = U diag(lambda) W^T, alpha_k = sqrt(lambda_k) S1^(-1/2) u_k,
    omega_k = sqrt(lambda_k) w_k, computed as in the module doc (S1 and its path as in psolve:
    dead features removed, Cholesky Z = L^-1 N when S1 is well conditioned, else eigh).
    Empty or all-zero input gives K = 0 and a zero spectrum."""
    S1, N, M1 = (t.to(torch.float64) for t in (S1, N, M1))
    d1, m = N.shape
    r = min(d1, m)
    idx, Sl, L = _factor(S1, rel_eps, method)
    Nl = N if idx is None else N[idx]
    if Sl.shape[0] == 0:
        G = N.new_zeros(m, m)                                # S1 = 0: S1^+ = 0
    elif L is not None:
        Z = torch.linalg.solve_triangular(L, Nl, upper=False)  # Z = L^-1 N
        G = Z.T @ Z                                           # N^T S1^-1 N
    else:
        Y = pinv_solve_eigh(Sl, Nl, rel_eps)[0]               # Y = S1^+ N (reference)
        G = Nl.T @ Y
    mu, W, keep = gram_eigh(G, rel_eps, g2)
    K = min(int(count), int(keep.sum()))
    lam = torch.where(keep, mu, torch.zeros_like(mu)).sqrt()
    root = lam[:K].sqrt()
    if K == 0:
        alpha, omega = N.new_zeros(0, d1), N.new_zeros(0, m)
    else:
        WK = W[:, :K]
        # alpha_k = S1^+ N w_k / sqrt(lambda_k): L^-T (Z w_k) on the Cholesky path, Y w_k on eigh
        YW = torch.linalg.solve_triangular(L.mT, Z @ WK, upper=True) if L is not None else Y @ WK
        alpha = _scatter(YW / root, idx, d1).T
        omega = (WK * root).T
    first = s0 * float((alpha @ M1 * omega).sum()) if K else 0.0
    return TinySolution(alpha.contiguous(), omega.contiguous(), lam[:r].contiguous(),
                        float(mu[:K].sum()), first)


def gradmax_directions(M1: torch.Tensor, count: int, rel_eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 6 (GradMax): the top right singular vectors of M1 (unit rows, (K, m)) and the
    singular values, from the eigendecomposition of M1^T M1; K <= count, limited to singular
    values sigma_k with sigma_k^2 > rel_eps * sigma_1^2 > 0."""
    M1 = M1.to(torch.float64)
    e, W = torch.linalg.eigh(_sym(M1.T @ M1))
    e, W = e.flip(0).clamp_min(0.0), _sign_fix(W.flip(1))
    top = float(e[0]) if e.numel() else 0.0
    K = min(int(count), int((e > rel_eps * top).sum()) if top > 0 else 0)
    return W[:, :K].T.contiguous(), e.sqrt()
