"""growrun.growth.solve and .adaptive: pseudo-inverse solves, best update, bottleneck and TINY
against brute force; the adaptive neuron count on teacher/student problems."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growrun.growth import solve
from growrun.growth.adaptive import adaptive_count, cross_validated_gains
from growrun.models.site import Site
from growrun.growth.stats import collect_statistics
from growrun.growth.solve import (best_update, bottleneck, gradmax_directions, psolve, psolve_info,
                                  tiny_matrix, tiny_solve)
from helpers_sitenet import SiteNet, captured, data, explicit_rows, stats_of
from helpers_solve import DT, EPS, rand, spd, tiny_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def pinv_ref(S, rel_eps=EPS):
    return torch.linalg.pinv(S, hermitian=True, rtol=rel_eps)


# ---------------------------------------------------------------- psolve

@pytest.fixture
def small_eigh(monkeypatch):
    """Route matrices above 32 through the Cholesky path (the default switch is at 384)."""
    monkeypatch.setattr(solve, "EIGH_BELOW", 32)


def test_psolve_cholesky_path_equals_eigh_reference():
    d = 400  # above the default switch
    S = spd(d, torch.logspace(0, -4, d))
    B = rand(d, 7)
    X, rank, path = psolve_info(S, B, EPS)
    assert path == "cholesky" and rank == d
    torch.testing.assert_close(X, pinv_ref(S) @ B, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(X, psolve(S, B, EPS, method="eigh"), rtol=1e-8, atol=1e-10)
    assert psolve_info(S, B, EPS, method="eigh")[2] == "eigh"


@pytest.mark.parametrize("kind", ["rank_deficient", "near_singular", "tiny_n", "isolated_tiny", "cluster_tiny"])
def test_psolve_falls_back_to_eigh_when_singular(kind, small_eigh):
    d = 120
    g = torch.Generator().manual_seed(7)
    bulk = 0.5 + 0.5 * torch.rand(d, generator=g, dtype=DT)
    if kind == "rank_deficient":
        S = spd(d, torch.cat([torch.logspace(0, -3, 70), torch.zeros(d - 70)]))
    elif kind == "near_singular":
        S = spd(d, torch.logspace(0, -12, d))
    elif kind == "isolated_tiny":  # one eigenvalue 1e-9 below a well-conditioned bulk
        S = spd(d, torch.cat([bulk[:-1], torch.tensor([1e-9], dtype=DT)]))
    elif kind == "cluster_tiny":
        S = spd(d, torch.cat([bulk[:-10], torch.full((10,), 3e-8, dtype=DT)]))
    else:  # n = 40 samples of 120 features, from data
        Xd = rand(40, d, seed=3)
        S = Xd.T @ Xd / 40
    B = rand(d, 5, seed=1)
    X, rank, path = psolve_info(S, B, EPS)
    assert path == "eigh"
    ref = pinv_ref(S) @ B
    torch.testing.assert_close(X, ref, rtol=1e-6, atol=1e-8 * ref.abs().max())
    if kind == "tiny_n":
        assert rank == 40


def test_psolve_auto_path_decision(small_eigh):
    for eigs, want in [(torch.logspace(0, -3, 40), "cholesky"), (torch.logspace(0, -5.5, 40), "cholesky"),
                       (torch.logspace(0, -6.5, 40), "eigh"), (torch.logspace(0, -9, 40), "eigh"),
                       (torch.cat([torch.ones(30), torch.zeros(10)]), "eigh")]:
        S, B = spd(40, eigs), rand(40, 3)
        X, _, path = psolve_info(S, B, EPS)
        assert path == want, eigs[-1]
        torch.testing.assert_close(X, pinv_ref(S) @ B, rtol=1e-6, atol=1e-9)


def test_psolve_dead_features_and_empty(small_eigh):
    d = 140
    S = torch.zeros(d, d, dtype=DT)
    live = torch.arange(d) % 7 != 3
    S[live.nonzero(), live.nonzero().T] = spd(int(live.sum()), torch.linspace(1, 2, int(live.sum())))
    B = rand(d, 4)
    X, rank, path = psolve_info(S, B, EPS)
    assert path == "cholesky" and rank == int(live.sum())
    torch.testing.assert_close(X, pinv_ref(S) @ B, rtol=1e-8, atol=1e-10)
    assert psolve_info(torch.zeros(5, 5, dtype=DT), rand(5, 2), EPS)[2] == "zero"
    assert psolve(torch.zeros(5, 5, dtype=DT), rand(5, 2)).abs().sum() == 0
    assert psolve(torch.zeros(0, 0, dtype=DT), torch.zeros(0, 3, dtype=DT)).shape == (0, 3)


# ---------------------------------------------------------------- best update and bottleneck

@pytest.mark.parametrize("conv", [False, True])
def test_best_update_is_lstsq_and_psi_is_the_residual(conv):
    net = SiteNet(conv, width=3, m=4, s2=2 if conv else 1).eval()
    batches = [data(conv, 40 if not conv else 6, seed=s) for s in (1, 2)]
    st = stats_of(net, batches)
    rows = []
    for x, y in batches:
        rows += explicit_rows(net, *captured(net, x, y))
    H = torch.stack([r[2] for r in rows])
    V = -torch.stack([r[3] for r in rows])
    n = st.n
    ns = st.normalized()
    dW2T, d_w = best_update(ns.S2, ns.M2, EPS)
    ref = torch.linalg.lstsq(H, V).solution
    torch.testing.assert_close(dW2T, ref, rtol=1e-7, atol=1e-9)
    resid = V - H @ ref
    assert bottleneck(ns.g2, d_w) == pytest.approx(float((resid ** 2).sum()) / n, rel=1e-8)
    assert d_w == pytest.approx(float((V ** 2).sum() - (resid ** 2).sum()) / n, rel=1e-8)


def test_best_update_width_zero_and_zero_statistics():
    dW2T, d_w = best_update(torch.zeros(0, 0, dtype=DT), torch.zeros(0, 5, dtype=DT))
    assert dW2T.shape == (0, 5) and d_w == 0.0
    dW2T, d_w = best_update(torch.zeros(3, 3, dtype=DT), torch.zeros(3, 5, dtype=DT))
    assert not dW2T.any() and d_w == 0.0
    assert bottleneck(1.0, 1.0 + 1e-12) == 0.0


# ---------------------------------------------------------------- TINY

def _products(alpha, omega):
    return torch.einsum("ki,kj->kij", alpha, omega)


@pytest.mark.parametrize("method", ["auto", "eigh", "cholesky"])
def test_tiny_equals_eigh_svd_reference(method):
    d1, m, n = 30, 6, 200
    X = rand(n, d1, seed=1) @ rand(d1, d1, seed=2)
    S1 = X.T @ X / n
    N = X.T @ rand(n, m, seed=3) / n
    M1 = rand(d1, m, seed=4)
    sol = tiny_solve(S1, N, M1, 4, rel_eps=EPS, method=method)
    a_ref, o_ref, lam_ref = tiny_reference(S1, N)
    torch.testing.assert_close(sol.lambdas, lam_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_products(sol.alpha, sol.omega), _products(a_ref[:4], o_ref[:4]), rtol=1e-7, atol=1e-10)
    assert sol.gain == pytest.approx(float((lam_ref[:4] ** 2).sum()), rel=1e-10)
    assert sol.first_order == pytest.approx(float((sol.alpha @ M1 * sol.omega).sum()), rel=1e-12)
    # orthogonality of the solution: alpha^T S1 alpha = diag(lambda), omega omega^T = diag(lambda)
    torch.testing.assert_close(sol.alpha @ S1 @ sol.alpha.T, torch.diag(lam_ref[:4]), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sol.omega @ sol.omega.T, torch.diag(lam_ref[:4]), rtol=1e-8, atol=1e-10)


def test_tiny_rank_deficient_s1_matches_reference():
    d1, m, n = 40, 5, 12  # n < d1: S1 has rank 12
    X = rand(n, d1, seed=5)
    S1, N = X.T @ X / n, X.T @ rand(n, m, seed=6) / n
    sol = tiny_solve(S1, N, -N, 10, rel_eps=EPS)
    a_ref, o_ref, lam_ref = tiny_reference(S1, N)
    assert sol.alpha.shape == (5, d1)  # m = 5 limits the rank
    torch.testing.assert_close(_products(sol.alpha, sol.omega), _products(a_ref, o_ref), rtol=1e-6, atol=1e-9)
    assert sol.first_order == pytest.approx(-sol.gain, rel=1e-10)  # N = -M1: first order = -sum lambda^2


def test_tiny_k_above_rank_and_zero_statistics():
    S1 = spd(3, [1.0, 0.5, 0.2])
    N = rand(3, 8)
    sol = tiny_solve(S1, N, -N, 6)
    assert sol.alpha.shape == (3, 3) and sol.omega.shape == (3, 8) and sol.lambdas.shape == (3,)
    assert bool((sol.lambdas > 0).all())
    N1 = torch.outer(rand(3), rand(8, seed=1))  # rank 1
    sol = tiny_solve(S1, N1, -N1, 6)
    assert sol.alpha.shape[0] == 1 and sol.lambdas[1:].abs().max() == 0
    for S, N0 in [(torch.zeros(4, 4, dtype=DT), rand(4, 3)), (spd(4, [1, 1, 1, 1]), torch.zeros(4, 3, dtype=DT))]:
        sol = tiny_solve(S, N0, N0, 3, g2=1.0)
        assert sol.alpha.shape == (0, 4) and sol.omega.shape == (0, 3) and sol.gain == 0.0
        assert torch.isfinite(sol.lambdas).all() and not sol.lambdas.any()
    # round-off-sized N relative to the gradient energy gives no neurons
    sol = tiny_solve(spd(4, [1, 1, 1, 1]), 1e-12 * rand(4, 3), rand(4, 3), 3, g2=1.0)
    assert sol.alpha.shape[0] == 0


def _reduction(A, Om, S1, N):
    """Linearised reduction of |V_perp - X A Om^T|^2 / n: 2 tr(A^T N Om) - tr(A^T S1 A Om^T Om)."""
    return float(2 * torch.trace(A.T @ N @ Om) - torch.trace(A.T @ S1 @ A @ Om.T @ Om))


@pytest.mark.parametrize("projection", [True, False])
def test_tiny_beats_random_rank_k_alternatives(projection):
    net = SiteNet(True, width=2, m=5, act="identity").eval()
    batches = [data(True, 6, seed=s) for s in (1, 2)]
    st = stats_of(net, batches)
    ns = st.normalized()
    dW2T, _ = best_update(ns.S2, ns.M2)
    N = tiny_matrix(ns.M1, ns.P, dW2T) if projection else tiny_matrix(ns.M1)
    K = 3
    sol = tiny_solve(ns.S1, N, ns.M1, K)
    A, Om = sol.alpha.T, sol.omega.T
    best = _reduction(A, Om, ns.S1, N)
    assert best == pytest.approx(sol.gain, rel=1e-9)
    # the same reduction measured on the explicit rows (X, V_perp) of the data
    rows = []
    for x, y in batches:
        rows += explicit_rows(net, *captured(net, x, y))
    Xr, Hr, Gr = (torch.stack([r[i] for r in rows]) for i in (1, 2, 3))
    Vp = -Gr - Hr @ dW2T if projection else -Gr
    explicit = (float((Vp ** 2).sum()) - float(((Vp - Xr @ A @ Om.T) ** 2).sum())) / st.n
    assert explicit == pytest.approx(best, rel=1e-8)
    g = torch.Generator().manual_seed(0)
    d1, m = N.shape
    T = 200
    # random rank-K fan-ins, each with its optimal fan-out Om = N^T A (A^T S1 A)^-1
    Ar = torch.randn(T, d1, K, generator=g, dtype=DT)
    Omr = torch.linalg.solve(Ar.transpose(1, 2) @ ns.S1 @ Ar, Ar.transpose(1, 2) @ N).transpose(1, 2)
    # small perturbations of the optimum
    Ap = A + 0.05 * A.abs().max() * torch.randn(T, d1, K, generator=g, dtype=DT)
    Omp = Om + 0.05 * Om.abs().max() * torch.randn(T, m, K, generator=g, dtype=DT)
    for As, Oms, close in ((Ar, Omr, 0.0), (Ap, Omp, 0.9)):
        At = As.transpose(1, 2)
        red = (2 * (At @ N @ Oms).diagonal(dim1=1, dim2=2).sum(1)
               - (At @ ns.S1 @ As @ Oms.transpose(1, 2) @ Oms).diagonal(dim1=1, dim2=2).sum(1))
        assert float(red.max()) <= best * (1 + 1e-10)
        assert float(red.max()) > close * best  # the perturbed optima come close, never above


def test_gradmax_directions_are_top_right_singular_vectors():
    M1 = rand(20, 6) @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1, 0], dtype=DT))
    W, sv = gradmax_directions(M1, 10)
    assert W.shape == (5, 6)  # the zero singular value is not a direction
    ref = torch.linalg.svd(M1, full_matrices=False)
    torch.testing.assert_close(sv, ref.S, rtol=1e-8, atol=1e-6)
    torch.testing.assert_close(W.abs(), ref.Vh[:5].abs(), rtol=1e-8, atol=1e-10)
    assert gradmax_directions(torch.zeros(4, 3, dtype=DT), 2)[0].shape == (0, 3)


# ---------------------------------------------------------------- adaptive count

class Student(nn.Module):
    def __init__(self, d, w, m, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(d, w, bias=False).to(DT), nn.Linear(w, m, bias=False).to(DT)

    def forward(self, x):
        return self.l2(self.l1(x))


def sq(out, y):
    return 0.5 * ((out - y) ** 2).sum()


@functools.lru_cache(maxsize=None)
def teacher_student(rank, seed, n=4000, d=12, w=2, m=6, noise=1.0, strengths=(1.0, 0.6, 0.3, 0.2)):
    """Targets = student(x) + R x + noise, R of the given rank with rows orthogonal to L1's rows,
    so the missing bottleneck (what no change of L2 can express) has exactly that rank."""
    net = Student(d, w, m, seed)
    g = torch.Generator().manual_seed(seed + 100)
    W1 = net.l1.weight.detach()
    basis = torch.linalg.qr(torch.cat([W1.T, torch.randn(d, d - w, generator=g, dtype=DT)], 1)).Q[:, w:]
    V = basis[:, :rank]
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT)).Q[:, :rank]
    R = U @ torch.diag(torch.tensor(strengths[:rank], dtype=DT)) @ V.T
    x = torch.randn(n, d, generator=g, dtype=DT)
    with torch.no_grad():
        y = net(x) + x @ R.T + noise * torch.randn(n, m, generator=g, dtype=DT)
    batches = [(x[i:i + 500], y[i:i + 500]) for i in range(0, n, 500)]
    site = Site("s", net.l1, net.l2, None, "identity")
    return collect_statistics(net, [site], batches, sq, folds=2)["s"]


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("projection", [True, False])
def test_adaptive_count_finds_the_rank(rank, projection):
    for seed in range(4):
        st = teacher_student(rank, seed)
        assert adaptive_count(st, projection=projection, noise_sigmas=2.0, max_count=6, rel_eps=1e-7) == rank
        assert adaptive_count(st, projection=projection, noise_sigmas=2.0, max_count=1, rel_eps=1e-7) == 1


def test_adaptive_count_few_samples_keep_only_strong_directions():
    counts = [adaptive_count(teacher_student(3, s, n=150), projection=True, noise_sigmas=2.0, max_count=6)
              for s in range(4)]
    assert max(counts) <= 3 and min(counts) < 3  # the weakest direction (0.3) is not yet resolved


def test_adaptive_count_pure_noise():
    counts = [adaptive_count(teacher_student(0, s), projection=True, noise_sigmas=2.0, max_count=6)
              for s in range(12)]
    assert max(counts) <= 1 and sum(counts) <= 2, counts


def test_adaptive_noise_scale_is_not_too_small():
    """On pure noise the held-out alignments over their standard errors are centred and not
    over-dispersed (the rule is built to be conservative: std <= ~1)."""
    z = []
    for s in range(12):
        c, se = cross_validated_gains(teacher_student(0, s).normalized(), projection=True, max_count=6)
        z += (c / se).tolist()
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.4 and 0.3 < float(z.std()) < 1.2, (float(z.mean()), float(z.std()))


def conv_noise_stats(seed, act, n=256):
    """A conv site whose targets are the model's own outputs plus pure noise (nothing to learn)."""
    net = SiteNet(True, act=act, width=3, m=4, bn=False, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(n, 3, 7, 7, generator=g, dtype=DT)
    with torch.no_grad():
        out = net(x)
    y = out + torch.randn(out.shape, generator=g, dtype=DT)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]
    return collect_statistics(net, [net.site()], batches, sq, folds=2)["s"]


