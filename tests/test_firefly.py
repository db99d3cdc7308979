"""growth=firefly (growrun.growth.firefly): the scores against brute-force finite differences of
the loss and the selection against an explicit loop, the kept neurons' first-order loss change
against the measured one (explicitly widened layers and the line search's candidate hooks),
the model left untouched, the Proposal, and a short end-to-end run on synthetic data."""
from __future__ import annotations

import copy
import csv
import json
import math
import threading

import pytest
import torch
from helpers_interrupt import summing_reduce

from growrun.growth import firefly
from growrun.growth.linesearch import at_gamma
from growrun.growth.methods import REGISTRY as METHODS
from helpers_proposing import propose
from growrun.models.site import Neurons
from growrun.growth.surgery import new_channel_moments
from helpers_cli import cli
from helpers_neurons import mean_loss, widen
from helpers_sitenet import DT, SiteNet, data, stats_of, sum_ce

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("one_thread", "restore_torch_threads")]

CASES = [dict(conv=False, bn=True), dict(conv=False, bn=False), dict(conv=True, bn=True),
         dict(conv=True, bn=False, s2=2), dict(conv=True, bn=True, s2=2, p2=0, bias1=False)]
IDS = ["linear-bn", "linear", "conv-bn", "conv-stride2", "conv-stride2-pad0"]  # pad0: the full-kernel path


def setup(conv, *, bn=True, n=3, seed=0, **kw):
    """An eval-mode SiteNet (BatchNorm with running statistics: a new BN channel that is the
    identity is exactly the identity) and its statistics batches."""
    net = SiteNet(conv, bn=bn, width=3, seed=seed, **kw).eval()
    batches = [data(conv, 6 if conv else 30, seed=s) for s in range(1, n + 1)]
    return net, batches


def train(net, batches, count, **kw):
    kw = {"n_candidates": 7, "steps": 12, "lr": 3e-3, "generator": torch.Generator().manual_seed(4), **kw}
    return firefly.firefly_candidates(net, net.site(), batches, sum_ce, count, **kw)


def one(nr: Neurons, k: int, fanout_scale: float = 1.0) -> Neurons:
    """Candidate k alone, its fan-out times fanout_scale."""
    b1 = None if nr.b1 is None else nr.b1[k:k + 1]
    return Neurons(nr.w1[k:k + 1], b1, fanout_scale * nr.w2[:, k:k + 1])


# ---------------------------------------------------------------- scores and selection

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scores_match_finite_differences_and_the_top_k_are_kept(case):
    """Every candidate's score is d L(f + e c_k) / d e at e = 0, by central finite differences on
    explicitly widened layers (candidate k alone, its fan-out times e); the kept candidates are
    the `count` smallest scores, found by an explicit loop (smallest first, lower index on ties)."""
    net, batches = setup(**case)
    res = train(net, batches, 3)
    C = res.neurons.count
    assert C == 7 and res.scores.shape == (C,) and res.scores.dtype == torch.float64
    L0 = mean_loss(net, batches)
    brute = []
    for k in range(C):
        e = 1e-4
        up = mean_loss(widen(net, one(res.neurons, k, e), 1.0), batches)
        down = mean_loss(widen(net, one(res.neurons, k, -e), 1.0), batches)
        brute.append((up - down) / (2 * e))
    assert mean_loss(widen(net, one(res.neurons, 0, 0.0), 1.0), batches) == pytest.approx(L0, abs=1e-14)
    torch.testing.assert_close(res.scores, torch.tensor(brute, dtype=DT), rtol=1e-6, atol=1e-10)
    order = []
    for _ in range(3):  # repeatedly the smallest remaining score
        rest = [k for k in range(C) if k not in order]
        order.append(min(rest, key=lambda k: (brute[k], k)))
    assert res.kept.tolist() == order
    kept, scores = res.chosen()
    assert kept.count == 3 and torch.equal(kept.w1, res.neurons.w1[res.kept])
    assert torch.equal(scores, res.scores[res.kept])


def test_select_ties_and_bounds():
    s = torch.tensor([0.5, -1.0, -1.0, 0.0, -2.0], dtype=DT)
    assert firefly.select(s, 3).tolist() == [4, 1, 2]
    assert firefly.select(s, 0).tolist() == [] and firefly.select(s, 9).tolist() == [4, 1, 2, 3, 0]


