"""growth=net2net (Net2WiderNet): copies of existing neurons whose fan-outs are split among the
replicas. The function is exactly preserved at insertion (BatchNorm sites in training mode with
batch statistics and in eval mode with the copied running statistics, with and without the
symmetry-breaking fan-out noise), the 'largest' pick against an explicit loop, width-0 sites
refused up front, and a short end-to-end run on synthetic data."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from growrun.growth.methods import REGISTRY as METHODS
from growrun.growth.methods.net2net import net2net_copies, net2net_sources
from helpers_proposing import propose
from growrun.models.site import frozen_bn_stats
from growrun.growth.stats import collect_statistics
from growrun.growth.surgery import insert_copies
from growrun.models import build_model
from growrun.train.optim import build_optimizer
from helpers_cli import cli, read_csv
from helpers_net2net import BASE, MLP, MLP_RUN, RESNET, RESNET_RUN, make

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("restore_torch_threads")]

CASES = [(MLP, "fc1"), (MLP, "fc2"), (RESNET, "layer1.0"), (RESNET, "layer2.0")]
IDS = [f"{a['name']}-{s}" for a, s in CASES]


def net2net_proposal(model, site, x, y, count, **kw):
    loss = lambda z, t: F.cross_entropy(z, t, reduction="sum")  # noqa: E731
    stats = collect_statistics(model, [site], [(x, y)], loss)[site.name]
    return propose(site, stats, "net2net", count, generator=torch.Generator().manual_seed(7), **kw)


def insert(site, proposal, optimizer=None):
    """What the event does for net2net (Net2Net.insert)."""
    copies, l2_weight = net2net_copies(site, proposal.copy_of, proposal.copy_noise)
    insert_copies(site, proposal.copy_of, copies, l2_weight, optimizer)


@pytest.mark.parametrize("arch, name", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("count, noise", [(2, 0.0), (5, 0.0), (5, 0.3)])
def test_insertion_preserves_the_function_exactly(arch, name, mode, count, noise):
    """Train mode: BatchNorm normalises with the batch's statistics, which a copied channel shares
    with its original; eval mode: the running statistics, copied. Either way the output is the
    same up to float64 round-off, also with more copies than neurons and with fan-out noise."""
    model, x, y = make(arch)
    model.train(mode == "train")
    site = model.sites()[name]
    width = site.width
    W2 = site.l2.weight.detach().clone()
    bn = {k: v.detach().clone() for k, v in (("weight", site.bn.weight), ("bias", site.bn.bias),
                                             ("mean", site.bn.running_mean), ("var", site.bn.running_var))}
    proposal = net2net_proposal(model, site, x, y, count, noise=noise)
    assert proposal.count == count and proposal.first_order == 0.0 and proposal.copy_of.shape == (count,)
    optimizer = build_optimizer(model, _optim_cfg())
    with frozen_bn_stats(model):
        before = model(x)
    insert(site, proposal, optimizer)
    with frozen_bn_stats(model):
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    site = model.sites()[name]
    src = proposal.copy_of
    assert site.width == width + count
    # the copies: the originals' fan-in, bias and BatchNorm channel
    assert torch.equal(site.l1.weight[width:], site.l1.weight[src])
    assert site.l1.bias is None or torch.equal(site.l1.bias[width:], site.l1.bias[src])
    for key, attr in (("weight", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
        assert torch.equal(getattr(site.bn, attr)[width:], bn[key][src]), key
    # the fan-outs of every neuron's replicas add up to its original fan-out
    summed = site.l2.weight[:, :width].detach().clone().index_add(1, src, site.l2.weight[:, width:].detach())
    torch.testing.assert_close(summed, W2, rtol=1e-12, atol=1e-14)
    replicas = 1 + torch.bincount(src, minlength=width)
    new = site.l2.weight[:, width:].detach()
    split = W2[:, src] / replicas[src].to(W2).view(1, -1, *([1] * (W2.dim() - 2)))
    if noise == 0:
        torch.testing.assert_close(new, split, rtol=0, atol=0)
    else:  # noise breaks the symmetry, at the requested relative scale
        rel = (new - split).transpose(0, 1).reshape(count, -1).std(1) / \
            split.transpose(0, 1).reshape(count, -1).square().mean(1).sqrt()
        assert float(rel.mean()) == pytest.approx(noise, rel=0.5)
    # the new parameters are in the optimizer (replaced in place)
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in params for p in (site.l1.weight, site.l2.weight, site.bn.weight, site.bn.bias))


def _optim_cfg():
    from types import SimpleNamespace
    return SimpleNamespace(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                           decay_norm_and_bias=False, betas=[0.9, 0.999])


def test_copies_are_made_from_the_weights_at_insertion():
    """sites=all in an MLP: fc1's L2 is fc2's L1. fc2's proposal, made before fc1 grew, still
    copies fc2's rows as they are at its insertion (fc1's new columns included): the function
    stays the same after both insertions."""
    model, x, y = make(MLP)
    sites = model.sites()
    p1 = net2net_proposal(model, sites["fc1"], x, y, 3, noise=0.2)
    p2 = net2net_proposal(model, sites["fc2"], x, y, 2, noise=0.2)
    with frozen_bn_stats(model):
        before = model(x)
    insert(sites["fc1"], p1)
    insert(model.sites()["fc2"], p2)
    with frozen_bn_stats(model):
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    fc2 = model.sites()["fc2"]
    assert torch.equal(fc2.l1.weight[4:], fc2.l1.weight[p2.copy_of])  # full rows, fc1's new inputs included


def _largest_by_loop(W2: torch.Tensor, count: int) -> list[int]:
    width = W2.shape[1]
    norms = []
    for j in range(width):
        total = 0.0
        for v in W2[:, j].reshape(-1).tolist():
            total += v * v
        norms.append(math.sqrt(total))
    order = []
    for _ in range(width):  # repeatedly the largest of the rest, the lower index on a tie
        rest = [j for j in range(width) if j not in order]
        order.append(max(rest, key=lambda j: (norms[j], -j)))
    return [order[k % width] for k in range(count)]


@pytest.mark.parametrize("arch, name", [(MLP, "fc1"), (RESNET, "layer1.0")], ids=["mlp", "resnet"])
def test_largest_pick_matches_an_explicit_loop(arch, name):
    model, _, _ = make(arch)
    site = model.sites()[name]
    with torch.no_grad():
        site.l2.weight[:, 1] = site.l2.weight[:, 0]  # a tie: the lower index first
    for count in (1, 2, site.width, 2 * site.width + 1):
        got = net2net_sources(site, count, "largest").tolist()
        assert got == _largest_by_loop(site.l2.weight.detach(), count), count


def test_random_pick_is_a_seeded_cycled_permutation():
    model, _, _ = make(MLP)
    site = model.sites()["fc1"]  # width 6
    a = net2net_sources(site, 6, "random", torch.Generator().manual_seed(3))
    assert sorted(a.tolist()) == list(range(6))  # without replacement while possible
    b = net2net_sources(site, 14, "random", torch.Generator().manual_seed(3))
    assert b.tolist() == (a.tolist() * 3)[:14]
    assert torch.equal(net2net_sources(site, 6, "random", torch.Generator().manual_seed(3)), a)
    assert net2net_sources(site, 0, "random").numel() == 0


def test_width_zero_site_cannot_copy():
    model = build_model({**MLP, "hidden": [6, 0]})
    with pytest.raises(ValueError, match="width 0"):
        net2net_sources(model.sites()["fc2"], 1)
    assert "net2net" in METHODS


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, extra", [(RESNET_RUN, []),
                                          (MLP_RUN, ["growth.net2net.pick=largest", "growth.net2net.noise=0.1"])],
                         ids=["resnet18", "mlp-sites_all-largest-noise"])
@pytest.mark.slow
def test_net2net_trains_end_to_end(tmp_path, model, extra):
    """Every insertion keeps the loss on the held batch (BatchNorm in training mode), gamma = 1,
    the sites reach their targets in growth.steps events."""
    run_dir = tmp_path / "run"
    assert cli("train", *BASE, *model, *extra, f"hydra.run.dir={run_dir}") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_csv(run_dir / "growth.csv")
    assert summary["status"] == "completed" and rows
    grown = [r for r in rows if int(r["added"])]
    assert grown
    for r in rows:
        assert r["method"] == "net2net" and r["trigger"] == "schedule" and r["reason"] in ("", "budget"), r
        assert float(r["loss_after"]) == pytest.approx(float(r["loss_before"]), rel=1e-5, abs=1e-6), r
        if int(r["added"]):
            assert float(r["gamma"]) == 1.0 and float(r["first_order"]) == 0.0
    targets = [int(v) for v in next(o for o in model if o.startswith("growth.target_widths"))
               .split("=", 1)[1].strip("[]").split(",")]
    assert list(summary["widths"].values()) == targets


@pytest.mark.slow
def test_width_zero_sites_are_refused_up_front(tmp_path, capsys):
    args = [*BASE, *RESNET_RUN, "model.site_widths=[0,1,1,1,1,1,1,2]", f"hydra.run.dir={tmp_path / 'run'}"]
    assert cli("train", *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "growth.method=net2net" in lines[0] and "layer1.0" in lines[0], lines
    assert not (tmp_path / "run").exists()
    # the same site left out of growth.only is fine to start at 0
    args = [*args[:-1], "growth.only=[layer4.1]", "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'only'}"]
    assert cli("train", *args) == 0


def test_apply_dw_is_refused(tmp_path, capsys):
    assert cli("train", *BASE, *MLP_RUN, "growth.apply_dw=true", f"hydra.run.dir={tmp_path / 'run'}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "growth.apply_dw=true" in lines[0] and "net2net" in lines[0], lines
