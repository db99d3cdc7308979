"""Test matrices and the literal TINY reference of tests/test_growth_solve.py, also used by
test_growth_solve_fast.py: a symmetric positive definite matrix with given eigenvalues (spd), a
seeded random tensor (rand), TINY by eigh and SVD as Section 4 writes it (tiny_reference)."""
from __future__ import annotations

import torch

DT = torch.float64
EPS = 1e-7


def spd(d, eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return (Q * torch.as_tensor(eigs, dtype=DT)) @ Q.T


def tiny_reference(S1, N, rel_eps=EPS):
    """Section 4 literally: S1^(-1/2) by eigh with thresholding, SVD of S1^(-1/2) N."""
    e, Q = torch.linalg.eigh(S1)
    keep = e > rel_eps * e.max()
    Sm = (Q[:, keep] * e[keep].rsqrt()) @ Q[:, keep].T
    U, lam, Wt = torch.linalg.svd(Sm @ N, full_matrices=False)
    alpha = (Sm @ U * lam.sqrt()).T
    omega = Wt * lam.sqrt().unsqueeze(1)
    return alpha, omega, lam


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
