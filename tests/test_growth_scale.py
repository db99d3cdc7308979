"""New neurons' scale: the logged norms are the inserted slices' norms, and rebalancing
(growth.normalize=fan_in) puts every fan-in at the layer's mean fan-in norm while the grown
model computes exactly what it computes without rebalancing (train and eval mode, with and
without BatchNorm, both BN inits). growth.normalize=fan_out does the same for the fan-outs (the
columns as inserted at the existing mean norm, the same function); mean_norm (GradMax's rule)
puts fan-ins at the mean norm and fan-outs at gradmax_scale x theirs, changing each neuron's
contribution by exactly its reported gain, gives growth=gradmax its own neurons, and grows
through the CLI without a line search; combinations that make no sense are refused."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers_proposing import propose
from growrun.growth.scale import existing_norms, neuron_norms, normalized, rebalance, rebalance_factors, reference_norms
from growrun.models.site import Neurons, frozen_bn_stats
from growrun.growth.surgery import insert_neurons, new_channel_moments
from helpers_cli import SMALL, cli, one_line_error, read_csv
from helpers_matrix import overrides
from helpers_neurons import setup
from helpers_surgery import CASES, IDS, make, random_neurons

pytestmark = pytest.mark.usefixtures("one_thread")


def _norms_by_loop(w: torch.Tensor, dim: int) -> list[float]:
    return [math.sqrt(float((w.detach().select(dim, j) ** 2).sum())) for j in range(w.shape[dim])]


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
def test_norms_are_the_mean_row_and_column_norms(arch, name):
    model, _ = make(arch)
    site = model.sites()[name]
    fin, fout = existing_norms(site)
    if site.width == 0:
        assert math.isnan(fin) and math.isnan(fout)
        return
    assert fin == pytest.approx(sum(_norms_by_loop(site.l1.weight, 0)) / site.width, rel=1e-12)
    assert fout == pytest.approx(sum(_norms_by_loop(site.l2.weight, 1)) / site.width, rel=1e-12)
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(4))
    nin, nout = neuron_norms(neurons.w1, neurons.w2)
    assert nin == pytest.approx(sum(_norms_by_loop(neurons.w1, 0)) / 3, rel=1e-12)
    assert nout == pytest.approx(sum(_norms_by_loop(neurons.w2, 1)) / 3, rel=1e-12)


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bn_init", ["unit", "identity"])
def test_rebalanced_insertion_computes_the_same_function(arch, name, mode, bn_init):
    model, x = make(arch)
    model.train(mode == "train")
    site = model.sites()[name]
    width = site.width
    expected = math.sqrt(2.0) if width == 0 else sum(_norms_by_loop(site.l1.weight, 0)) / width
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(5)).scaled(1.7)
    mean, var = new_channel_moments(model, site, neurons, [x])
    balanced = copy.deepcopy(model)
    bsite = balanced.sites()[name]
    c = rebalance_factors(bsite, neurons.w1)
    insert_neurons(site, neurons, mean, var, bn_init=bn_init)
    insert_neurons(bsite, rebalance(neurons, c), mean * c, var * c * c, bn_init=bn_init)

    with frozen_bn_stats(model), frozen_bn_stats(balanced):
        torch.testing.assert_close(balanced(x), model(x), rtol=1e-9, atol=1e-10)
    rows = torch.tensor(_norms_by_loop(bsite.l1.weight[width:], 0), dtype=torch.float64)
    torch.testing.assert_close(rows, torch.full_like(rows, expected), rtol=1e-12, atol=0)
    assert not torch.allclose(bsite.l1.weight[width:], site.l1.weight[width:])  # it did rescale


def _grow_both(arch, name, mode, bn_init, how, scale=0.5):
    """(model grown with the neurons as they are, model grown with them normalized by `how`, the
    site's width before, its reference norms (r_in, r_out) before, the Normalized)."""
    model, x = make(arch)
    model.train(mode == "train")
    site = model.sites()[name]
    width, refs = site.width, reference_norms(site, 3)
    neurons = random_neurons(site, 3, torch.Generator().manual_seed(5)).scaled(1.7)
    mean, var = new_channel_moments(model, site, neurons, [x])
    other = copy.deepcopy(model)
    osite = other.sites()[name]
    out = normalized(osite, neurons, mean, var, how, bn_init, scale)
    insert_neurons(osite, out.neurons, out.mean, out.var, bn_init=bn_init, bn_weight=out.bn_weight)
    return model, other, x, site, neurons, (mean, var), width, refs, out


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bn_init", ["unit", "identity"])
@pytest.mark.parametrize("how", ["fan_in", "fan_out"])
def test_function_preserving_choices_keep_the_output_and_set_the_norms(arch, name, mode, bn_init, how):
    """fan_in / fan_out: the grown model computes what it computes with the neurons as given,
    and the chosen side of every new neuron, as inserted, has the site's reference norm."""
    model, other, x, site, neurons, (mean, var), width, (r_in, r_out), _ = _grow_both(arch, name, mode, bn_init, how)
    insert_neurons(site, neurons, mean, var, bn_init=bn_init)
    osite = other.sites()[name]
    with frozen_bn_stats(model), frozen_bn_stats(other):
        torch.testing.assert_close(other(x), model(x), rtol=1e-9, atol=1e-10)
    if how == "fan_in":
        got, new, old = _norms_by_loop(osite.l1.weight[width:], 0), osite.l1.weight[width:], site.l1.weight[width:]
    else:
        got, new, old = _norms_by_loop(osite.l2.weight[:, width:], 1), osite.l2.weight[:, width:], site.l2.weight[:, width:]
    got = torch.tensor(got, dtype=torch.float64)
    torch.testing.assert_close(got, torch.full_like(got, r_in if how == "fan_in" else r_out), rtol=1e-9, atol=0)
    assert not torch.allclose(new, old)  # it did rescale


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bn_init", ["unit", "identity"])
def test_mean_norm_sets_both_norms_and_scales_each_contribution_by_its_gain(arch, name, mode, bn_init):
    """mean_norm: fan-ins at r_in, fan-outs as inserted at 0.7 r_out (directions kept), and the
    grown model is the one grown with each neuron's fan-out times its gain g_k (module doc)."""
    model, other, x, site, neurons, (mean, var), width, (r_in, r_out), out = \
        _grow_both(arch, name, mode, bn_init, "mean_norm", scale=0.7)
    osite = other.sites()[name]
    rows = torch.tensor(_norms_by_loop(osite.l1.weight[width:], 0), dtype=torch.float64)
    cols = torch.tensor(_norms_by_loop(osite.l2.weight[:, width:], 1), dtype=torch.float64)
    torch.testing.assert_close(rows, torch.full_like(rows, r_in), rtol=1e-9, atol=0)
    torch.testing.assert_close(cols, torch.full_like(cols, 0.7 * r_out), rtol=1e-9, atol=0)
    assert not torch.allclose(out.gain, torch.ones_like(out.gain))
    shape = (1, -1, *([1] * (neurons.w2.dim() - 2)))
    insert_neurons(site, Neurons(neurons.w1, neurons.b1, neurons.w2 * out.gain.view(shape)), mean, var, bn_init=bn_init)
    with frozen_bn_stats(model), frozen_bn_stats(other):
        torch.testing.assert_close(other(x), model(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("width", [3, 0])
def test_mean_norm_gives_gradmax_its_own_neurons(conv, width):
    """growth=gradmax with normalize=mean_norm inserts what it inserts by default."""
    net, _, st = setup(conv, width=width, m=4)
    site = net.site()
    prop = propose(site, st, "gradmax", 3, gradmax_scale=0.6)
    out = normalized(site, prop.neurons, None, None, "mean_norm", scale=0.6)
    assert not out.neurons.w1.any() and out.bn_weight is None
    torch.testing.assert_close(out.neurons.w2, prop.neurons.w2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.gain, torch.ones_like(out.gain), rtol=1e-6, atol=0)
    doubled = normalized(site, prop.neurons.scaled(2.0), None, None, "mean_norm", scale=0.6)
    torch.testing.assert_close(doubled.neurons.w2, prop.neurons.w2, rtol=1e-6, atol=1e-9)  # the norm is set, not kept


@pytest.mark.slow
@pytest.mark.parametrize("normalize, method", [("fan_out", "tiny"), ("mean_norm", "tiny"), ("mean_norm", "random")])
def test_cli_run_grows_with_each_new_choice(tmp_path, normalize, method):
    """A run grows; fan_out inserts at the searched loss with fan-outs at the existing mean norm;
    mean_norm inserts at gamma = 1, fan-outs at gradmax_scale x the existing mean norm."""
    run_dir = tmp_path / "run"
    args = [*overrides({"model": "resnet18", "growth": method, "growth.neurons": "to_target", "growth.sites": "all",
                        "growth.bn_init": "unit", "growth.normalize": normalize, "growth.dt": 1.0,
                        "growth.rel_eps": 1e-7, "growth.apply_dw": False, "growth.param_budget": "none",
                        "growth.extra_epochs": None}), "growth.gradmax_scale=0.3"]
    assert cli("train", *args, f"hydra.run.dir={run_dir}") == 0
    rows = read_csv(run_dir / "growth.csv")
    grown = [r for r in rows if int(r["added"]) > 0]
    assert grown, "nothing grew"
    checked = 0
    for r in grown:
        assert float(r["loss_after"]) == pytest.approx(float(r["loss_candidate"]), rel=1e-4, abs=1e-6), r
        if normalize == "mean_norm":
            assert float(r["gamma"]) == 1.0, r
        if int(r["width_after"]) > int(r["added"]):  # the site had neurons: the logged reference
            checked += 1
            target = float(r["fanout_ref"]) * (0.3 if normalize == "mean_norm" else 1.0)
            assert float(r["fanout_norm"]) == pytest.approx(target, rel=1e-4), r
            if normalize == "mean_norm":
                assert float(r["fanin_norm"]) == pytest.approx(float(r["fanin_ref"]), rel=1e-4), r
    assert checked, "no site with neurons grew"


REFUSED = [
    (["growth=net2net", "growth.normalize=fan_out"], "growth.normalize=fan_out: not with growth.method=net2net"),
    (["growth=net2net", "growth.normalize=mean_norm"], "growth.normalize=mean_norm: not with growth.method=net2net"),
    (["growth=zero", "growth.normalize=fan_out"], "growth.normalize=fan_out: not with growth.method=zero"),
    (["growth=zero", "growth.normalize=mean_norm"], "growth.normalize=mean_norm: not with growth.method=zero"),
    (["growth=gradmax", "growth.normalize=fan_out"], "use growth.normalize=fan_in|none|mean_norm"),
    (["growth=tiny", "growth.normalize=mean_norm", "growth.apply_dw=true"],
     "growth.apply_dw=true: not with growth.normalize=mean_norm"),
    (["growth=tiny", "growth.normalize=fan_outs"], "growth.normalize=fan_outs: not an allowed value; choose one of "
                                                   "fan_in, none, fan_out, mean_norm"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", REFUSED, ids=[" ".join(e) for e, _ in REFUSED])
def test_senseless_combinations_are_refused(tmp_path, run_cli, extra, expected):
    line = one_line_error(run_cli("train", *SMALL, *extra, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert expected in line, line
    assert not (tmp_path / "run").exists()
