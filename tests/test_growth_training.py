"""Growth inside training: policy arithmetic, the line search on real surgery, the growth log,
and exact resume across growth events."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers_shared import built_once
from torch import nn

from growrun.config import store  # noqa: F401
from growrun.growth import policy
from growrun.growth.linesearch import line_search
from helpers_proposing import propose
from growrun.models.site import Neurons, Site
from growrun.growth.stats import collect_statistics
from growrun.growth.surgery import candidate, insert_neurons
from growrun.train import run as run_module
from growrun.train.outputs import load_checkpoint
from growrun.train.trainer import Trainer
from helpers_training import compose_cfg, read


def gcfg(**kw):
    base = dict(dt=1.0, first_epoch=1.0, last_epoch=None, target_widths=None, target_fraction=1.0, only=None,
                neurons="to_target", count=4, steps=4, param_budget=0)
    return SimpleNamespace(**{**base, **kw})


def test_growth_steps_with_fractional_dt():
    assert policy.growth_steps(gcfg(dt=0.25, first_epoch=1.0, last_epoch=2.0), 8, 5) == [8, 10, 12, 14, 16]
    assert policy.growth_steps(gcfg(), 10, 3) == [10, 20]  # never after the last step
    assert policy.growth_steps(gcfg(dt=0.5, first_epoch=0.5), 4, 2) == [2, 4, 6]
    # rounded per event, not per interval: dt = 0.25 of 390 steps (97.5) does not drift
    due = policy.growth_steps(gcfg(dt=0.25, first_epoch=0.25), 390, 3)
    assert len(due) == 11 and due[3] == 390 and due[7] == 780 and due[0] == 98 and due[1] == 195
    # a dt below one step still gives one event per step
    assert policy.growth_steps(gcfg(dt=0.1, first_epoch=0.0), 4, 1) == [1, 2, 3]


def test_targets_counts_and_site_choice():
    names = ["a", "b", "c"]
    t = policy.target_widths(gcfg(target_fraction=0.25), names, [64, 128, 10], [1, 2, 5])
    assert t == {"a": 16, "b": 32, "c": 5}
    assert policy.target_widths(gcfg(only=["b"]), names, [64, 128, 10], [1, 2, 5]) == {"a": 1, "b": 128, "c": 5}
    # to_target: `steps` events of ceil((target - start) / steps) reach the target exactly
    width = 1
    for _ in range(4):
        width += policy.neuron_count(gcfg(), width, 1, 16, 0, 10)
    assert width == 16
    assert policy.neuron_count(gcfg(neurons="fixed", count=3), 15, 1, 16, 0, 10) == 1
    assert policy.neuron_count(gcfg(neurons="fixed", count=3, param_budget=1025), 1, 1, 16, 1000, 10) == 2
    assert policy.affordable(gcfg(), 10**9, 10) is None
    assert policy.affordable(gcfg(param_budget=1025), 1000, 10) == 2
    assert policy.affordable(gcfg(param_budget=999), 1000, 1) == 0
    assert policy.requested_count(gcfg(neurons="fixed", count=3, param_budget=1025), 1, 1, 16) == 3
    assert policy.pick_sites("round_robin", ["a", "c"], names, 1) == ["c"]
    assert policy.pick_sites("round_robin", ["a"], names, 1) == ["a"]
    assert policy.pick_sites("best_gain", ["a", "b"], names, 0, {"a": 1.0, "b": 2.0}) == ["b"]
    assert policy.pick_sites("all", ["a", "b"], names, 0) == ["a", "b"]


def test_growth_draws_shrink_to_a_small_training_set():
    """Both draws as asked when they fit; else in proportion, each >= 2, together every image;
    below 4 images a one-line error. Statistics batches never hold a single image."""
    from growrun.errors import GrowrunError
    from growrun.growth.draws import _chunks

    assert policy.draw_sizes(1536, 1024, 512) == (1024, 512)
    assert policy.draw_sizes(256, 1024, 512) == (171, 85)
    assert policy.draw_sizes(5, 1024, 2) == (3, 2) and policy.draw_sizes(4, 2, 1024) == (2, 2)
    with pytest.raises(GrowrunError, match="at least 4 training images .* has 3$"):
        policy.draw_sizes(3, 1024, 512)
    assert [len(c) for c in _chunks(torch.arange(9), 4)] == [4, 5]
    assert [len(c) for c in _chunks(torch.arange(10), 4)] == [4, 4, 2]
    assert [len(c) for c in _chunks(torch.arange(3), 4)] == [3]


@pytest.mark.parametrize("sites", ["all", "round_robin"])
def test_planned_epochs_cover_the_simulated_growth(sites):
    """growth.extra_epochs: simulate to_target growth event by event; the planned event count
    is what the simulation needs and the last event falls in epoch planned - extra_epochs."""
    start, targets = {"a": 1, "b": 2, "c": 5, "d": 3}, {"a": 16, "b": 32, "c": 5, "d": 6}
    cfg = gcfg(sites=sites, steps=4, dt=0.25, first_epoch=1.0, extra_epochs=3)
    width, events, turn = dict(start), 0, 0
    names = list(start)
    while pending := [n for n in names if width[n] < targets[n]]:
        chosen = policy.pick_sites(sites, pending, names, turn)
        for n in chosen:
            width[n] += policy.neuron_count(cfg, width[n], start[n], targets[n], 0, 1)
        turn = (names.index(chosen[0]) + 1) % len(names)
        events += 1
    assert policy.planned_events(cfg, start, targets) == events
    epochs = policy.planned_epochs(cfg, events, 10)
    due = policy.growth_steps(cfg, 10, epochs)
    assert len(due) >= events and math.ceil(due[events - 1] / 10) == epochs - 3


@pytest.mark.slow
def test_growth_config_combinations_are_checked():
    from growrun.config.validate import validate
    from growrun.errors import GrowrunError

    with pytest.raises(GrowrunError, match="growth.extra_epochs=2: needs .*neurons=to_target"):
        validate(compose_cfg("growth.extra_epochs=2", "growth.neurons=fixed"))
    with pytest.raises(GrowrunError, match="growth.conv_fanout=full: not with growth.stats=training"):
        validate(compose_cfg("growth.conv_fanout=full", "growth.stats=training"))


class TwoLayer(nn.Module):
    """x -> Linear -> identity -> Linear: an exactly linear site, so the first order is sharp."""

    def __init__(self, d: int, hidden: int, m: int, activation: str):
        super().__init__()
        self.l1, self.l2, self.activation = nn.Linear(d, hidden), nn.Linear(hidden, m), activation

    def forward(self, x):
        h = self.l1(x)
        return self.l2(F.relu(h) if self.activation == "relu" else h)

    def site(self) -> Site:
        return Site("s", self.l1, self.l2, None, self.activation)


@pytest.mark.parametrize("method", ["tiny", "tiny_noproj", "random"])
@pytest.mark.parametrize("keep", [2, 1])
def test_measured_loss_change_matches_first_order_prediction(method, keep):
    """Real statistics -> proposal (keep = 1: its first neuron only, as a budget cut leaves it)
    -> candidate (the line search's mechanism): the measured mean loss change at small gamma
    approaches gamma^2 * first_order, with error shrinking in gamma."""
    torch.manual_seed(0)
    model = TwoLayer(12, 3, 5, "identity").double()
    x, y = torch.randn(256, 12, dtype=torch.float64), torch.randint(0, 5, (256,))
    site = model.site()
    stats = collect_statistics(model, [site], [(x[:128], y[:128]), (x[128:], y[128:])],
                               lambda out, t: F.cross_entropy(out, t, reduction="sum"))["s"]
    full = propose(site, stats, method, 2, generator=torch.Generator().manual_seed(1))
    prop = full.take(keep)
    assert prop.count == keep and prop.first_order < 0 and prop.first_order >= full.first_order
    assert prop.bottleneck_gain == pytest.approx(float(full.lambdas[:keep].square().sum()) if method != "random" else 0)
    errors = []
    with torch.no_grad(), candidate(site, prop.neurons) as cand:
        base = F.cross_entropy(model(x), y).item()
        for gamma in (0.1, 0.03, 0.01):
            cand.gamma = gamma
            measured = F.cross_entropy(model(x), y).item() - base
            predicted = prop.first_order * gamma**2
            errors.append(abs(measured - predicted) / abs(predicted))
    assert errors[-1] < 0.02 and errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("parabola", [False, True])
def test_line_search_finds_a_decrease_and_can_refuse(parabola):
    torch.manual_seed(0)
    model = TwoLayer(10, 2, 4, "relu")
    x, y = torch.randn(200, 10), torch.randint(0, 4, (200,))
    site = model.site()
    stats = collect_statistics(model, [site], [(x, y)], lambda o, t: F.cross_entropy(o, t, reduction="sum"))["s"]
    prop = propose(site, stats, "tiny", 3)
    ls = SimpleNamespace(shrink=0.5, max_iter=12, max_gamma=10.0, parabola=parabola)
    found = line_search(model, site, prop.neurons, None, prop.first_order, (x, y), F.cross_entropy, ls)
    assert found.gamma > 0 and found.loss_at_gamma < found.loss_before
    before = model(x)
    insert_neurons(site, prop.neurons.scaled(found.gamma))
    assert F.cross_entropy(model(x), y).item() == pytest.approx(found.loss_at_gamma, rel=1e-5)
    assert not torch.equal(model(x), before)
    # an ascent direction (positive slope) is refused: gamma = 0, nothing measured but L(0)
    refused = line_search(model, site, prop.neurons, None, +1.0, (x, y), F.cross_entropy, ls)
    assert refused.gamma == 0.0 and refused.evaluations == 1


def test_line_search_without_neurons_needs_no_moments():
    """A BatchNorm site whose proposal has no neuron: gamma = 0 and L(0), without the moments
    (growth.neurons=adaptive or the rank threshold may keep none)."""
    from growrun.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "resnet18", "in_channels": 3, "num_classes": 4, "stream": [4, 4, 4, 4],
                         "hidden": [1] * 8})
    site = model.sites()["layer1.0"]
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    none = Neurons(site.l1.weight[:0].detach(), None, site.l2.weight[:, :0].detach())
    ls = SimpleNamespace(shrink=0.5, max_iter=12, max_gamma=10.0)
    found = line_search(model, site, none, None, -1.0, (x, y), F.cross_entropy, ls)
    with torch.no_grad():
        assert found.gamma == 0.0 and found.loss_before == found.loss_at_gamma == float(F.cross_entropy(model(x), y))


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """One run of compose_cfg() (GROW): its directory and the summary run() returned (as written
    to summary.json). Tests only read it."""
    def build(run_dir: Path) -> None:
        summary = run_module.run(compose_cfg(), run_dir)
        assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))

    run_dir = built_once(tmp_path_factory, "growth_training_grown", build)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_growth_log_and_widths(grown):
    run_dir, summary = grown
    rows = read(run_dir / "growth.csv")
    assert {r["site"] for r in rows} == {f"layer{s}.{b}" for s in range(1, 5) for b in range(2)}
    events = sorted({(int(r["event"]), float(r["epoch"])) for r in rows})
    # every dt = 0.5 epochs from epoch 1; sites that refused neurons (gamma = 0) keep growing later
    assert events[:2] == [(1, 1.0), (2, 1.5)] and all(e in (2.0, 2.5) for _, e in events[2:])
    for r in rows:
        assert int(r["added"]) <= int(r["requested"]) and (r["reason"] == "") == (r["added"] == r["requested"])
        assert float(r["psi"]) >= 0 and float(r["d_w"]) >= 0
        if int(r["added"]):
            assert float(r["gamma"]) > 0 and float(r["loss_candidate"]) < float(r["loss_before"])
            assert float(r["loss_after"]) == pytest.approx(float(r["loss_candidate"]), rel=1e-4)
    targets = [math.ceil(w / 16) for w in (64, 64, 128, 128, 256, 256, 512, 512)]
    widths = list(summary["widths"].values())
    assert all(w <= t for w, t in zip(widths, targets)) and sum(widths) > sum([1, 1, 2, 2, 4, 4, 8, 8])
    metrics = read(run_dir / "metrics.csv")
    assert [int(m["width:layer4.1"]) for m in metrics][-1] == summary["widths"]["layer4.1"]
    assert int(metrics[-1]["params"]) == summary["params"]


@pytest.mark.slow
def test_extra_epochs_sets_the_run_length(tmp_path):
    """steps=2 to the targets, all sites at once, dt=0.5 from epoch 1: events at epochs 1 and
    1.5 (in epoch 2), so the run ends after 2 + 1 extra = 3 epochs, whatever trainer.epochs says."""
    summary = run_module.run(compose_cfg("growth.extra_epochs=1", "trainer.epochs=50"), tmp_path)
    assert summary["epochs"] == 3 and len(read(tmp_path / "metrics.csv")) == 3


@pytest.mark.slow
def test_resume_after_growth_reproduces_the_uninterrupted_run(tmp_path, grown, monkeypatch):
    full, cut = grown[0], tmp_path / "cut"  # full: the uninterrupted run
    original = Trainer.train_epoch

    def stop_in_epoch_3(self, after_step=None):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return original(self, after_step)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_module.run(compose_cfg(), cut)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert len(read(cut / "metrics.csv")) == 2
    run_module.run(compose_cfg("resume=true"), cut)
    assert read(cut / "metrics.csv") == read(full / "metrics.csv")
    assert read(cut / "growth.csv") == read(full / "growth.csv")
    ckpt, _ = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert ckpt["arch"] == load_checkpoint(full / "checkpoints" / "last.pt")[0]["arch"]


@pytest.mark.slow
@pytest.mark.parametrize("normalize", ["none", "fan_in"])
def test_growth_log_has_the_new_neurons_scale(tmp_path, normalize):
    """growth.csv logs the mean fan-in / fan-out norms of the inserted neurons and of the site's
    existing ones; growth.normalize=fan_in inserts fan-ins at exactly the existing mean norm
    (sqrt(2) into a width-0 site) without changing what the line search measured."""
    run_module.run(compose_cfg(f"growth.normalize={normalize}", "model.site_widths=[0,1,2,2,4,4,8,8]"), tmp_path)
    rows = [r for r in read(tmp_path / "growth.csv") if int(r["added"])]
    assert rows
    for r in rows:
        fin, fout = float(r["fanin_norm"]), float(r["fanout_norm"])
        assert fin > 0 and fout > 0
        grew_from = int(r["width_after"]) - int(r["added"])
        if grew_from == 0:
            assert r["fanin_ref"] in ("", "nan") and r["fanout_ref"] in ("", "nan")
        else:
            assert float(r["fanin_ref"]) > 0 and float(r["fanout_ref"]) > 0
        if normalize == "fan_in":
            ref = math.sqrt(2.0) if grew_from == 0 else float(r["fanin_ref"])
            assert fin == pytest.approx(ref, rel=1e-5)
        assert float(r["loss_after"]) == pytest.approx(float(r["loss_candidate"]), rel=1e-4)
    if normalize == "none":  # TINY's solved fan-ins are not at the layer's scale by themselves
        assert any(abs(float(r["fanin_norm"]) / float(r["fanin_ref"]) - 1) > 0.1 for r in rows
                   if r["fanin_ref"] not in ("", "nan"))
