"""optim.schedule_over=compute (growrun/train/compute_plan.py): the learning-rate schedule's clock in
planned training FLOPs. The plan predicts a growing run's measured compute exactly when growth adds
what it plans; the logged learning rates follow the clock; the schedule over steps is untouched;
a run resumes exactly; configurations without a plan are refused."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers_interrupt import interrupted_at
from hydra import compose, initialize_config_module

from growrun.config import store  # noqa: F401  (registers the schema train.yaml extends)
from growrun.config.validate import validate
from growrun.errors import GrowrunError
from growrun.growth import policy
from growrun.train import compute_plan
from growrun.train import run as run_module
from growrun.train.optim import lr_factor, rewarm_factor
from growrun.train.outputs import load_checkpoint

# an MLP grown from 8 to 32 neurons per layer by zero (no line search: it adds what it plans) in 3 events
# (after steps 4, 6 and 8), 4 epochs of 4 steps
GROWN = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=8", "model=mlp",
         "model.hidden=[32,32]", "model.start_fraction=0.25", "growth=zero", "growth.dt=0.5", "growth.steps=3",
         "growth.target_fraction=1", "trainer.batch_size=64", "trainer.epochs=4", "trainer.threads=1",
         "trainer.progress=off", "optim.warmup_epochs=0.5", "optim.min_lr_ratio=0.1", "optim.schedule_over=compute"]


def config(*overrides):
    with initialize_config_module("growrun.configs", version_base="1.3"):
        return compose("train", overrides=[*GROWN, *overrides])


def rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_the_plan_is_the_measured_compute_and_the_lr_follows_it(tmp_path):
    cfg = config()
    segments = compute_plan.planned_segments(cfg, 10, (3, 8, 8), 4, 4)
    assert [s for s, _ in segments] == [0, 4, 6, 8]  # events after steps 4, 6, 8 (dt = half an epoch)
    assert [f for _, f in segments] == sorted(f for _, f in segments) and len({f for _, f in segments}) == 4
    run_module.run(cfg, tmp_path)
    c = compute_plan.clock(segments)
    metrics = rows(tmp_path / "metrics.csv")
    for row in metrics:  # zero adds exactly the planned neurons: the plan is the measured compute
        assert int(row["train_flops"]) == c(int(row["step"]))
        factor = lr_factor(int(row["step"]), 16, cfg.optim, 4, c)
        assert float(row["lr"]) == pytest.approx(0.1 * factor, rel=1e-6)
    # the compute clock decays later than the step clock (cheap early steps), and ends at the floor
    steps_lr = [0.1 * lr_factor(int(r["step"]), 16, cfg.optim, 4) for r in metrics]
    assert all(float(r["lr"]) > s for r, s in zip(metrics[:-1], steps_lr[:-1]))
    assert float(metrics[-1]["lr"]) == pytest.approx(0.1 * 0.1) == pytest.approx(steps_lr[-1])
    t = (c(8) - c(2)) / (c(16) - c(2))
    assert float(metrics[1]["lr"]) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))))


def test_the_clock_sums_each_segment(tmp_path):
    c = compute_plan.clock([(0, 10), (3, 100), (5, 1000)])
    assert [c(s) for s in range(8)] == [0, 10, 20, 30, 130, 230, 1230, 2230]


def test_round_robin_plans_one_site_per_event():
    g = config("growth.sites=round_robin").growth
    plan = policy.planned_trajectory(g, {"a": 1, "b": 2}, {"a": 7, "b": 5})
    # requested per visit: a ceil(6/3) = 2, b ceil(3/3) = 1; alternate while both are below target
    assert plan == [{"a": 3, "b": 2}, {"a": 3, "b": 3}, {"a": 5, "b": 3}, {"a": 5, "b": 4}, {"a": 7, "b": 4},
                    {"a": 7, "b": 5}]
    assert len(plan) == policy.planned_events(g, {"a": 1, "b": 2}, {"a": 7, "b": 5})


def test_the_schedule_over_steps_is_unchanged():
    cfg = config("optim.schedule_over=steps").optim
    for step in range(20):
        t = min(1.0, (step - 2) / 14)
        expected = (step + 1) / 2 if step < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        assert lr_factor(step, 16, cfg, 4) == expected


@pytest.mark.slow
def test_a_compute_schedule_resumes_exactly(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_module.run(config("trainer.checkpoint_every=1"), full)
    with interrupted_at(monkeypatch, "step", 7), pytest.raises(KeyboardInterrupt):
        run_module.run(config("trainer.checkpoint_every=1"), cut)
    run_module.run(config("trainer.checkpoint_every=1", "resume=true"), cut)
    assert rows(cut / "metrics.csv") == rows(full / "metrics.csv")
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")[0] for d in (full, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("override", ["growth.sites=best_gain", "growth.when=bottleneck"])
def test_growth_decided_during_training_has_no_plan(override):
    with pytest.raises(GrowrunError, match=r"^optim.schedule_over=compute: needs the growth plan, which growth.sites="):
        validate(config(override))


def test_rewarming_ramps_each_step_after_an_event():
    assert [rewarm_factor(s, [10, 20], 3) for s in (0, 9, 10, 11, 12, 13, 19, 20, 21, 22, 40)] == \
        [1, 1, 1 / 3, 2 / 3, 1, 1, 1, 1 / 3, 2 / 3, 1, 1]
    assert [rewarm_factor(s, [4, 5], 4) for s in (4, 5, 6, 7, 8, 9)] == [1 / 4, 1 / 4, 1 / 2, 3 / 4, 1, 1]  # restarts
    assert rewarm_factor(11, [10], 0) == 1 and rewarm_factor(11, [], 5) == 1


@pytest.mark.slow
def test_a_run_rewarms_after_each_planned_event_and_resumes_exactly(tmp_path, monkeypatch):
    """optim.rewarm_epochs=0.5 (2 steps): the logged learning rate is the schedule's, halved at the
    steps right after events (4 and 8); the planned events are the run's; a resumed run is exact."""
    over = ["optim.schedule_over=steps", "optim.rewarm_epochs=0.5", "trainer.checkpoint_every=1"]
    cfg = config(*over)
    clock, events = compute_plan.schedule_plan(cfg, 10, (3, 8, 8), 4, 4)
    assert events == [4, 6, 8] and clock(7) == 7  # re-warming over steps: the plan's events, the clock of steps
    run_module.run(cfg, tmp_path / "full")
    assert [int(r["step"]) for r in rows(tmp_path / "full" / "growth.csv") if int(r["added"]) > 0] == [4, 4, 6, 6, 8, 8]
    for row in rows(tmp_path / "full" / "metrics.csv"):  # rows at steps 4, 8, 12, 16
        step = int(row["step"])
        scale = 0.5 if step in (4, 8) else 1.0
        assert float(row["lr"]) == pytest.approx(0.1 * lr_factor(step, 16, cfg.optim, 4) * scale, rel=1e-6), step
        assert lr_factor(step, 16, cfg.optim, 4, events=events) == pytest.approx(lr_factor(step, 16, cfg.optim, 4) * scale)
    with interrupted_at(monkeypatch, "step", 6), pytest.raises(KeyboardInterrupt):
        run_module.run(cfg, tmp_path / "cut")
    run_module.run(config(*over, "resume=true"), tmp_path / "cut")
    assert rows(tmp_path / "cut" / "metrics.csv") == rows(tmp_path / "full" / "metrics.csv")


@pytest.mark.parametrize("override", ["growth.sites=best_gain", "growth.when=bottleneck"])
def test_rewarming_needs_planned_events(override):
    with pytest.raises(GrowrunError, match=r"^optim.rewarm_epochs=0.5: re-warms after the planned growth events"):
        validate(config("optim.schedule_over=steps", "optim.rewarm_epochs=0.5", override))
