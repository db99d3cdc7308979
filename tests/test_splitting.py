"""growth=splitting (growrun.growth.splitting): the split preserves the function at gamma = 0 and the
line search's hooks compute exactly what insert_split makes; the splitting matrices against brute
force (the measured loss change of small splits and the autograd Hessian of the loss w.r.t. the
split direction, on smooth activations); the selection against an explicit loop; the Lanczos
solver against eigh; a short end-to-end run through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growrun.growth import splitting
from growrun.growth.methods import REGISTRY as METHODS
from growrun.models.site import Neurons, Site, frozen_bn_stats
from helpers_interrupt import summing_reduce
from helpers_cli import cli, read_csv
from helpers_net2net import BASE as N2N_BASE, MLP, MLP_RUN, RESNET, RESNET_RUN, make
from helpers_sitenet import randomize_bn

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("restore_torch_threads")]
DT = torch.float64


def random_dirs(site, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(k, *site.l1.weight.shape[1:], generator=g, dtype=DT)
    b1 = None if site.l1.bias is None else torch.randn(k, generator=g, dtype=DT)
    return Neurons(w1, b1, torch.zeros(site.out_width, k, *site.l2.weight.shape[2:], dtype=DT))


# ---------------------------------------------------------------- (1) function preservation

@pytest.mark.parametrize("arch, name", [(MLP, "fc1"), (MLP, "fc2"), (RESNET, "layer1.0"), (RESNET, "layer2.0")],
                         ids=["mlp-fc1", "mlp-fc2", "resnet-layer1.0", "resnet-layer2.0"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_split_preserves_the_function_and_matches_the_search_hooks(arch, name, mode):
    """gamma = 0: the output is the same (BatchNorm channel copied); gamma > 0: the line search's
    hooks (splitting.attach) compute exactly what insert_split makes, and it does change the output."""
    model, x, _ = make(arch)
    model.train(mode == "train")
    site = model.sites()[name]
    width, idx = site.width, torch.tensor([0, site.width - 1]) if site.width > 1 else torch.tensor([0])
    dirs = random_dirs(site, len(idx))
    with frozen_bn_stats(model):
        before = model(x)
        with splitting.attach(site, idx, dirs)() as handle:
            handle.gamma = 0.3
            hooked = model(x)
    assert (hooked - before).abs().max() > 1e-3  # the split at gamma > 0 changes the function
    at0 = make(arch)[0].train(mode == "train")
    splitting.insert_split(at0.sites()[name], idx, dirs, 0.0)
    at3 = make(arch)[0].train(mode == "train")
    splitting.insert_split(at3.sites()[name], idx, dirs, 0.3)
    with frozen_bn_stats(at0), frozen_bn_stats(at3):
        torch.testing.assert_close(at0(x), before, rtol=0, atol=1e-12)
        torch.testing.assert_close(at3(x), hooked, rtol=1e-10, atol=1e-12)
    s = at3.sites()[name]
    assert s.width == width + len(idx)
    torch.testing.assert_close(s.l1.weight[idx] - s.l1.weight[width:], 0.6 * dirs.w1)  # w +- gamma v
    torch.testing.assert_close(s.l2.weight[:, width:], s.l2.weight[:, idx])  # both halves
    torch.testing.assert_close(2 * s.l2.weight[:, idx], model.sites()[name].l2.weight[:, idx])
    assert torch.equal(s.bn.running_var[width:], s.bn.running_var[idx])


# ---------------------------------------------------------------- (2) the splitting matrix

class SmoothNet(nn.Module):
    """x -> L1 -> [BN, eval] -> tanh / softplus -> L2 -> flatten -> head; the Site says "identity"
    (the real activation's sigma'' is passed to splitting.collect)."""

    def __init__(self, conv: bool, bn: bool, act: str, width=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.act = act
        if conv:
            self.l1, self.l2 = nn.Conv2d(2, width, 3, padding=1), nn.Conv2d(width, 3, 3, stride=2, padding=1)
            self.bn, self.head = (nn.BatchNorm2d(width) if bn else None), nn.Linear(3 * 3 * 3, 4)
        else:
            self.l1, self.l2 = nn.Linear(3, width), nn.Linear(width, 5)
            self.bn, self.head = (nn.BatchNorm1d(width) if bn else None), nn.Linear(5, 4)
        self.to(DT).eval()
        if bn:
            randomize_bn(self.bn)

    def forward(self, x):
        z = self.l1(x)
        z = self.bn(z) if self.bn is not None else z
        h = torch.tanh(z) if self.act == "tanh" else F.softplus(z)
        return self.head(torch.tanh(self.l2(h)).flatten(1))

    def site(self):
        return Site("s", self.l1, self.l2, self.bn, "identity")

    def dd(self, z, _h):
        if self.act == "tanh":
            t = torch.tanh(z)
            return -2 * t * (1 - t * t)
        s = torch.sigmoid(z)
        return s * (1 - s)


def smooth_data(conv, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=DT) if conv else torch.randn(n, 3, generator=g, dtype=DT)
    return x, torch.randint(0, 4, (n,), generator=g)


def split_loss(net, x, y, i, delta_w, delta_b):
    """Mean loss with neuron i split into (w_i + delta, w_i - delta), half the fan-out each
    (explicit: the layers' functional forms with the widened weights; differentiable in delta)."""
    l1, l2, bn = net.l1, net.l2, net.bn
    W1 = torch.cat([l1.weight.index_add(0, torch.tensor([i]), delta_w[None]), (l1.weight[i] - delta_w)[None]])
    b1 = torch.cat([l1.bias.index_add(0, torch.tensor([i]), delta_b[None]), (l1.bias[i] - delta_b)[None]])
    half = l2.weight[:, i:i + 1] / 2
    W2 = torch.cat([l2.weight[:, :i], half, l2.weight[:, i + 1:], half], 1)
    conv = isinstance(l1, nn.Conv2d)
    z = F.conv2d(x, W1, b1, padding=1) if conv else F.linear(x, W1, b1)
    if bn is not None:
        cat = lambda t: torch.cat([t, t[i:i + 1]])  # noqa: E731
        z = F.batch_norm(z, cat(bn.running_mean), cat(bn.running_var), cat(bn.weight), cat(bn.bias), False, 0.0, bn.eps)
    h = torch.tanh(z) if net.act == "tanh" else F.softplus(z)
    a = F.conv2d(h, W2, l2.bias, stride=2, padding=1) if conv else F.linear(h, W2, l2.bias)
    return F.cross_entropy(net.head(torch.tanh(a).flatten(1)), y)


SMOOTH = [dict(conv=False, bn=False, act="tanh"), dict(conv=False, bn=True, act="softplus"),
          dict(conv=True, bn=True, act="tanh"), dict(conv=True, bn=False, act="softplus")]
SMOOTH_IDS = ["linear-tanh", "linear-bn-softplus", "conv-bn-tanh", "conv-softplus"]


@pytest.mark.parametrize("case", SMOOTH, ids=SMOOTH_IDS)
def test_splitting_matrix_is_the_hessian_along_the_split(case):
    """S_i (collect + splitting_matrices over two batches) equals the autograd Hessian of the mean
    loss w.r.t. the split offset delta at 0, and the measured loss change of the split along the
    minimum eigenvector matches (eps^2 / 2) v^T S v with an error shrinking like eps."""
    net = SmoothNet(**case)
    x, y = smooth_data(case["conv"])
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    sum_ce = lambda z, t: F.cross_entropy(z, t, reduction="sum")  # noqa: E731
    X, C, n = splitting.collect(net, net.site(), batches, sum_ce, ddsigma=net.dd, patches=10**6)
    assert n == 12 and X.shape[0] == (12 * 25 if case["conv"] else 12)
    S = splitting.splitting_matrices(X, C, n)
    lam, V = splitting.min_eig_exact(S)
    with torch.no_grad():
        L0 = float(split_loss(net, x, y, 0, torch.zeros_like(net.l1.weight[0]), torch.zeros((), dtype=DT)))
    for i in range(3):
        dw = torch.zeros_like(net.l1.weight[i])
        d = dw.numel() + 1

        def f(delta):
            return split_loss(net, x, y, i, delta[:-1].reshape(dw.shape), delta[-1])
        H = torch.autograd.functional.hessian(f, torch.zeros(d, dtype=DT))
        torch.testing.assert_close(S[i], H, rtol=1e-7, atol=1e-10)
        v = V[i]
        errors = []
        for eps in (1e-2, 1e-3):
            with torch.no_grad():
                measured = float(split_loss(net, x, y, i, eps * v[:-1].reshape(dw.shape), eps * v[-1])) - L0
            predicted = 0.5 * eps**2 * float(lam[i])
            errors.append(abs(measured - predicted) / abs(predicted))
        assert errors[0] < 0.05 and errors[1] < 0.2 * errors[0] + 1e-6, errors


def test_relu_kernel_estimate_and_subsampling():
    """ReLU: c = g phi_h(z) a^2 with phi_h the Gaussian density of width bandwidth std(z); the
    subsample keeps ceil(patches B / n) positions per batch, reweighted by B P / kept."""
    model, x, y = make(RESNET)
    site = model.sites()["layer2.0"]
    sum_ce = lambda z, t: F.cross_entropy(z, t, reduction="sum")  # noqa: E731
    X, C, n = splitting.collect(model, site, [(x, y)], sum_ce, patches=10**6)
    Xs, Cs, _ = splitting.collect(model, site, [(x, y)], sum_ce, patches=20, generator=torch.Generator().manual_seed(0))
    P = X.shape[0] // 16
    assert Xs.shape[0] == 20 and n == 16 and P == 16  # 4 x 4 positions of layer2.0's conv1 on 8 x 8 images
    # every kept patch is one of the full set's (distinct), its weight times B P / kept
    rows = []
    for r in range(20):
        hit = ((X - Xs[r]).abs().sum(1) == 0).nonzero().flatten().tolist()
        assert hit, r
        assert any(torch.allclose(C[j] * (16 * P / 20), Cs[r], rtol=1e-12, atol=0) for j in hit)
        rows.append(hit[0])
    assert len(set(rows)) == 20
    two = splitting.collect(model, site, [(x[:8], y[:8]), (x[8:], y[8:])], sum_ce, patches=20)
    assert two[0].shape[0] == 20 and two[2] == 16  # ceil(20 * 8 / 16) = 10 per batch
    # the weights c = g phi_h(z) a^2 against an explicit computation (MLP site, BatchNorm in training mode)
    mlp, xm, ym = make(MLP)
    fc1 = mlp.sites()["fc1"]
    Xm, Cm, _ = splitting.collect(mlp, fc1, [(xm, ym)], sum_ce, patches=10**6)
    store = {}
    hooks = [fc1.l1.register_forward_hook(lambda m, a, o: store.update(u=o.detach())),
             fc1.bn.register_forward_hook(lambda m, a, o: store.update(z=o.detach())),
             fc1.l2.register_forward_hook(lambda m, a, o: store.update(a=o) or o.retain_grad())]
    with frozen_bn_stats(mlp):
        sum_ce(mlp(xm), ym).backward()
    for hnd in hooks:
        hnd.remove()
    gh = store["a"].grad @ fc1.l2.weight.detach()  # d loss / dh
    z, u = store["z"], store["u"]
    bw = 0.25 * z.std(0, unbiased=False)
    phi = torch.exp(-0.5 * (z / bw) ** 2) / ((2 * torch.pi) ** 0.5 * bw)
    coef = fc1.bn.weight.detach() / (u.var(0, unbiased=False) + fc1.bn.eps).sqrt()
    torch.testing.assert_close(Cm, gh * phi * coef**2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Xm, torch.cat([xm.flatten(1), torch.ones(16, 1, dtype=DT)], 1))
    # the kernel: with a huge bandwidth phi_h is flat (1 / (sqrt(2 pi) h)), so S -> 0
    Xw, Cw, _ = splitting.collect(model, site, [(x, y)], sum_ce, patches=10**6, bandwidth=1e6)
    assert Cw.abs().max() < 1e-5 * C.abs().max()


# ---------------------------------------------------------------- (3) selection, (4) solvers

def _select_by_loop(lam, count, rel_eps):
    scale = max(abs(v) for v in lam)
    order = []
    rest = [i for i in range(len(lam)) if lam[i] < -rel_eps * scale]
    while rest and len(order) < count:
        best = min(rest, key=lambda i: (lam[i], i))
        order.append(best)
        rest.remove(best)
    return order


def test_selection_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        lam = torch.randn(9, generator=g, dtype=DT).round(decimals=1)  # ties
        lam[trial % 9] = -1e-12  # negative but below the relative threshold
        for count in (0, 1, 3, 9, 20):
            got = splitting.select(lam, count, 1e-7).tolist()
            assert got == _select_by_loop(lam.tolist(), count, 1e-7), (lam, count)
            assert len(set(got)) == len(got) and all(lam[i] < 0 for i in got)
    assert splitting.select(torch.zeros(4, dtype=DT), 3).numel() == 0  # S = 0: nothing to split


def test_lanczos_matches_eigh():
    """Batched matrix-free Lanczos (fewer steps per cycle than the dimension, restarted) gives
    every neuron's minimum eigenpair of S_k = X^T diag(c_k) X / n as eigh does; a dead neuron
    (c_k = 0, S_k = 0) gives lambda 0."""
    g = torch.Generator().manual_seed(1)
    N, d, K = 400, 50, 6
    X = torch.randn(N, d, generator=g, dtype=DT)
    C = torch.randn(N, K, generator=g, dtype=DT) + 0.3
    C[:, 4] = 0.0
    S = splitting.splitting_matrices(X, C, N)
    V0 = torch.randn(K, d, generator=g, dtype=DT)
    torch.testing.assert_close(splitting.splitting_matvec(X, C, V0, N), torch.einsum("kij,kj->ki", S, V0))
    lam_e, v_e = splitting.min_eig_exact(S)
    torch.testing.assert_close(lam_e, torch.linalg.eigvalsh(S)[:, 0])
    lam, v, flops = splitting.min_eigenpairs(X, C, N, iters=15, exact_dim=0, tol=1e-10, restarts=20,
                                             generator=torch.Generator().manual_seed(2))
    assert flops > 0
    torch.testing.assert_close(lam, lam_e, rtol=1e-8, atol=1e-10)
    live = [k for k in range(K) if k != 4]
    overlap = (v[live] * v_e[live]).sum(1).abs()
    assert bool((overlap > 1 - 1e-8).all()), overlap
    assert float(lam[4]) == 0.0


@pytest.mark.parametrize("exact_dim", [160, 0], ids=["exact", "lanczos"])
def test_ranks_partial_sums_give_one_process_eigenpairs(exact_dim):
    """float32 statistics (as collected) split between two ranks, whose products are summed across
    them (a fixed order, as all_reduce): every eigenpair and the selection equal one process's to
    float64 rounding, not to float32's (the products and their sums are float64: a float32 sum's
    rounding depends on its order, which differs between one process and ranks, and between AVX2
    and AVX-512 kernels)."""
    import threading

    g = torch.Generator().manual_seed(3)
    N, d, K = 600, 40, 8
    X = torch.randn(N, d, generator=g)
    C = torch.randn(N, K, generator=g) * torch.linspace(0.5, 1.5, K) + 0.05
    kw = dict(iters=40, exact_dim=exact_dim, tol=1e-12, restarts=30)
    lam1, v1, _ = splitting.min_eigenpairs(X, C, N, generator=torch.Generator().manual_seed(4), **kw)
    assert lam1.dtype == torch.float64
    halves, results, barrier, slots = [(X[:250], C[:250]), (X[250:], C[250:])], [None, None], \
        threading.Barrier(2, timeout=60), [None, None]

    def rank(r):
        results[r] = splitting.min_eigenpairs(*halves[r], N, generator=torch.Generator().manual_seed(4),
                                              reduce=summing_reduce(slots, barrier, r), **kw)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] is not None and results[1] is not None
    for lam, v, _ in results:
        torch.testing.assert_close(lam, lam1, rtol=1e-10, atol=1e-12)
        assert bool(((v * v1).sum(1).abs() > 1 - 1e-10).all())
        assert torch.equal(splitting.select(lam, 3), splitting.select(lam1, 3))


# ---------------------------------------------------------------- (5) end to end

BASE = [o for o in N2N_BASE if not o.startswith("growth=")] + ["growth=splitting"]


@pytest.mark.slow
@pytest.mark.parametrize("model", [MLP_RUN, RESNET_RUN], ids=["mlp-sites_all", "resnet18"])
def test_splitting_trains_end_to_end(tmp_path, model):
    """Sites grow by splits; each row's loss after insertion is the loss the line search
    measured at its gamma (the hooks compute what is inserted), below the loss before."""
    run_dir = tmp_path / "run"
    assert cli("train", *BASE, *model, f"hydra.run.dir={run_dir}") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_csv(run_dir / "growth.csv")
    assert summary["status"] == "completed" and rows and "splitting" in METHODS
    grown = [r for r in rows if int(r["added"])]
    assert grown
    for r in rows:
        assert r["method"] == "splitting" and r["reason"] in ("", "rank", "no_gain", "budget"), r
    for r in grown:
        assert float(r["gamma"]) > 0 and float(r["first_order"]) < 0, r
        assert float(r["loss_after"]) == pytest.approx(float(r["loss_candidate"]), rel=1e-5, abs=1e-6), r
        assert float(r["loss_after"]) <= float(r["loss_before"]), r  # the search keeps only a decrease


@pytest.mark.parametrize("extra, needle", [
    (["growth.apply_dw=true"], "growth.apply_dw=true"), (["growth.stats=training"], "growth.stats=training"),
    (["growth.normalize=mean_norm"], "growth.normalize=mean_norm"),
    (["growth.normalize=none", "model.site_widths=[0,3]"], "growth.method=splitting")])
def test_refused_up_front(tmp_path, capsys, extra, needle):
    assert cli("train", *BASE, *MLP_RUN, *extra, f"hydra.run.dir={tmp_path / 'run'}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "splitting" in lines[0], lines
    assert not (tmp_path / "run").exists()
