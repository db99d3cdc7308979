"""New neurons' scale: the logged norms are the inserted slices' norms, and rebalancing
(growth.normalize=fan_in) puts every fan-in at the layer's mean fan-in norm while the grown
model computes exactly what it computes without rebalancing (train and eval mode, with and
without BatchNorm, both BN inits)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from growrun.growth.scale import existing_norms, neuron_norms, rebalance, rebalance_factors
from growrun.growth.site import frozen_bn_stats
from growrun.growth.surgery import insert_neurons, new_channel_moments
from test_surgery import CASES, IDS, make, random_neurons


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
