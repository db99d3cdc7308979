#!/usr/bin/env python3
"""The epoch time with and without each logger: the same small growing run (ResNet18 at 1/16
width from 1/4 of it, 32x32 synthetic images, TINY growth events after epochs 1, 2, 3; 4 epochs)
trained with logger=csv, tensorboard, mlflow (a local sqlite store) and wandb (offline), in
interleaved rounds (csv, tb, mlflow, wandb, csv, ...) so that a drift of the machine's speed hits
every arm alike. One run at a time; run it on an otherwise idle machine.

Per arm: the trainer's mean epoch seconds without its growth event (metrics.csv `epoch_seconds` -
`growth_seconds`: the steps and the test pass; a logger is called after the epoch's row is
written, so this is the per-step cost, expected none), and the process's wall time (everything: start, the logger's opening, each epoch and event
call, the figures at the end). Ratios are against logger=csv of the same rounds.

    python scripts/bench_logger_runs.py [--rounds 3] [--images 2048]   # -> bench/logger_runs.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine_info

ARMS = {"csv": [], "tensorboard": ["logger=tensorboard"],
        "mlflow": ["logger=mlflow", "logger.tracking_uri=sqlite:///{tmp}/mlflow.db"],
        "wandb": ["logger=wandb", "logger.mode=offline"]}


def run(arm: str, tmp: Path, images: int, threads: int) -> dict:
    run_dir = tmp / f"{arm}-{time.monotonic_ns()}"
    args = ["dataset=synthetic", f"dataset.train_size={images}", "dataset.test_size=512", "model=resnet18",
            "model.width=0.0625", "model.start_fraction=0.25", "growth=tiny", "growth.dt=1", "growth.steps=3",
            "trainer.epochs=4", f"trainer.threads={threads}", "trainer.progress=off",
            *(a.format(tmp=tmp) for a in ARMS[arm]), f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, WANDB_SILENT="true", OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "growrun", "train", *args], cwd=tmp, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{arm}: growrun train failed:\n{proc.stderr[-2000:]}")
    with open(run_dir / "metrics.csv", newline="") as f:
        epochs = [float(r["epoch_seconds"]) - float(r["growth_seconds"] or 0) for r in csv.DictReader(f)]
    return {"wall_s": wall, "epoch_s_mean": statistics.fmean(epochs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: " + ", ".join(ARMS))
    p.add_argument("--out", default="bench/logger_runs.json")
    opts = p.parse_args(argv)
    arms = ["csv", *(a for a in opts.arms.split(",") if a != "csv")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.rounds):
            for arm in arms:
                results[arm].append(run(arm, Path(tmp), opts.images, opts.threads))
                print(f"round {r + 1}/{opts.rounds} {arm}: {results[arm][-1]}", flush=True)
    base = {k: statistics.median(x[k] for x in results["csv"]) for k in ("wall_s", "epoch_s_mean")}
    summary = {}
    for arm, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in ("wall_s", "epoch_s_mean")}
        summary[arm] = {**{f"{k}_median": v for k, v in med.items()},
                        "epoch_ratio": med["epoch_s_mean"] / base["epoch_s_mean"],
                        "wall_ratio": med["wall_s"] / base["wall_s"],
                        "wall_extra_s": med["wall_s"] - base["wall_s"], "runs": runs}
        print(f"{arm:12s} epoch {med['epoch_s_mean']:.2f} s (x{summary[arm]['epoch_ratio']:.3f}), "
              f"wall {med['wall_s']:.1f} s (x{summary[arm]['wall_ratio']:.3f}, "
              f"{summary[arm]['wall_extra_s']:+.1f} s)")
    record = {"machine": machine_info(), "rounds": opts.rounds, "images": opts.images, "threads": opts.threads,
              "arms": summary}
    Path(opts.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
