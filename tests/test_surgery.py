"""Surgery: insertion preserves the function at gamma = 0, the candidate equals the real
insertion at any gamma (with the best update dW2* too), BN starts as the identity, optimizer
state survives growth, neurons computed before a neighbouring site grew still fit."""
from __future__ import annotations

import copy

import pytest
import torch

from growrun.models.site import Neurons, frozen_bn_stats
from growrun.growth.surgery import apply_weight_update, candidate, fit_to_site, insert_neurons, new_channel_moments
from growrun.models import build_model
from growrun.train.optim import build_optimizer
from helpers_surgery import CASES, IDS, make, random_neurons


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_insertion_at_gamma_zero_preserves_the_function(arch, name, mode):
    model, x = make(arch)
    model.train(mode == "train")
    site = model.sites()[name]
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(1))
    mean, var = new_channel_moments(model, site, neurons, [x])
    with frozen_bn_stats(model):
        before = model(x)
    insert_neurons(site, neurons.scaled(0.0), 0 * mean, 0 * var)
    with frozen_bn_stats(model):
        after = model(x)
    assert model.sites()[name].width == site.width
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bn_init", ["unit", "identity"])
def test_candidate_equals_real_insertion(arch, name, mode, bn_init):
    model, x = make(arch)
    model.train(mode == "train")
    site = model.sites()[name]
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(2))
    mean, var = new_channel_moments(model, site, neurons, [x[:8], x[8:]])
    gamma = 0.7
    with frozen_bn_stats(model):
        plain = model(x)
        with candidate(site, neurons, mean, var, bn_init) as cand:
            cand.gamma = 0.0
            at_zero = model(x)
            cand.gamma = gamma
            tried = model(x)
        assert len(site.l1._forward_hooks) == 0 and len(site.l2._forward_hooks) == 0
    torch.testing.assert_close(at_zero, plain, rtol=0, atol=0)
    assert (tried - plain).abs().max() > 1e-3  # the neurons do change the function
    grown = copy.deepcopy(model)
    grown_site = grown.sites()[name]
    insert_neurons(grown_site, neurons.scaled(gamma), gamma * mean, gamma**2 * var, bn_init=bn_init)
    with frozen_bn_stats(grown):
        torch.testing.assert_close(grown(x), tried, rtol=1e-10, atol=1e-10)
    assert grown.sites()[name].width == site.width + 3
    assert grown.arch()["hidden"][list(grown.sites()).index(name)] == site.width + 3


def test_new_channel_moments_match_brute_force():
    arch, name = CASES[2]
    model, x = make(arch)
    site = model.sites()[name]
    neurons = random_neurons(site, 4, torch.Generator().manual_seed(3))
    seen = []
    handle = site.l1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with frozen_bn_stats(model):  # train mode: L1's input depends on the batch, so use the same two
        model(x[:5]), model(x[5:])
    handle.remove()
    z = torch.nn.functional.conv2d(torch.cat(seen), neurons.w1, None, site.l1.stride, site.l1.padding)
    state = copy.deepcopy(model.state_dict())
    mean, var = new_channel_moments(model, site, neurons, [x[:5], x[5:]])
    torch.testing.assert_close(mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(var, z.var((0, 2, 3), unbiased=False))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing changed


def test_new_bn_channels_are_the_identity_in_eval_mode():
    arch, name = CASES[0]
    model, x = make(arch)
    site = model.sites()[name]
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(4))
    mean, var = new_channel_moments(model, site, neurons, [x])
    insert_neurons(site, neurons, mean, var, bn_init="identity")
    model.eval()
    pre, post = [], []
    h1 = site.l1.register_forward_hook(lambda m, i, o: pre.append(o))
    h2 = site.bn.register_forward_hook(lambda m, i, o: post.append(o))
    model(x)
    h1.remove(), h2.remove()
    torch.testing.assert_close(post[0][:, -3:], pre[0][:, -3:], rtol=1e-12, atol=1e-12)


BN_CASES = [(a, s) for a, s in CASES if a.get("batchnorm", True)]


