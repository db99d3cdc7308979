"""New neurons inserted by hand into a SiteNet (helpers_sitenet.py): an explicitly widened copy
(widen), the mean loss and outputs over batches, a model with its batches and statistics (setup),
and the first-order check's relative errors (_rel_errors). Used by test_growth_neurons.py,
test_firefly.py, test_fullconv.py, test_own_method.py, test_growth_scale.py."""
from __future__ import annotations

import copy

import torch
from torch import nn

from growrun.models.site import Neurons
from growrun.models.layers import Conv2d
from helpers_sitenet import DT, SiteNet, data, stats_of, sum_ce


def widen(net: SiteNet, neurons: Neurons, gamma: float) -> SiteNet:
    """A copy of net whose site has the neurons appended at amplitude gamma (explicit layers).

    New BatchNorm channels are the identity in eval mode (mean 0, var 1 - eps, weight 1, bias 0).
    """
    net = copy.deepcopy(net)
    nz = neurons.scaled(gamma)
    K = nz.count
    l1, l2, bn = net.l1, net.l2, net.bn
    with torch.no_grad():
        if net.conv:
            n1 = Conv2d(l1.in_channels, l1.out_channels + K, l1.kernel_size, l1.stride, l1.padding,
                        bias=l1.bias is not None).to(DT)
            n2 = Conv2d(l2.in_channels + K, l2.out_channels, l2.kernel_size, l2.stride, l2.padding,
                        bias=l2.bias is not None).to(DT)
        else:
            n1 = nn.Linear(l1.in_features, l1.out_features + K, bias=l1.bias is not None).to(DT)
            n2 = nn.Linear(l2.in_features + K, l2.out_features, bias=l2.bias is not None).to(DT)
        n1.weight.copy_(torch.cat([l1.weight, nz.w1.to(DT)]))
        if l1.bias is not None:
            n1.bias.copy_(torch.cat([l1.bias, nz.b1.to(DT)]))
        n2.weight.copy_(torch.cat([l2.weight, nz.w2.to(DT)], dim=1))
        if l2.bias is not None:
            n2.bias.copy_(l2.bias)
        net.l1, net.l2 = n1, n2
        if bn is not None:
            nb = type(bn)(bn.num_features + K, eps=bn.eps).to(DT)
            nb.weight.copy_(torch.cat([bn.weight, torch.ones(K, dtype=DT)]))
            nb.bias.copy_(torch.cat([bn.bias, torch.zeros(K, dtype=DT)]))
            nb.running_mean.copy_(torch.cat([bn.running_mean, torch.zeros(K, dtype=DT)]))
            nb.running_var.copy_(torch.cat([bn.running_var, torch.full((K,), 1 - bn.eps, dtype=DT)]))
            nb.train(bn.training)
            net.bn = nb
    return net


def mean_loss(net, batches):
    with torch.no_grad():
        return sum(float(sum_ce(net(x), y)) for x, y in batches) / sum(x.shape[0] for x, _ in batches)


def outputs(net, batches):
    with torch.no_grad():
        return torch.cat([net(x) for x, _ in batches])


def setup(conv, *, act="relu", width=3, n=3, seed=0, **kw):
    net = SiteNet(conv, act=act, width=width, seed=seed, **kw).eval()
    batches = [data(conv, 8 if conv else 40, seed=s) for s in range(1, n + 1)]
    return net, batches, stats_of(net, batches)


def _rel_errors(net, batches, neurons, predicted, gammas):
    L0 = mean_loss(net, batches)
    return [abs((mean_loss(widen(net, neurons, g), batches) - L0) / g ** 2 - predicted) / abs(predicted)
            for g in gammas]