# ---------------------------------------------------------------- first order

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_measured_loss_change_matches_the_first_order_prediction(case):
    """The kept neurons inserted at amplitude gamma (gamma a, gamma w) change the mean loss by
    gamma^2 * first_order + O(gamma^4) (relu is positively homogeneous, the new BN channels the
    identity): measured on explicitly widened layers, the relative error shrinks like gamma^2."""
    net, batches = setup(**case)
    prop = propose(net.site(), stats_of(net, batches), "firefly", 3,
                   hook=firefly.proposer(net, batches, sum_ce, n_candidates=8, steps=12, lr=3e-3,
                                            generator=torch.Generator().manual_seed(2)))
    assert prop.count == 3 and prop.first_order < 0
    assert prop.first_order == pytest.approx(float(prop.per_neuron.sum()), rel=1e-12)
    L0 = mean_loss(net, batches)
    errors = []
    for gamma in (0.3, 0.1, 0.03):
        measured = (mean_loss(widen(net, prop.neurons, gamma), batches) - L0) / gamma**2
        errors.append(abs(measured - prop.first_order) / abs(prop.first_order))
    assert errors[2] < 1e-3 and errors[0] > errors[1] > errors[2], errors
    assert errors[1] / errors[2] > 5, errors  # ~ gamma^2


def test_line_search_hooks_measure_the_same_change():
    """What the controller evaluates (surgery.candidate with the new channels' measured moments,
    at_gamma) is the explicitly widened network: L(gamma) - L(0) ~ gamma^2 first_order."""
    net, batches = setup(True, bn=True)
    site = net.site()
    prop = propose(site, stats_of(net, batches), "firefly", 2,
                   hook=firefly.proposer(net, batches, sum_ce, n_candidates=5, steps=8, lr=3e-3,
                                            generator=torch.Generator().manual_seed(3)))
    moments = new_channel_moments(net, site, prop.neurons, [x for x, _ in batches])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    mean_ce = lambda z, t: sum_ce(z, t) / t.shape[0]  # noqa: E731
    for gamma in (0.1, 0.01):
        found = at_gamma(net, site, prop.neurons, moments, prop.first_order, gamma, (x, y), mean_ce)
        assert found.gamma == gamma and found.evaluations == 2
        explicit = mean_loss(widen(net, prop.neurons, gamma), batches)
        assert found.loss_at_gamma == pytest.approx(explicit, rel=1e-10)
        assert found.predicted == pytest.approx(prop.first_order * gamma**2)
    rel = abs((found.loss_at_gamma - found.loss_before) / 0.01**2 - prop.first_order) / abs(prop.first_order)
    assert rel < 1e-3
    none = at_gamma(net, site, prop.neurons.take(0), None, 0.0, 1.0, (x, y), mean_ce, base=found.loss_before)
    assert none.gamma == 0.0 and none.evaluations == 0 and none.loss_at_gamma == found.loss_before


# ---------------------------------------------------------------- candidates, training, the model

def test_candidates_drawn_as_the_reference_and_trained():
    """Initial fan-ins N(0, 0.1^2), fan-outs U(-eps, eps) (steps=0: as drawn, same draws for the
    same generator); the training lowers the loss with every candidate attached and moves them."""
    net, batches = setup(False, c0=40, n=2)
    site = net.site()
    a0, w0 = firefly.initial_candidates(site, 500, 0.02, torch.Generator().manual_seed(0))
    assert float(a0.std()) == pytest.approx(0.1, rel=0.05) and a0.shape == (500, 40)
    assert float(w0.abs().max()) <= 0.02 and float(w0.abs().mean()) == pytest.approx(0.01, rel=0.1)
    untrained = train(net, batches, 2, steps=0, eps=0.02, n_candidates=500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(untrained.neurons.w1, a0) and torch.equal(untrained.neurons.w2, w0.T)
    one_pass = train(net, batches, 2, steps=None)
    assert one_pass.steps == len(batches) == 2 and one_pass.flops_per_image == 2 * (7 * 40 + 4 * 7)
    before = train(net, batches, 2, steps=0)
    after = train(net, batches, 2, steps=30, lr=1e-2)
    assert not torch.equal(before.neurons.w1, after.neurons.w1)
    all_on = lambda nr: mean_loss(widen(net, nr, 1.0), batches)  # noqa: E731
    assert all_on(after.neurons) < all_on(before.neurons)
    assert float(after.scores[after.kept].sum()) < float(before.scores[before.kept].sum())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_is_left_untouched(mode):
    net, batches = setup(True)
    net.train(mode == "train")
    for p in net.parameters():
        p.requires_grad_(True)
    state = copy.deepcopy(net.state_dict())
    res = train(net, batches, 2)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in net.parameters())
    assert net.training == (mode == "train") and res.kept.numel() == 2
    assert not net.l1._forward_hooks and not net.l2._forward_hooks