@pytest.mark.parametrize("arch, name", BN_CASES, ids=[f"{a['name']}-{s}" for a, s in BN_CASES])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unit_bn_init_is_the_identity_init_rescaled(arch, name, mode):
    """bn_init=unit computes exactly what bn_init=identity computes (relu is positively
    homogeneous), with new BN weights 1, biases m / sqrt(v + eps) and fan-out times sqrt(v + eps)."""
    model, x = make(arch)
    getattr(model, mode)()
    site = model.sites()[name]
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(7)).scaled(0.4)
    mean, var = new_channel_moments(model, site, neurons, [x])
    grown = {}
    for bn_init in ("identity", "unit"):
        grown[bn_init] = copy.deepcopy(model)
        insert_neurons(grown[bn_init].sites()[name], neurons, mean, var, bn_init=bn_init)
    with frozen_bn_stats(model), torch.no_grad():
        out = {k: m(x) for k, m in grown.items()}
        assert (out["unit"] - model(x)).abs().max() > 1e-3
    torch.testing.assert_close(out["unit"], out["identity"], rtol=1e-10, atol=1e-10)
    ident, unit = grown["identity"].sites()[name], grown["unit"].sites()[name]
    scale = (var + site.bn.eps).sqrt()
    torch.testing.assert_close(unit.bn.weight[-3:].detach(), torch.ones_like(var), rtol=0, atol=0)
    torch.testing.assert_close(ident.bn.weight[-3:].detach(), scale)
    torch.testing.assert_close(unit.bn.bias[-3:].detach(), mean / scale)
    w2_shape = (1, 3) + (1,) * (unit.l2.weight.dim() - 2)
    torch.testing.assert_close(unit.l2.weight[:, -3:].detach(), ident.l2.weight[:, -3:].detach() * scale.view(w2_shape))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_fan_in_channels_get_bn_weight_one_and_change_nothing(mode):
    """GradMax-style neurons (zero fan-in): the constant new channels get BN weight 1, not
    sqrt(eps) (which would leave them ~300x down-scaled once they learn); the function is
    unchanged, and the candidate computes the same as the real insertion."""
    arch, name = CASES[0]
    model, x = make(arch)
    site = model.sites()[name]
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(5))
    neurons = Neurons(torch.zeros_like(neurons.w1), None if neurons.b1 is None else torch.zeros_like(neurons.b1),
                      neurons.w2)
    mean, var = new_channel_moments(model, site, neurons, [x])
    assert torch.equal(var, torch.zeros_like(var))
    getattr(model, mode)()
    with frozen_bn_stats(model), torch.no_grad():
        before = model(x)
        with candidate(site, neurons, mean, var) as cand:
            cand.gamma = 1.0
            tried = model(x)
    insert_neurons(site, neurons, mean, var)
    assert torch.equal(site.bn.weight[-3:].detach(), torch.ones(3, dtype=site.bn.weight.dtype))
    with frozen_bn_stats(model), torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(tried, before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_optimizer_state_survives_growth(opt_name):
    from types import SimpleNamespace

    arch, name = CASES[0]
    torch.manual_seed(0)
    model = build_model(arch)
    cfg = SimpleNamespace(name=opt_name, lr=0.01, momentum=0.9, nesterov=True, betas=[0.9, 0.99],
                          weight_decay=1e-4, decay_norm_and_bias=False)
    opt = build_optimizer(model, cfg)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    site = model.sites()[name]
    old = {"w1": site.l1.weight, "w2": site.l2.weight, "bnw": site.bn.weight}
    old_state = {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in old.items()}
    neurons = random_neurons(site, 2, torch.Generator().manual_seed(5))
    neurons = Neurons(neurons.w1.float(), None, neurons.w2.float())
    mean, var = new_channel_moments(model, site, neurons, [x])
    insert_neurons(site, neurons.scaled(0.1), 0.1 * mean, 0.01 * var, optimizer=opt)
    params = {p for g in opt.param_groups for p in g["params"]}
    assert params == set(model.parameters())
    assert not any(p in opt.state for p in old.values())
    new = {"w1": (site.l1.weight, 0), "w2": (site.l2.weight, 1), "bnw": (site.bn.weight, 0)}
    key = "momentum_buffer" if opt_name == "sgd" else "exp_avg"
    for k, (p, dim) in new.items():
        buf = opt.state[p][key]
        n_old = old[k].shape[dim]
        assert torch.equal(buf.narrow(dim, 0, n_old), old_state[k][key])
        assert torch.count_nonzero(buf.narrow(dim, n_old, 2)) == 0
        if opt_name == "adamw":
            assert torch.equal(opt.state[p]["step"], old_state[k]["step"])
    before = site.l1.weight.detach().clone()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(site.l1.weight, before)
    # a model rebuilt from its arch with a fresh optimizer loads both state dicts
    twin = build_model(model.arch())
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, cfg)
    twin_opt.load_state_dict(opt.state_dict())
    twin_site = twin.sites()[name]
    torch.testing.assert_close(twin_opt.state[twin_site.l1.weight][key], opt.state[site.l1.weight][key])


