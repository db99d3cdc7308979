"""The small one-site test model (SiteNet: pre -> L1 -> [BN] -> act -> L2 -> head), its data,
the site's captured tensors and the explicit-loop rows of its statistics, and the statistics pass
on it (tests/test_growth_stats.py checks that pass against explicit_rows; test_growth_solve.py,
test_growth_neurons.py, test_firefly.py, test_fullconv.py, test_solve_device.py build on them)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from growrun.models.site import Site
from growrun.growth.stats import collect_statistics
from growrun.models.layers import BatchNorm1d, BatchNorm2d, Conv2d

DT = torch.float64


def randomize_bn(bn) -> None:
    """Non-trivial BatchNorm parameters and running statistics (in place, from torch's RNG)."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)


class SiteNet(nn.Module):
    """pre -> tanh -> L1 -> [BN] -> act -> L2 -> tanh -> flatten -> head (one growth site)."""

    def __init__(self, conv: bool, *, cin=3, c0=2, width=3, m=4, k1=3, s1=1, p1=1, k2=3, s2=1, p2=1,
                 bias1=True, bias2=True, bn=True, act="relu", classes=5, hw=7, dtype=DT, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.act_name = conv, act
        if conv:
            self.pre = nn.Conv2d(cin, c0, 3, padding=1)
            self.l1 = Conv2d(c0, width, k1, s1, p1, bias=bias1)
            self.bn = BatchNorm2d(width) if bn else None
            self.l2 = Conv2d(width, m, k2, s2, p2, bias=bias2)
            h1 = (hw + 2 * p1 - k1) // s1 + 1
            h2 = (h1 + 2 * p2 - k2) // s2 + 1
            self.head = nn.Linear(m * h2 * h2, classes)
        else:
            self.pre = nn.Linear(cin, c0)
            self.l1 = nn.Linear(c0, width, bias=bias1)
            self.bn = BatchNorm1d(width) if bn else None
            self.l2 = nn.Linear(width, m, bias=bias2)
            self.head = nn.Linear(m, classes)
        self.to(dtype)
        if self.bn is not None and width:
            randomize_bn(self.bn)

    def forward(self, x):
        z = self.l1(torch.tanh(self.pre(x)))
        if self.bn is not None:
            z = self.bn(z)
        h = torch.relu(z) if self.act_name == "relu" else z
        return self.head(torch.tanh(self.l2(h)).flatten(1))

    def site(self) -> Site:
        return Site("s", self.l1, self.l2, self.bn, self.act_name)


def sum_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


def data(conv: bool, n: int, *, cin=3, hw=7, classes=5, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, hw, hw, generator=g, dtype=dtype) if conv else torch.randn(n, cin, generator=g, dtype=dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def captured(net: SiteNet, x, y, loss_fn=sum_ce):
    """(x1, h, g) of the site for the batch: g = d(batch loss)/da by autograd on a copy of net."""
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(True)
    store = {}
    hs = [net.l1.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach())),
          net.l2.register_forward_pre_hook(lambda m, a: store.__setitem__("h", a[0].detach())),
          net.l2.register_forward_hook(lambda m, a, o: store.__setitem__("a", o))]
    loss = loss_fn(net(x), y)
    g, = torch.autograd.grad(loss, store["a"])
    for hnd in hs:
        hnd.remove()
    return store["x"], store["h"], g


def explicit_rows(net: SiteNet, x1, h, g):
    """Rows (sample, x_row, h_row, g_row) by explicit loops over samples and L2 output positions.

    Conv: the x-row of L2 output (i, j) is L1's input patch at L1 position q = s2*(i,j) - p2 + c
    (zero when q falls in L2's padding); the h-row is L2's input patch at (i, j). A 1 is appended
    for a layer with a bias.
    """
    l1, l2 = net.l1, net.l2
    one = lambda v, b: torch.cat([v, v.new_ones(1)]) if b else v  # noqa: E731
    b1, b2 = l1.bias is not None, l2.bias is not None
    rows = []
    if not net.conv:
        for i in range(x1.shape[0]):
            rows.append((i, one(x1[i], b1), one(h[i], b2), g[i]))
        return rows
    (k1h, k1w), (s1h, s1w), (p1h, p1w) = l1.kernel_size, l1.stride, l1.padding
    (k2h, k2w), (s2h, s2w), (p2h, p2w) = l2.kernel_size, l2.stride, l2.padding
    xp = F.pad(x1, (p1w, p1w, p1h, p1h))
    hp = F.pad(h, (p2w, p2w, p2h, p2h))
    H1, W1 = h.shape[-2:]
    d1 = x1.shape[1] * k1h * k1w
    for b in range(g.shape[0]):
        for i in range(g.shape[2]):
            for j in range(g.shape[3]):
                hrow = hp[b, :, s2h * i:s2h * i + k2h, s2w * j:s2w * j + k2w].reshape(-1)
                qh, qw = s2h * i - p2h + k2h // 2, s2w * j - p2w + k2w // 2
                if 0 <= qh < H1 and 0 <= qw < W1:
                    xrow = one(xp[b, :, s1h * qh:s1h * qh + k1h, s1w * qw:s1w * qw + k1w].reshape(-1), b1)
                else:
                    xrow = x1.new_zeros(d1 + b1)
                rows.append((b, xrow, one(hrow, b2), g[b, :, i, j]))
    return rows


def stats_of(net, batches, folds=2, loss_fn=sum_ce):
    site = net.site()
    return collect_statistics(net, [site], batches, loss_fn, folds=folds)["s"]
