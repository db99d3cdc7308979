"""A small growing training run (GROW: a ResNet18 on synthetic data, three epochs, two growth
events), the composed `train` config of overrides on top of a base (compose_with) or of GROW
(compose_cfg), and a run's CSV rows without their timings (read). Used by test_growth_training.py,
test_growth_when.py, test_budget.py, test_compute.py, test_faults.py, test_gpu_readiness.py,
test_stats_training.py."""
from __future__ import annotations

import csv

from hydra import compose, initialize_config_module

from growrun.config import store  # noqa: F401  (registers the schema)

GROW = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=16", "model=resnet18",
        "model.width=0.125", "model.start_fraction=0.015625", "growth=tiny", "growth.target_fraction=0.0625",
        "growth.steps=2", "growth.dt=0.5", "growth.samples=128", "growth.stats_batch_size=64",
        "growth.line_search.batch_size=64", "trainer.batch_size=64", "trainer.epochs=3", "trainer.threads=1",
        "trainer.progress=off", "dataset.augment=true"]


def compose_with(base, *overrides):
    """The composed `train` config of the overrides `base` then `overrides` (also test_growth_when)."""
    with initialize_config_module("growrun.configs", version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


def compose_cfg(*overrides):
    return compose_with(GROW, *overrides)


def read(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]
