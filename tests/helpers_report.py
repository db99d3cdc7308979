"""Run directories made by hand for report tests (make_run), with the exact file shapes a real
`growrun train` writes (tests/test_report.py: test_real_sweep_end_to_end checks those shapes):
its sites, metrics.csv columns and composed config. Used by test_report.py and test_compute.py."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import yaml

from growrun.growth.growth_log import COLUMNS as GROWTH_COLUMNS

SITES = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "params",
                  "flops_per_image", "train_flops", "growth_flops", "epoch_seconds", "growth_seconds",
                  "total_seconds", *(f"width:{s}" for s in SITES)]

BASE_CONFIG = {  # the composed config (.hydra/config.yaml) of a synthetic ResNet18 growth run
    "dataset": {"name": "synthetic", "root": None, "download": True, "verify": True, "val_size": 0,
                "train_subset": 0, "test_subset": 0, "augment": False, "num_classes": 10, "train_size": 256,
                "test_size": 64, "image_size": 32, "noise": 0.6},
    "model": {"name": "resnet18", "width": 0.125, "start_fraction": 0.015625, "site_widths": None,
              "hidden": [512, 512], "batchnorm": True},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "betas": [0.9, 0.999],
              "weight_decay": 0.0005, "decay_norm_and_bias": False, "schedule": "cosine", "warmup_epochs": 0.0,
              "min_lr_ratio": 0.0, "milestones": [0.5, 0.75], "step_gamma": 0.1},
    "growth": {"method": "tiny", "dt": 0.5, "first_epoch": 1.0, "last_epoch": None, "sites": "all", "only": None,
               "neurons": "to_target", "count": 4, "steps": 2, "target_fraction": 0.0625, "target_widths": None,
               "param_budget": 0, "samples": 128, "stats_batch_size": 64,
               "line_search": {"batch_size": 64, "shrink": 0.5, "max_iter": 12, "max_gamma": 10.0},
               "apply_dw": False, "conv_fanout": "center", "gradmax_scale": 0.5, "noise_sigmas": 2.0,
               "rel_eps": 1e-07},
    "trainer": {"epochs": 3, "batch_size": 64, "eval_batch_size": 1000, "label_smoothing": 0.0,
                "precision": "fp32", "progress": "off", "eval_every": 1, "threads": 1, "deterministic": True,
                "channels_last": True, "checkpoint": True},
    "logger": {"tensorboard": False, "tensorboard_dir": None, "mlflow": False, "tracking_uri": None,
               "wandb": False, "mode": "online", "entity": None, "project": "growrun", "name": None},
    "seed": 0, "device": "auto", "resume": False, "optimized_metric": None,
}


def _set(config: dict, dotted: str, value) -> None:
    node = config
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value


def make_run(path: Path, seed: int, overrides: list[str], *, config: dict | None = None,
             status: str | None = "completed", accs=(0.2, 0.5, 0.4), epochs: int | None = None,
             growth: bool = True, error: str | None = None) -> Path:
    """A run directory as `growrun train` writes it; the numbers depend on (seed, accs)."""
    (path / ".hydra").mkdir(parents=True)
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["seed"] = seed
    for key, value in (config or {}).items():
        _set(cfg, key, value)
    if not growth:
        cfg["growth"]["method"] = "none"
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    rows, total = [], 0.0
    widths = [1 + seed + k for k in range(len(SITES))]
    for e, acc in enumerate(accs, start=1):
        grow = 0.3 + 0.1 * seed + 0.01 * e if growth else 0.0
        seconds = 1.0 + 0.25 * seed + 0.1 * e + grow
        total += seconds
        widths = [w + (e if growth else 0) for w in widths]
        rows.append({"epoch": e, "step": 4 * e, "lr": 0.1 / e, "train_loss": 2.0 / e, "train_acc": acc + 0.05,
                     "test_loss": 2.1 / e, "test_acc": acc, "params": 40000 + 1000 * seed + 5000 * e,
                     "flops_per_image": 3_000_000 + 20_000 * seed + 100_000 * e,
                     "train_flops": 9e9 * e, "growth_flops": 1e9 * e if growth else 0, "epoch_seconds": seconds,
                     "growth_seconds": grow, "total_seconds": total,
                     **{f"width:{s}": w for s, w in zip(SITES, widths)}})
    with (path / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, METRIC_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    if growth:
        with (path / "growth.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, GROWTH_COLUMNS)
            w.writeheader()
            for event in (1, 2):
                for k, site in enumerate(SITES):
                    w.writerow({c: 0 for c in GROWTH_COLUMNS} | {
                        "event": event, "epoch": 0.5 + 0.5 * event, "step": 2 + 2 * event, "site": site,
                        "method": cfg["growth"]["method"], "requested": 2, "added": 2 - k % 2,
                        "reason": "rank" if k % 2 else "", "width_after": 3 + k,
                        "params_after": 40000, "psi": (k + 1) / (event + seed), "lambdas_top": "0.1;0.05",
                        "stats_seconds": 0.01, "solve_seconds": 0.002, "search_seconds": 0.03})
    if status is not None:
        summary = {"status": status, "run_dir": str(path), "epochs_done": epochs or len(rows),
                   "epochs": len(accs), "final": {"test_acc": rows[-1]["test_acc"]},
                   "best_test_acc": max(accs), "params": rows[-1]["params"], "total_seconds": total,
                   "growth_seconds": sum(r["growth_seconds"] for r in rows)}
        if error:
            summary["error"] = error
        (path / "summary.json").write_text(json.dumps(summary, indent=2))
    return path
