"""growrun.growth.solve's fast Cholesky path of TINY (Z = L^-1 N, G = Z^T Z, alpha = L^-T Z W_K /
sqrt(lambda)) against the eigh reference path, and its fallback to eigh on singular S1."""
from __future__ import annotations

import pytest
import torch

from growrun.growth import solve
from growrun.growth.solve import chol_solve, psolve_info, tiny_solve
from helpers_solve import rand, spd, tiny_reference

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
EPS = 1e-7


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


@pytest.fixture
def small_eigh(monkeypatch):
    monkeypatch.setattr(solve, "EIGH_BELOW", 32)


def test_chol_solve_is_cholesky_solve():
    S = spd(60, torch.logspace(0, -3, 60))
    L = torch.linalg.cholesky(S)
    B = rand(60, 5)
    torch.testing.assert_close(chol_solve(L, B), torch.cholesky_solve(B, L), rtol=1e-12, atol=0)


@pytest.mark.parametrize("d1,m,dead", [(64, 9, 0), (64, 100, 0), (90, 12, 7), (400, 40, 0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_equals_eigh_reference(d1, m, dead, seed, small_eigh):
    """Random well-conditioned S1 (condition 1e3), with and without dead features: the Cholesky
    path's neurons, spectrum and gains equal the eigh path's to ~1e-10 relative."""
    live = torch.ones(d1, dtype=torch.bool)
    live[torch.arange(dead) * (d1 // max(dead, 1))] = False
    k = int(live.sum())
    S1 = torch.zeros(d1, d1, dtype=DT)
    S1[live.nonzero(), live.nonzero().T] = spd(k, torch.logspace(0, -3, k), seed=seed)
    N, M1 = rand(d1, m, seed=seed + 10), rand(d1, m, seed=seed + 20)
    N[~live] = 0.0  # N = X^T V / n vanishes on dead features
    assert psolve_info(S1, N, EPS)[2] == "cholesky"
    K = min(d1, m, 6)
    fast = tiny_solve(S1, N, M1, K, rel_eps=EPS, s0=0.7, g2=1.0)
    ref = tiny_solve(S1, N, M1, K, rel_eps=EPS, s0=0.7, g2=1.0, method="eigh")
    assert fast.alpha.shape == ref.alpha.shape == (K, d1) and fast.omega.shape == (K, m)
    for a, b in [(fast.alpha, ref.alpha), (fast.omega, ref.omega), (fast.lambdas, ref.lambdas)]:
        assert rel(a, b) < 1e-10
    assert fast.gain == pytest.approx(ref.gain, rel=1e-10)
    assert fast.first_order == pytest.approx(ref.first_order, rel=1e-10)
    assert not fast.alpha[:, ~live].any()


@pytest.mark.parametrize("kind", ["rank_deficient", "near_singular", "isolated_tiny", "tiny_n"])
def test_fast_path_falls_back_to_eigh_when_singular(kind, small_eigh):
    """S1 singular or too close to the threshold: the eigh path runs (auto = eigh exactly) and
    matches the literal section-4 reference (S1^(-1/2) by eigh, SVD)."""
    d, m = 80, 6
    g = torch.Generator().manual_seed(3)
    bulk = 0.5 + 0.5 * torch.rand(d, generator=g, dtype=DT)
    if kind == "rank_deficient":
        S1 = spd(d, torch.cat([torch.logspace(0, -3, 50), torch.zeros(d - 50)]))
    elif kind == "near_singular":
        S1 = spd(d, torch.logspace(0, -12, d))
    elif kind == "isolated_tiny":
        S1 = spd(d, torch.cat([bulk[:-1], torch.tensor([1e-9], dtype=DT)]))
    else:
        X = rand(30, d, seed=4)
        S1 = X.T @ X / 30
    N = S1 @ rand(d, m, seed=5)  # in the range of S1, as N = X^T V / n is
    assert psolve_info(S1, N, EPS)[2] == "eigh"
    auto = tiny_solve(S1, N, -N, 4, rel_eps=EPS)
    ref = tiny_solve(S1, N, -N, 4, rel_eps=EPS, method="eigh")
    for a, b in [(auto.alpha, ref.alpha), (auto.omega, ref.omega), (auto.lambdas, ref.lambdas)]:
        assert torch.equal(a, b)
    _, _, lam_ref = tiny_reference(S1, N)
    torch.testing.assert_close(auto.lambdas, lam_ref, rtol=1e-6, atol=1e-9 * float(lam_ref[0]))


def test_fast_path_zero_and_empty(small_eigh):
    for S1, N in [(torch.zeros(40, 40, dtype=DT), rand(40, 3)), (spd(40, torch.linspace(1, 2, 40)), torch.zeros(40, 3)),
                  (torch.zeros(0, 0, dtype=DT), torch.zeros(0, 3, dtype=DT))]:
        sol = tiny_solve(S1, N.to(DT), N.to(DT), 3, g2=1.0)
        assert sol.alpha.shape == (0, S1.shape[0]) and sol.omega.shape == (0, 3) and sol.gain == 0.0
        assert not sol.lambdas.any() and sol.lambdas.shape == (min(S1.shape[0], 3),)