def test_grow_width_zero_site_twice():
    arch, name = CASES[1]  # layer1.1 starts at width 0
    model, x = make(arch)
    gen = torch.Generator().manual_seed(6)
    for k in (2, 3):
        site = model.sites()[name]
        neurons = random_neurons(site, k, gen)
        mean, var = new_channel_moments(model, site, neurons, [x])
        with frozen_bn_stats(model), candidate(site, neurons, mean, var) as cand:
            cand.gamma = 0.3
            tried = model(x)
        insert_neurons(site, neurons.scaled(0.3), 0.3 * mean, 0.09 * var)
        with frozen_bn_stats(model):
            torch.testing.assert_close(model(x), tried, rtol=1e-10, atol=1e-10)
    assert model.sites()[name].width == 5


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
def test_candidate_with_weight_update_equals_insertion_then_update(arch, name):
    """growth.apply_dw: the line search evaluates the candidate at gamma with L2 += gamma^2 dW2*
    (dW2* of L2's shape before growth); inserting at gamma and applying the same update to the
    existing columns afterwards computes exactly that, and leaves the new columns alone."""
    model, x = make(arch)
    site = model.sites()[name]
    gen = torch.Generator().manual_seed(8)
    neurons = random_neurons(site, 2, gen)
    dw2 = torch.randn(site.l2.weight.shape, generator=gen, dtype=torch.float64)
    db2 = None if site.l2.bias is None else torch.randn(site.out_width, generator=gen, dtype=torch.float64)
    mean, var = new_channel_moments(model, site, neurons, [x]) if site.bn is not None else (None, None)
    gamma, grown = 0.6, copy.deepcopy(model)
    with frozen_bn_stats(model), torch.no_grad(), candidate(site, neurons, mean, var) as cand:
        cand.gamma = gamma
        apply_weight_update(site, dw2, db2, gamma**2)
        tried = model(x)
    g_site = grown.sites()[name]
    insert_neurons(g_site, neurons.scaled(gamma), None if mean is None else gamma * mean,
                   None if var is None else gamma**2 * var)
    new_columns = g_site.l2.weight[:, -2:].detach().clone()
    apply_weight_update(g_site, dw2, db2, gamma**2)
    with frozen_bn_stats(grown), torch.no_grad():
        torch.testing.assert_close(grown(x), tried, rtol=1e-10, atol=1e-10)
    assert torch.equal(g_site.l2.weight[:, -2:], new_columns)


def test_neurons_fit_a_site_whose_neighbour_grew_first():
    """MLP: fc1's L2 is fc2's L1. Neurons for both, computed before either grows; after fc1
    grows, fc2's neurons get zero fan-in from fc1's new units and still insert exactly."""
    arch = {"name": "mlp", "in_features": 3 * 16 * 16, "num_classes": 5, "hidden": [6, 4], "batchnorm": True}
    model, x = make(arch)
    fc1, fc2 = model.sites()["fc1"], model.sites()["fc2"]
    gen = torch.Generator().manual_seed(9)
    first, second = random_neurons(fc1, 2, gen), random_neurons(fc2, 3, gen)
    insert_neurons(fc1, first, *new_channel_moments(model, fc1, first, [x]))
    fitted = fit_to_site(fc2, second)
    assert fitted.w1.shape == (3, 8) and torch.equal(fitted.w1[:, :6], second.w1)
    assert torch.count_nonzero(fitted.w1[:, 6:]) == 0 and fit_to_site(fc1, first) is first
    mean, var = new_channel_moments(model, fc2, fitted, [x])
    with frozen_bn_stats(model), torch.no_grad(), candidate(fc2, fitted, mean, var) as cand:
        cand.gamma = 0.5
        tried = model(x)
    insert_neurons(fc2, fitted.scaled(0.5), 0.5 * mean, 0.25 * var)
    with frozen_bn_stats(model), torch.no_grad():
        torch.testing.assert_close(model(x), tried, rtol=1e-10, atol=1e-10)