def test_ranks_sharing_the_batches_keep_the_same_candidates():
    """DDP: two ranks (threads here), each with half of every batch and `reduce` summing over
    them, train and score exactly as one process on the whole batches, and agree bit for bit."""
    net, batches = setup(True, bn=True, n=2)  # eval mode: BatchNorm does not depend on the shard
    barrier, slots = threading.Barrier(2, timeout=120), [None, None]  # a rank that fails breaks it, no hang

    def reduce_of(rank):
        return summing_reduce(slots, barrier, rank)

    results = [None, None]

    def rank(r):
        mine = copy.deepcopy(net)
        shards = [(x[r::2], y[r::2]) for x, y in batches]
        results[r] = train(mine, shards, 3, reduce=reduce_of(r))

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and None not in results, "a rank thread failed or hung"
    alone = train(net, batches, 3)
    assert torch.equal(results[0].neurons.w1, results[1].neurons.w1)
    assert torch.equal(results[0].scores, results[1].scores)
    torch.testing.assert_close(results[0].neurons.w1, alone.neurons.w1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[0].neurons.w2, alone.neurons.w2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[0].scores, alone.scores, rtol=1e-9, atol=1e-13)
    assert results[0].kept.tolist() == alone.kept.tolist()


def test_proposal_shapes_counts_and_no_hook():
    net, batches = setup(True, bn=True, m=5)
    site, st = net.site(), stats_of(net, batches)
    hook = firefly.proposer(net, batches, sum_ce, n_candidates=4, steps=2, generator=torch.Generator().manual_seed(0))
    prop = propose(site, st, "firefly", 6, hook=hook)  # more requested than candidates: C = count
    nz = prop.neurons
    assert prop.count == 6 and nz.w1.shape == (6, *net.l1.weight.shape[1:]) and nz.w2.shape == (5, 6, 3, 3)
    assert not nz.b1.any() and prop.per_neuron.shape == (6,) and prop.lambdas.numel() == 0
    off = nz.w2.clone()
    off[:, :, 1, 1] = 0
    assert not off.any()  # fan-out at the centre tap
    assert prop.take(2).first_order == pytest.approx(float(prop.per_neuron[:2].sum()))
    assert bool((prop.per_neuron[:-1] <= prop.per_neuron[1:]).all())  # best (most negative) first
    assert propose(site, st, "firefly", 0, hook=hook).count == 0
    with pytest.raises(ValueError, match="firefly"):
        propose(site, st, "firefly", 2)
    assert "firefly" in METHODS


# ---------------------------------------------------------------- end to end

GROW = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=16", "model=resnet18",
        "model.width=0.125", "model.start_fraction=0.015625", "growth=firefly", "growth.target_fraction=0.0625",
        "growth.steps=2", "growth.dt=0.5", "growth.samples=128", "growth.stats_batch_size=64",
        "growth.line_search.batch_size=64", "trainer.batch_size=64", "trainer.epochs=3", "trainer.threads=1",
        "trainer.progress=off", "dataset.augment=true", "growth.firefly.steps=6", "growth.firefly.candidates=12"]


@pytest.mark.slow
def test_firefly_trains_end_to_end(tmp_path):
    """Every site reaches its target in growth.steps events; each insertion at gamma = 1, the loss
    after insertion the one the candidate hooks measured, and about the predicted change."""
    run_dir = tmp_path / "run"
    assert cli("train", *GROW, f"hydra.run.dir={run_dir}") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "growth.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert summary["status"] == "completed" and rows
    for r in rows:
        assert r["method"] == "firefly" and r["reason"] in ("", "budget"), r
        if int(r["added"]):
            assert float(r["gamma"]) == 1.0 and float(r["first_order"]) < 0
            assert float(r["loss_after"]) == pytest.approx(float(r["loss_candidate"]), rel=1e-4)
    targets = [math.ceil(w / 16) for w in (64, 64, 128, 128, 256, 256, 512, 512)]
    assert list(summary["widths"].values()) == targets
    metrics = list(csv.DictReader((run_dir / "metrics.csv").open(newline="")))
    assert float(metrics[-1]["growth_flops"]) > 0


@pytest.mark.parametrize("bad, key", [("growth.stats=training", "growth.stats=training"),
                                      ("growth.apply_dw=true", "growth.apply_dw=true"),
                                      ("growth.firefly.lr=0", "growth.firefly.lr")])
def test_refused_up_front(tmp_path, capsys, bad, key):
    assert cli("train", *GROW, bad, f"hydra.run.dir={tmp_path / 'run'}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], lines
    assert not (tmp_path / "run").exists()
