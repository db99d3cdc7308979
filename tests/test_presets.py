"""The shipped presets (configs/experiment/*.yaml) and the Makefile's Table 1 sweeps: each
composes, passes validate(), and plans the run its comments and the README describe (start and
target widths, number of growth events, run length). The full-scale Table 1 cannot run here
(CIFAR-100 on a GPU), so this is where a broken full-scale preset shows before a cluster does."""
from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_module

from growrun.config import store  # noqa: F401
from growrun.config.validate import validate
from growrun.growth import policy
from growrun.models import initial_arch
from growrun.train.run import _plan_epochs, planned_widths

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
RESNET18 = [64, 64, 128, 128, 256, 256, 512, 512]


def compose_experiment(name: str, *overrides: str):
    with initialize_config_module("growrun.configs", version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", *overrides])


def makefile_sweep(scale: str) -> list[list[str]]:
    """Every job of the Makefile's T1_SWEEP_<scale> line, as Hydra's basic sweeper expands it."""
    line = re.search(rf"^T1_SWEEP_{scale}\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    axes = [(key, values.split(",")) for key, values in (item.split("=", 1) for item in line.split())]
    return [[f"{k}={v}" for (k, _), v in zip(axes, combo)] for combo in itertools.product(*(v for _, v in axes))]


def plan(cfg, num_classes: int, train_images: int) -> tuple[list[int], dict[str, int], int]:
    """(start widths, target widths, planned growth events) of a composed config; sets
    trainer.epochs as a run does (growth.extra_epochs)."""
    start, targets = planned_widths(cfg, num_classes, (3, 32, 32))
    events = policy.planned_events(cfg.growth, start, targets)
    data = SimpleNamespace(num_classes=num_classes, input_shape=(3, 32, 32))
    _plan_epochs(cfg, data, train_images // cfg.trainer.batch_size)
    return list(start.values()), targets, events


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    validate(compose_experiment(name))


def test_cifar10_tiny_is_what_the_readme_says():
    """Hidden widths 1/64 of ResNet18's grown to 1/4 in 8 events, one per epoch (epochs 1..8), 20 epochs."""
    cfg = compose_experiment("cifar10_tiny")
    start, targets, events = plan(cfg, 10, 50000)
    assert start == [1, 1, 2, 2, 4, 4, 8, 8]
    assert list(targets.values()) == [w // 4 for w in RESNET18]
    steps = 50000 // 128
    due = policy.growth_steps(cfg.growth, steps, cfg.trainer.epochs)
    assert events == 8 and [s // steps for s in due[:events]] == list(range(1, 9))
    assert cfg.trainer.epochs == 20


@pytest.mark.parametrize("scale, classes, images, final, epochs_by_dt", [
    # full: 8 sites x 8 visits = 64 events every dt from epoch dt: growth ends at epoch 16 (dt 0.25)
    # or 64 (dt 1), then 250 extra epochs
    ("full", 100, 50000, RESNET18, {0.25: 16 + 250, 1.0: 64 + 250}),
    # cpu: 8 sites x 2 visits = 16 events (growth ends at epoch 4 or 16), then 6 extra epochs
    ("cpu", 10, 6000, [w // 4 for w in RESNET18], {0.25: 4 + 6, 1.0: 16 + 6}),
])
@pytest.mark.slow
def test_table1_sweeps_plan_the_documented_runs(scale, classes, images, final, epochs_by_dt):
    jobs = makefile_sweep(scale)
    assert len(jobs) == 16  # 2 methods x 2 starts x 2 dt x 2 seeds
    assert sorted(j[-1] for j in jobs) == ["seed=0"] * 8 + ["seed=1"] * 8  # the seed does not change the plan:
    longest = 0
    for job in (j for j in jobs if j[-1] == "seed=0"):  # each other setting composed once
        cfg = compose_experiment(f"table1_{scale}", *job)
        validate(cfg)
        assert cfg.growth.method in ("tiny", "gradmax") and cfg.growth.sites == "round_robin"
        start, targets, events = plan(cfg, classes, images)
        assert list(targets.values()) == final
        fraction = cfg.model.start_fraction * (4 if scale == "cpu" else 1)  # of the final widths
        assert fraction in (1 / 64, 1 / 4)
        assert start == [math.ceil(fraction * w) for w in final]
        assert events == 8 * cfg.growth.steps
        assert cfg.trainer.epochs == epochs_by_dt[cfg.growth.dt]
        longest = max(longest, cfg.trainer.epochs)
    reference = compose_experiment(f"table1_{scale}_reference", "seed=0")
    validate(reference)
    assert reference.growth.method == "none"
    arch = initial_arch(reference.model, classes, (3, 32, 32))
    assert arch["hidden"] == final  # the fixed final network
    if scale == "cpu":  # "as many epochs as the longest grown run"
        assert reference.trainer.epochs == longest
    else:  # "as many epochs as the extra training"
        assert reference.trainer.epochs == 250


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("scale, classes, images, final", [("full", 100, 50000, RESNET18),
                                                           ("cpu", 10, 6000, [w // 4 for w in RESNET18])])
@pytest.mark.slow
def test_methods_sweep_plans_the_documented_runs(scale, classes, images, final):
    """`make methods`: every growth method x start 1/64 of the final widths x dt 0.25 x seeds 0, 1
    on table1_<scale>, the reference, one report (the commands `make -n` prints)."""
    from growrun.growth.methods import REGISTRY as METHODS

    out = subprocess.run(["make", "-n", "methods", f"SCALE={scale}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    grown = next(ln for ln in out if f"+experiment=table1_{scale} " in ln).split()
    reference = next(ln for ln in out if f"+experiment=table1_{scale}_reference " in ln).split()
    report = next(ln for ln in out if "growrun report" in ln).split()
    assert f"hydra.sweep.dir=outputs/methods_{scale}/grown" in grown and "resume=true" in grown
    assert f"hydra.sweep.dir=outputs/methods_{scale}/reference" in reference and "seed=0,1" in reference
    assert report[1:6] == ["report", f"outputs/methods_{scale}/grown", f"outputs/methods_{scale}/reference",
                           f"outputs/methods_{scale}/equal", "--out"]
    # the fixed final network at each grown run's compute: per seed, over that seed's grown runs
    equal = next(ln for ln in out if "trainer.budget_from=" in ln)
    assert equal.startswith("for s in 0 1; do runs=$(") and f"growrun.train.budget outputs/methods_{scale}/grown " \
        "--seed $s)" in equal
    assert all(item in equal.split() for item in (f"+experiment=table1_{scale}_reference", "seed=$s",
               "trainer.budget_from=$runs", f"hydra.sweep.dir=outputs/methods_{scale}/equal/seed$s"))
    start = grown.index(f"+experiment=table1_{scale}") + 1
    end = next(i for i, item in enumerate(grown) if item.startswith("hydra.sweep.dir="))
    axes = [(k, v.split(",")) for k, v in (item.split("=", 1) for item in grown[start:end])]
    assert [k for k, _ in axes] == ["growth", "model.start_fraction", "growth.dt", "seed"]
    names = axes[0][1]  # every method once, plus presets of one (tiny_full: tiny with conv_fanout=full)
    assert len(set(names)) == len(names)
    assert {compose_experiment(f"table1_{scale}", f"growth={n}").growth.method for n in names} == set(METHODS)
    jobs = [[f"{k}={v}" for (k, _), v in zip(axes, combo)] for combo in itertools.product(*(v for _, v in axes))]
    assert len(jobs) == 2 * len(names) and axes[-1] == ("seed", ["0", "1"])
    for job in (j for j in jobs if j[-1] == "seed=0"):  # the seed does not change the plan: each method once
        cfg = compose_experiment(f"table1_{scale}", *job)
        validate(cfg)
        start_widths, targets, _ = plan(cfg, classes, images)
        assert list(targets.values()) == final and cfg.growth.dt == 0.25
        assert start_widths == [math.ceil(w / 64) for w in final]  # 1/64 of the final widths