@pytest.mark.slow
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_adaptive_count_conv_pure_noise(act):
    counts = [adaptive_count(conv_noise_stats(s, act), projection=True, noise_sigmas=2.0, max_count=4)
              for s in range(16)]
    assert sum(counts) <= 1, counts


class ConvStudent(nn.Module):
    """x -> L1 (3x3) -> identity -> L2 (3x3): the output map is L2's output."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Conv2d(3, 2, 3, padding=1).to(DT), nn.Conv2d(2, 4, 3, padding=1).to(DT)

    def forward(self, x):
        return self.l2(self.l1(x))


@pytest.mark.parametrize("projection", [True, False])
def test_adaptive_count_conv_finds_a_planted_neuron(projection):
    """Targets = student + one planted centre-tap neuron (fan-in a0, fan-out w0) + noise: the
    missing bottleneck has rank 1 and the rule returns 1."""
    found = []
    for seed in range(4):
        net = ConvStudent(seed)
        g = torch.Generator().manual_seed(seed + 11)
        x = torch.randn(256, 3, 7, 7, generator=g, dtype=DT)
        a0 = torch.randn(1, 3, 3, 3, generator=g, dtype=DT) / 3
        w0 = torch.zeros(4, 1, 3, 3, dtype=DT)
        w0[:, 0, 1, 1] = torch.randn(4, generator=g, dtype=DT)
        with torch.no_grad():
            y = net(x) + 0.3 * F.conv2d(F.conv2d(x, a0, padding=1), w0, padding=1)
            y = y + torch.randn(y.shape, generator=g, dtype=DT)
        batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
        site = Site("s", net.l1, net.l2, None, "identity")
        st = collect_statistics(net, [site], batches, sq, folds=2)["s"]
        found.append(adaptive_count(st, projection=projection, noise_sigmas=2.0, max_count=4))
    assert found == [1, 1, 1, 1], found


def test_adaptive_count_requires_two_folds():
    net = SiteNet(False).eval()
    batches = [data(False, 40, seed=s) for s in (1, 2, 3)]
    st1 = stats_of(net, batches, folds=1)
    with pytest.raises(ValueError, match="2 non-empty folds"):
        adaptive_count(st1, projection=True, noise_sigmas=2.0, max_count=3)
    st = stats_of(net, batches, folds=3)
    assert 0 <= adaptive_count(st, projection=True, noise_sigmas=2.0, max_count=3) <= 3
