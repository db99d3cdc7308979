"""growrun.growth.neurons: proposals of every method, inserted in explicitly widened layers
(first-order loss change, function preservation), baselines and degenerate statistics."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from growrun.growth import firefly, splitting
from growrun.errors import GrowrunError
from growrun.growth.methods import REGISTRY as METHODS
from helpers_proposing import propose
from growrun.growth.stats import collect_statistics
from helpers_neurons import _rel_errors, mean_loss, outputs, setup, widen
from helpers_sitenet import DT, SiteNet, data, stats_of, sum_ce

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("one_thread")]


def fan_vectors(site, prop):
    """(alpha (K, d1), omega (K, m)) read back from the Neurons (centre tap for conv)."""
    nz = prop.neurons
    a = nz.w1.reshape(nz.count, -1)
    if nz.b1 is not None:
        a = torch.cat([a, nz.b1.unsqueeze(1)], 1)
    w2 = nz.w2
    om = w2[:, :, w2.shape[2] // 2, w2.shape[3] // 2].T if site.is_conv else w2.T
    return a.to(DT), om.to(DT)


def model_inputs(method, net, batches, loss_fn=sum_ce):
    """propose's extra arguments: firefly trains candidates on the model and batches (test_firefly.py),
    splitting measures its splitting matrices on them (test_splitting.py)."""
    if method == "splitting":
        return {"hook": splitting.proposer(net, batches, loss_fn, generator=torch.Generator().manual_seed(1))}
    if method != "firefly":
        return {}
    return {"hook": firefly.proposer(net, batches, loss_fn, n_candidates=5, steps=3,
                                     generator=torch.Generator().manual_seed(1))}


# ---------------------------------------------------------------- shapes and conventions

@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "splitting"])  # splitting proposes split
def test_proposal_shapes_and_gamma_zero(conv, method):  # directions of existing neurons: tests/test_splitting.py
    net, batches, st = setup(conv, bias1=not conv, bias2=True, m=5)
    site = net.site()
    K = 2
    prop = propose(site, st, method, K, generator=torch.Generator().manual_seed(0),
                   **model_inputs(method, net, batches))
    nz = prop.neurons
    assert nz.count == K and nz.w1.shape == (K, *net.l1.weight.shape[1:])
    assert (nz.b1 is None) == (net.l1.bias is None)
    assert nz.w2.shape == ((5, K, 3, 3) if conv else (5, K))
    assert nz.w1.dtype == torch.float64 == nz.w2.dtype  # the site's own dtype (float64 model)
    if conv and method != "net2net":  # net2net copies whole kernel slices (tests/test_net2net.py)
        off = nz.w2.clone()
        off[:, :, 1, 1] = 0
        assert not off.any()  # fan-out only at the centre tap
    assert prop.dw2.shape == net.l2.weight.shape and prop.db2.shape == net.l2.bias.shape
    assert prop.psi >= 0 and prop.d_w >= 0 and math.isfinite(prop.first_order)
    assert prop.lambdas.dtype == torch.float64
    assert prop.lambdas.numel() == (0 if method not in ("tiny", "tiny_noproj") else min(st.dims[0], 5))
    torch.testing.assert_close(outputs(widen(net, nz, 0.0), batches), outputs(net, batches), rtol=1e-13, atol=1e-13)
    if method in ("gradmax", "zero"):  # function preserving at any amplitude
        torch.testing.assert_close(outputs(widen(net, nz, 1.0), batches), outputs(net, batches), rtol=1e-13, atol=1e-13)
        assert prop.first_order == 0.0
    else:
        assert (outputs(widen(net, nz, 1.0), batches) - outputs(net, batches)).abs().max() > 1e-6


def test_proposal_float32_on_site_device():
    net = SiteNet(True, dtype=torch.float32).eval()
    st = stats_of(net, [data(True, 6, dtype=torch.float32)])
    prop = propose(net.site(), st, "tiny", 2)
    assert prop.neurons.w1.dtype == torch.float32 and prop.dw2.dtype == torch.float32
    assert prop.neurons.w1.device == net.l1.weight.device


def test_stale_statistics_rejected_and_full_fanout_needs_its_statistics():
    net, _, st = setup(False)
    with pytest.raises(ValueError, match="stale"):
        propose(SiteNet(False, width=4).site(), st, "tiny", 1)
    assert propose(net.site(), st, "tiny", 1, conv_fanout="full").count == 1  # Linear: no kernel
    cnet, _, cst = setup(True, n=1)  # centre-tap statistics (conv_fanout=full: tests/test_fullconv.py)
    with pytest.raises(ValueError, match="needs statistics collected with conv_fanout='full'"):
        propose(cnet.site(), cst, "tiny", 1, conv_fanout="full")
    with pytest.raises(ValueError, match="conv_fanout='full': not with method='gradmax'"):
        propose(cnet.site(), cst, "gradmax", 1, conv_fanout="full")
    assert collect_statistics(cnet, [cnet.site()], [], sum_ce, conv_fanout="full")["s"].full is not None
    with pytest.raises(GrowrunError, match="growth.method=bogus: not a growth method; choose one of none, tiny"):
        propose(net.site(), st, "bogus", 1)


# ---------------------------------------------------------------- first order


@pytest.mark.parametrize("conv,kw", [(False, dict(c0=4, width=2)), (True, {}),
                                     (True, dict(s1=2, k2=3, s2=2, p2=0, bias1=False, n=8)),
                                     (True, dict(width=0, bias2=False))])
@pytest.mark.parametrize("method", ["tiny", "tiny_noproj", "random"])
def test_first_order_loss_change_identity_activation(conv, kw, method):
    net, batches, st = setup(conv, act="identity", **kw)
    prop = propose(net.site(), st, method, 2, generator=torch.Generator().manual_seed(1))
    assert prop.first_order < 0
    errs = _rel_errors(net, batches, prop.neurons, prop.first_order, [0.1, 0.03, 0.01])
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3, errs
    assert errs[1] / errs[2] > 5  # shrinks like gamma^2


@pytest.mark.parametrize("conv", [False, True])
def test_best_update_first_order(conv):
    net, batches, st = setup(conv, act="identity")
    prop = propose(net.site(), st, "tiny", 1)
    L0 = mean_loss(net, batches)
    errs = []
    for g in (0.1, 0.01):
        moved = copy.deepcopy(net)
        with torch.no_grad():
            moved.l2.weight.add_(g ** 2 * prop.dw2)
            moved.l2.bias.add_(g ** 2 * prop.db2)
        errs.append(abs((mean_loss(moved, batches) - L0) / g ** 2 + prop.d_w) / prop.d_w)
    assert errs[1] < errs[0] and errs[1] < 1e-3, errs


@pytest.mark.parametrize("conv", [False, True])
def test_tiny_decreases_the_loss_with_relu(conv):
    net, batches, st = setup(conv, act="relu")
    prop = propose(net.site(), st, "tiny", 2)
    L0 = mean_loss(net, batches)
    assert prop.first_order < 0 and prop.bottleneck_gain > 0
    for g in (0.3, 0.1):
        assert mean_loss(widen(net, prop.neurons, g), batches) < L0


# ---------------------------------------------------------------- baselines

@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("width", [3, 0])
def test_gradmax_fanout_norms(conv, width):
    net, batches, st = setup(conv, width=width, m=4)
    site = net.site()
    prop = propose(site, st, "gradmax", 3, gradmax_scale=0.5)
    nz = prop.neurons
    assert not nz.w1.any() and (nz.b1 is None or not nz.b1.any())
    norms = nz.w2.transpose(0, 1).reshape(nz.count, -1).norm(dim=1)
    if width:
        ref = net.l2.weight.detach().transpose(0, 1).reshape(width, -1).norm(dim=1).mean()
    else:
        ref = torch.tensor(math.sqrt(2 * 4 / 3), dtype=DT)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5 * float(ref)))
    _, om = fan_vectors(site, prop)  # directions: top right singular vectors of M1
    vh = torch.linalg.svd(st.normalized().M1, full_matrices=False).Vh[: nz.count]
    torch.testing.assert_close((om / om.norm(dim=1, keepdim=True)).abs(), vh.abs(), rtol=1e-6, atol=1e-8)
    assert propose(site, st, "gradmax", 10).count == min(st.dims[0], 4)  # at most rank(M1) directions


@pytest.mark.parametrize("conv", [False, True])
def test_random_sign_rule_and_reproducibility(conv):
    net, batches, st = setup(conv, act="identity")
    site = net.site()
    prop = propose(site, st, "random", 16, generator=torch.Generator().manual_seed(3))
    a, om = fan_vectors(site, prop)
    per = (a @ st.normalized().M1 * om).sum(1)
    assert bool((per <= 0).all()) and prop.first_order == pytest.approx(float(per.sum()), rel=1e-9)
    again = propose(site, st, "random", 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.neurons.w1, prop.neurons.w1) and torch.equal(again.neurons.w2, prop.neurons.w2)
    other = propose(site, st, "random", 16, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other.neurons.w1, prop.neurons.w1)
    assert not prop.neurons.b1.any()  # He init: bias 0


def test_random_he_scales():
    net, _, st = setup(True, width=3, m=4, c0=4)  # L1 fan-in 4*9 = 36, L2 fan-in (3+K)*9
    K = 3000
    prop = propose(net.site(), st, "random", K, generator=torch.Generator().manual_seed(0))
    assert float(prop.neurons.w1.std()) == pytest.approx(math.sqrt(2 / 36), rel=0.02)
    centre = prop.neurons.w2[:, :, 1, 1]
    assert float(centre.std()) == pytest.approx(math.sqrt(2 / ((3 + K) * 9)), rel=0.05)


def test_zero_method_preserves_function_with_random_fan_in():
    net, batches, st = setup(True)
    prop = propose(net.site(), st, "zero", 3, generator=torch.Generator().manual_seed(0))
    assert prop.neurons.w1.abs().sum() > 0 and not prop.neurons.w2.any()


# ---------------------------------------------------------------- degenerate statistics

@pytest.mark.parametrize("case", ["dead_relu", "n_below_features", "zero_gradient", "width_zero"])
@pytest.mark.parametrize("method", METHODS)
def test_degenerate_statistics_give_no_nan(case, method):
    conv = case != "n_below_features"
    net = SiteNet(conv, c0=30 if not conv else 2, width=0 if case == "width_zero" else 3).eval()
    if case == "dead_relu":
        with torch.no_grad():
            net.l1.bias.fill_(-100.0)
    loss_fn = (lambda z, y: 0.0 * z.sum()) if case == "zero_gradient" else sum_ce
    batches = [data(conv, 2 if conv else 5, seed=1)]
    st = collect_statistics(net, [net.site()], batches, loss_fn)["s"]
    if method == "net2net" and case == "width_zero":  # nothing to copy (refused up front in a run)
        with pytest.raises(ValueError, match="width 0"):
            propose(net.site(), st, method, 4)
        return
    prop = propose(net.site(), st, method, 4, generator=torch.Generator().manual_seed(0),
                   **model_inputs(method, net, batches, loss_fn))
    for t in (prop.neurons.w1, prop.neurons.w2, prop.dw2, prop.lambdas):
        assert torch.isfinite(t).all()
    assert math.isfinite(prop.psi) and math.isfinite(prop.first_order)
    if case == "zero_gradient":
        assert prop.psi == 0.0 and prop.d_w == 0.0 and prop.first_order == 0.0
        if method in ("tiny", "tiny_noproj", "gradmax"):
            assert prop.count == 0
    if case == "dead_relu" and method == "tiny":
        assert prop.count >= 1 and prop.bottleneck_gain > 0
