#!/usr/bin/env python3
"""What a logger costs a run: the time of each backend call (growrun/loggers/), fed the rows of a
cifar10_tiny-shaped run: 20 epochs of metrics.csv rows (22 columns: 14 metrics and 8 site widths)
and 8 growth events of 8 growth.csv rows (30 columns each); MLflow into a local sqlite store, W&B offline. A logger is called once per epoch and
once per growth event, never per step, so its share of a run is (epochs x epoch call + events x
event call) / the run's wall time.

    python scripts/bench_loggers.py [--epoch-seconds S]    # -> bench/loggers.json

--epoch-seconds: the wall time of one training epoch to compare with (default: 178 s, cifar10_tiny's
seed-0 run on 2 cores, results/equal_compute/runs.csv: 3560 s / 20 epochs).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from growrun.growth.growth_log import COLUMNS as GROWTH_COLUMNS
from growrun.loggers import BACKENDS, Loggers
from growrun.train.outputs import _fmt
from machine_info import machine_info

SITES = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
METRICS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "params", "flops_per_image",
           "train_flops", "growth_flops", "epoch_seconds", "growth_seconds", "total_seconds",
           *(f"width:{s}" for s in SITES)]
TEXT = {"site", "method", "reason", "trigger"}


def rows(epochs: int, events: int, steps_per_epoch: int = 390):
    rng = random.Random(0)
    metrics = [{c: _fmt(rng.random()) for c in METRICS} | {"epoch": e, "step": e * steps_per_epoch}
               for e in range(1, epochs + 1)]
    growth = [[{c: (_fmt(rng.random()) if c not in TEXT else "x") for c in GROWTH_COLUMNS}
               | {"event": k, "step": k * steps_per_epoch, "site": s, "reason": "", "trigger": "schedule"}
               for s in SITES] for k in range(1, events + 1)]
    return metrics, growth


def time_backend(name: str, epochs: int, events: int) -> dict:
    metrics, growth = rows(epochs, events)
    with tempfile.TemporaryDirectory() as tmp:
        opts = SimpleNamespace(**{b: b == name for b in BACKENDS}, tensorboard_dir=None, name=None,
                               tracking_uri=f"sqlite:///{tmp}/mlflow.db", project="bench", mode="offline",
                               entity=None)
        cfg = SimpleNamespace(logger=opts, trainer=SimpleNamespace(checkpoint=True))
        t0 = time.perf_counter()
        loggers = Loggers.open(cfg, Path(tmp), None, {"model": {"name": "resnet18"}, "seed": 0})
        opened = time.perf_counter() - t0
        epoch_calls, event_calls = [], []
        for e, row in enumerate(metrics, 1):
            if e <= events:
                t0 = time.perf_counter()
                loggers.growth(growth[e - 1])
                event_calls.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loggers.epoch([row])
            loggers.checkpointed(row["step"])  # the end-of-epoch checkpoint (MLflow sends then)
            epoch_calls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loggers.finish({"status": "completed", "step": metrics[-1]["step"], "final": {"test_acc": 0.85}})
        loggers.close()
        finished = time.perf_counter() - t0
    return {"open_s": opened, "epoch_call_ms_median": 1e3 * statistics.median(epoch_calls),
            "event_call_ms_median": 1e3 * statistics.median(event_calls), "finish_s": finished,
            "run_total_s": opened + sum(epoch_calls) + sum(event_calls) + finished}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--events", type=int, default=8)
    p.add_argument("--epoch-seconds", type=float, default=178.0)
    p.add_argument("--out", default="bench/loggers.json")
    opts = p.parse_args(argv)
    record = {"machine": machine_info(), "epochs": opts.epochs, "events": opts.events,
              "epoch_seconds": opts.epoch_seconds, "backends": {}}
    for name in BACKENDS:
        r = time_backend(name, opts.epochs, opts.events)
        r["share_of_run"] = r["run_total_s"] / (opts.epochs * opts.epoch_seconds)
        record["backends"][name] = r
        print(f"{name}: open {r['open_s']:.2f} s, epoch call {r['epoch_call_ms_median']:.2f} ms, event call "
              f"{r['event_call_ms_median']:.2f} ms, finish {r['finish_s']:.2f} s; whole run {r['run_total_s']:.2f} s "
              f"= {100 * r['share_of_run']:.4f} % of {opts.epochs} epochs of {opts.epoch_seconds:g} s")
    Path(opts.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
