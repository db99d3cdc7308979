"""growrun.growth.stats: the statistics pass against explicit per-sample, per-position loops.

The small test model (SiteNet) and the explicit-loop rows (explicit_rows), also used by
test_growth_solve.py and test_growth_neurons.py, are in tests/helpers_sitenet.py; the explicit
statistics of those rows (explicit_stats) are here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from growrun.models.site import Site
from growrun.growth.stats import SiteStats, collect_statistics
from growrun.growth.unfold import aligned_range, im2col
from growrun.models.layers import BatchNorm2d, Conv2d
from helpers_sitenet import DT, SiteNet, captured, data, explicit_rows, stats_of, sum_ce

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------- test models and references


def explicit_stats(rows, n: int):
    """Normalised S1, S2, M1, M2, P, g2 as explicit sums of outer products / n."""
    d1, d2, m = rows[0][1].numel(), rows[0][2].numel(), rows[0][3].numel()
    S1, S2, M1 = torch.zeros(d1, d1, dtype=DT), torch.zeros(d2, d2, dtype=DT), torch.zeros(d1, m, dtype=DT)
    M2, P, g2 = torch.zeros(d2, m, dtype=DT), torch.zeros(d1, d2, dtype=DT), 0.0
    for _, x, h, g in rows:
        x, h, g = x.to(DT), h.to(DT), g.to(DT)
        S1 += torch.outer(x, x); S2 += torch.outer(h, h); M1 += torch.outer(x, g)  # noqa: E702
        M2 += torch.outer(h, g); P += torch.outer(x, h); g2 += float(g @ g)  # noqa: E702
    return {k: v / n for k, v in dict(S1=S1, S2=S2, M1=M1, M2=M2, P=P, g2=g2).items()}


def assert_close_stats(st: SiteStats, ref: dict, rtol=1e-9, atol=1e-11):
    ns = st.normalized()
    for k in ("S1", "S2", "M1", "M2", "P"):
        torch.testing.assert_close(getattr(ns, k), ref[k], rtol=rtol, atol=atol, msg=k)
    assert ns.g2 == pytest.approx(ref["g2"], rel=rtol, abs=atol)


# ---------------------------------------------------------------- statistics vs explicit loops

CONV_CASES = [  # k1, s1, p1, k2, s2, p2, bias1, bias2
    (3, 1, 1, 3, 1, 1, True, True),
    (3, 2, 1, 3, 1, 1, False, True),
    (3, 1, 0, 3, 2, 0, True, False),
    (3, 1, 1, 3, 2, 1, False, False),
    (2, 2, 0, 3, 1, 2, True, True),    # L2 padding 2 > centre 1: border outputs see no new channel
    (3, 2, 1, 1, 1, 0, True, False),   # 1x1 L2
    (1, 1, 0, 2, 2, 0, False, True),   # even L2 kernel: centre tap (1, 1)
    (3, 1, 2, 5, 3, 3, True, True),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("train", [False, True])
def test_conv_statistics_equal_explicit_loops(case, train):
    k1, s1, p1, k2, s2, p2, b1, b2 = case
    net = SiteNet(True, k1=k1, s1=s1, p1=p1, k2=k2, s2=s2, p2=p2, bias1=b1, bias2=b2, bn=True).train(train)
    batches = [data(True, 4, seed=s) for s in (1, 2)]
    st = stats_of(net, batches)
    rows = []
    for x, y in batches:
        rows += explicit_rows(net, *captured(net, x, y))
    assert_close_stats(st, explicit_stats(rows, 8))
    assert st.n == 8 and net.training == train


def test_linear_statistics_and_folds_equal_explicit_loops():
    net = SiteNet(False, width=4, m=3).train()
    batches = [data(False, 5, seed=1), data(False, 5, seed=2), data(False, 3, seed=3)]
    st = stats_of(net, batches, folds=2)
    rows, fold_rows = [], {0: [], 1: []}
    for index, (x, y) in enumerate(batches):
        r = explicit_rows(net, *captured(net, x, y))
        rows += r
        B = x.shape[0]
        first = (B + 1) // 2  # chunk 0 (the larger) goes to fold index % 2, chunk 1 to the other
        for b, *rest in r:
            fold_rows[(index + (0 if b < first else 1)) % 2].append((b, *rest))
    assert_close_stats(st, explicit_stats(rows, 13))
    ns = st.normalized()
    for f in (0, 1):
        nf = len(fold_rows[f])
        ref = explicit_stats(fold_rows[f], nf)
        assert ns.n_folds[f] == nf
        torch.testing.assert_close(ns.M1_folds[f], ref["M1"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(ns.P_folds[f], ref["P"], rtol=1e-9, atol=1e-11)
    assert ns.n_folds == [7, 6]


def test_float32_model_statistics_are_float32_and_accurate():
    net = SiteNet(True, dtype=torch.float32).eval()
    x, y = data(True, 6, dtype=torch.float32)
    st = stats_of(net, [(x, y)])
    assert st.S1.dtype == torch.float32 and st.M1_folds.dtype == torch.float32
    assert_close_stats(st, explicit_stats(explicit_rows(net, *captured(net, x, y)), 6), rtol=1e-5, atol=1e-6)


def test_im2col_matches_unfold():
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    for k, s, p in [(3, 1, 1), (3, 2, 0), ((2, 3), (1, 2), (1, 0))]:
        ref = F.unfold(x, k, padding=p, stride=s)  # (B, d, L)
        got = im2col(x, k, s, p, ones_row=True)
        torch.testing.assert_close(got[:-1], ref.permute(1, 0, 2).reshape(ref.shape[1], -1))
        assert bool((got[-1] == 1).all())


@pytest.mark.parametrize("n1,k2,s2,p2", [(7, 3, 1, 1), (7, 3, 2, 0), (6, 3, 1, 2), (5, 2, 2, 0), (4, 5, 3, 3), (1, 3, 1, 2)])
def test_aligned_range_by_enumeration(n1, k2, s2, p2):
    n2 = (n1 + 2 * p2 - k2) // s2 + 1
    valid = [i for i in range(n2) if 0 <= s2 * i - p2 + k2 // 2 < n1]
    lo, hi = aligned_range(n1, n2, k2, s2, p2)
    assert list(range(lo, hi)) == valid


# ---------------------------------------------------------------- the pass leaves the model alone

def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("train", [False, True])
def test_pass_changes_nothing(train):
    net = SiteNet(True).train(train)
    before = _snapshot(net)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    net.head.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    flags["head.weight"] = False
    stats_of(net, [data(True, 4)])
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in net.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n], n
    assert net.training == train and net.bn.training == train
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_pass_restores_on_exception():
    net = SiteNet(False).train()
    before = _snapshot(net)

    def bad_loss(logits, y):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        stats_of(net, [data(False, 4)], loss_fn=bad_loss)
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inplace_modification_of_a_captured_input_is_detected():
    class Bad(SiteNet):
        def forward(self, x):
            x1 = torch.tanh(self.pre(x))
            z = self.l1(x1)
            x1.mul_(2.0)  # changes L1's input after L1 used it
            return self.head(torch.tanh(self.l2(torch.relu(self.bn(z)))).flatten(1))

    net = Bad(False).eval()
    with pytest.raises(RuntimeError, match="in place"):
        stats_of(net, [data(False, 4)])


def test_frozen_model_uses_probe():
    net = SiteNet(True, bias1=False, bias2=False).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x, y = data(True, 3)
    st = stats_of(net, [(x, y)])
    assert_close_stats(st, explicit_stats(explicit_rows(net, *captured(net, x, y)), 3))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("bias2", [False, True])
def test_width_zero_site(conv, bias2):
    net = SiteNet(conv, width=0, bias2=bias2).train()
    x, y = data(conv, 5)
    st = stats_of(net, [(x, y)])
    d1, d2, m = st.dims
    assert d2 == int(bias2) and m == 4 and d1 == (2 * 9 + 1 if conv else 3)
    ns = st.normalized()
    assert all(torch.isfinite(t).all() for t in (ns.S1, ns.S2, ns.M1, ns.M2, ns.P))
    assert ns.g2 > 0
    assert_close_stats(st, explicit_stats(explicit_rows(net, *captured(net, x, y)), 5))


def test_sitestats_add_equals_joint_pass():
    net = SiteNet(True).eval()
    b1, b2 = data(True, 4, seed=1), data(True, 6, seed=2)
    s1, s2 = stats_of(net, [b1], folds=1), stats_of(net, [b2], folds=1)
    joint = stats_of(net, [b1, b2], folds=1)
    added = s1 + s2
    for a, b in zip(added.tensors(), joint.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert s1.n == 4  # __add__ did not modify its operands
    s1.add_(s2)
    assert s1.n == 10
    ns = joint.normalized()
    assert ns.S1.dtype == torch.float64 and ns.n == 10
    torch.testing.assert_close(ns.S1, joint.S1 / 10)
    with pytest.raises(ValueError):
        s1.add_(stats_of(SiteNet(True, cin=3, c0=3), [b1], folds=1))


def test_chained_sites_sharing_a_layer():
    """VGG-like conv1 -> conv2 -> conv3: sites (conv1, conv2) and (conv2, conv3) share conv2."""
    torch.manual_seed(0)
    convs = nn.ModuleList([Conv2d(3, 4, 3, 1, 1), Conv2d(4, 3, 3, 1, 1), Conv2d(3, 5, 3, 2, 1)]).to(DT)
    bns = nn.ModuleList([BatchNorm2d(4), BatchNorm2d(3)]).to(DT)
    head = nn.Linear(5 * 16, 5).to(DT)

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs, self.bns, self.head = convs, bns, head

        def forward(self, x):
            x = torch.relu(self.bns[0](self.convs[0](x)))
            x = torch.relu(self.bns[1](self.convs[1](x)))  # in place would be caught, see above
            return self.head(self.convs[2](x).flatten(1))

    net = Chain().train()
    sites = [Site("a", convs[0], convs[1], bns[0]), Site("b", convs[1], convs[2], bns[1])]
    batches = [data(True, 3, seed=5, hw=8), data(True, 4, seed=6, hw=8)]
    both = collect_statistics(net, sites, batches, sum_ce)
    for s in sites:
        one = collect_statistics(net, [s], batches, sum_ce)[s.name]
        for a, b in zip(one.tensors(), both[s.name].tensors()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_site_on_sequences():
    """Linear layers applied to (B, T, d): every token is a position of its sample."""
    class Tokens(SiteNet):
        def forward(self, x):  # x (B, T, cin)
            h = torch.relu(self.l1(torch.tanh(self.pre(x))))
            return self.head(torch.tanh(self.l2(h)).mean(1))

    net = Tokens(False, bn=False, width=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, 3, generator=g, dtype=DT), torch.randint(0, 5, (5,), generator=g)
    st = stats_of(net, [(x, y)])
    x1, h, gr = captured(net, x, y)
    rows = explicit_rows(net, x1.reshape(20, -1), h.reshape(20, -1), gr.reshape(20, -1))
    assert_close_stats(st, explicit_stats(rows, 5))
    assert st.n_folds.tolist() == [3, 2]
