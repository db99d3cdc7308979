"""trainer.budget_flops (growrun/train/budget.py): the fixed network trained for a compute budget
instead of epochs: its steps, the schedule spanning them, a partial last epoch, exact resume, and
the refusals."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers_training import compose_with

from helpers_interrupt import interrupted_at
from growrun.errors import GrowrunError
from growrun.models import build_model, count_flops, initial_arch
from growrun.train import run as run_module
from growrun.train.outputs import load_checkpoint

# an MLP on 8x8 images, 4 steps of 64 per epoch
FIXED = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=8",
         "model=mlp", "model.hidden=[32,32]", "growth=none", "trainer.batch_size=64", "trainer.threads=1",
         "trainer.progress=off", "optim.warmup_epochs=0", "optim.min_lr_ratio=0.1"]


def per_step() -> int:
    cfg = compose_with(FIXED)
    model = build_model(initial_arch(cfg.model, 10, (3, 8, 8)))
    return 3 * count_flops(model, (3, 8, 8)) * 64


def rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_a_budget_sets_the_steps_the_schedule_and_a_partial_last_epoch(tmp_path):
    budget = 10.5 * per_step()  # 10 steps: epochs of 4, 4 and 2 steps
    summary = run_module.run(compose_with(FIXED, f"trainer.budget_flops={budget}", "trainer.epochs=99"), tmp_path)
    metrics = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in metrics] == [4, 8, 10] and summary["epochs"] == 3
    assert summary["train_flops"] == 10 * per_step() <= budget < summary["train_flops"] + per_step()
    assert all(r["test_acc"] for r in metrics)  # the partial last epoch is evaluated
    # cosine over the 10 steps: after step 10 the factor is the floor (min_lr_ratio), not mid-way
    assert float(metrics[-1]["lr"]) == pytest.approx(0.1 * 0.1)
    assert float(metrics[0]["lr"]) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 10))))


@pytest.mark.slow
def test_a_budget_run_resumes_exactly_inside_its_partial_epoch(tmp_path, monkeypatch):
    args = (f"trainer.budget_flops={10.5 * per_step()}", "trainer.checkpoint_every=1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_module.run(compose_with(FIXED, *args), full)
    with interrupted_at(monkeypatch, "step", 9), pytest.raises(KeyboardInterrupt):
        run_module.run(compose_with(FIXED, *args), cut)
    assert load_checkpoint(cut / "checkpoints" / "last.pt")[0]["trainer"]["step"] == 8
    run_module.run(compose_with(FIXED, *args, "resume=true"), cut)
    assert rows(cut / "metrics.csv") == rows(full / "metrics.csv")
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")[0] for d in (full, cut))
    assert a["trainer"]["step"] == b["trainer"]["step"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_budget_is_refused_for_growing_runs_and_below_one_step(tmp_path):
    with pytest.raises(GrowrunError, match=r"trainer.budget_flops=1e\+09: only for a fixed network \(growth=none; "
                                           r"here growth.method=tiny"):
        run_module.run(compose_with(FIXED, "growth=tiny", "model.start_fraction=0.125", "trainer.budget_flops=1e9"),
                       tmp_path / "grown")
    with pytest.raises(GrowrunError, match=r"trainer.budget_flops=1000: less than one training step of this model"):
        run_module.run(compose_with(FIXED, "trainer.budget_flops=1000"), tmp_path / "small")
