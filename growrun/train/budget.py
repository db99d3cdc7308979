"""trainer.budget_flops / trainer.budget_from: a fixed network (growth=none) trained for a compute
budget instead of a number of epochs, so that it can be compared with a grown network at equal
compute.

A training step of the model costs TRAIN_FLOPS_PER_FORWARD x F x B FLOPs (F: forward FLOPs per
image, growrun.models.count_flops; B: trainer.batch_size, the global batch), the trainer's own
count (trainer.train_flops). The run takes S = floor(budget / that) steps: trainer.epochs becomes
ceil(S / steps per epoch), the last epoch stops after step S (it may be partial; it is evaluated
like every last epoch), and the learning-rate schedule spans the S steps. Its training compute
is then at most the budget, less than one step below it.

trainer.budget_from=PATH takes the budget from finished runs, as a grown run's compute:
train_flops + growth_flops of its summary.json (what growrun report calls its compute).
    a run directory    that run's compute; its seed must be this run's seed (equal compute
                       compares like with like)
    a sweep directory  the mean compute of its completed growing runs with this run's seed
The resolved budget and its sources are written once to the run directory's budget.json, which a
resumed run reads back, so it plans the same steps whatever happened to PATH since;
`growrun report` pairs each grown run with the fixed run whose budget.json names it.
`python -m growrun.train.budget SWEEP --seed S` prints the completed growing runs of SWEEP with
seed S, comma-separated (a sweep over trainer.budget_from: the Makefile's equal-compute runs).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from pathlib import Path

import yaml

from growrun.errors import GrowrunError
from growrun.models import count_flops
from growrun.rundirs import read_summary, sweep_runs

log = logging.getLogger("growrun")
BUDGET_FILE = "budget.json"


def budget_steps(budget: float, flops_per_step: int) -> int:
    return int(budget // flops_per_step)


def run_compute(run_dir: Path) -> float | None:
    """A completed run's compute (train_flops + growth_flops of summary.json); None otherwise."""
    summary = read_summary(run_dir)
    if summary.get("status") != "completed":
        return None
    try:
        return float(summary["train_flops"]) + float(summary["growth_flops"])
    except (KeyError, TypeError, ValueError):
        return None


def run_seed_method(run_dir: Path) -> tuple[object, str]:
    """(seed, growth.method) of the run's composed config (.hydra/config.yaml)."""
    try:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None, "?"
    return config.get("seed"), str((config.get("growth") or {}).get("method", "none"))


def grown_runs(sweep: Path, seed) -> list[Path]:
    """The completed growing runs of a sweep directory with this seed (those with a compute)."""
    found = []
    for run in sweep_runs(sweep):
        run_seed, method = run_seed_method(run)
        if run_seed == seed and method != "none" and run_compute(run) is not None:
            found.append(run)
    return found


def budget_from(path: Path, seed) -> tuple[float, list[Path]]:
    """(budget, its source runs) for trainer.budget_from=path (see the module docstring)."""
    key = f"trainer.budget_from={path}"
    if not path.is_dir():
        raise GrowrunError(f"{key}: no such directory; give a finished run's directory or a sweep directory")

    if (path / ".hydra").is_dir():
        compute = run_compute(path)
        if compute is None:
            raise GrowrunError(f"{key}: that run is {read_summary(path).get('status', 'unknown')}, not completed; "
                               "its compute is known only when it has finished")
        run_seed = run_seed_method(path)[0]
        if run_seed != seed:
            raise GrowrunError(f"{key}: that run has seed={run_seed}, this one seed={seed}; equal compute compares "
                               f"the same seed: give seed={run_seed}")
        return compute, [path.resolve()]
    runs = grown_runs(path, seed)
    if not runs:
        seeds = sorted({str(run_seed_method(r)[0]) for r in sweep_runs(path) if run_compute(r) is not None})
        raise GrowrunError(f"{key}: no completed growing run with seed={seed} in that sweep; seeds it has: "
                           f"{', '.join(seeds) or 'none'}")
    return statistics.mean(run_compute(r) for r in runs), [r.resolve() for r in runs]


def resolve_budget(cfg, run_dir: Path, is_main: bool = True) -> float | None:
    """The run's budget in FLOPs (None: none): trainer.budget_flops, or from trainer.budget_from
    (read back from budget.json when the run resumes); rank 0 records it in budget.json."""
    t = cfg.trainer
    if t.budget_flops is None and t.budget_from is None:
        return None
    saved = run_dir / BUDGET_FILE
    if saved.exists():
        try:
            return float(json.loads(saved.read_text())["budget_flops"])
        except (OSError, ValueError, KeyError, TypeError) as ex:
            raise GrowrunError(f"{saved}: unreadable ({ex}); delete it to take the budget from "
                               f"trainer.budget_from={t.budget_from} again") from None
    budget, sources = float(t.budget_flops or 0), []
    if t.budget_from is not None:
        budget, sources = budget_from(Path(str(t.budget_from)), cfg.seed)
        log.info("trainer.budget_from=%s: budget %g FLOPs (%s)", t.budget_from, budget,
                 ", ".join(str(s) for s in sources))
    if is_main:
        from growrun.train.outputs import write_summary

        write_summary(saved, {"budget_flops": budget, "budget_from": t.budget_from,
                              "sources": [str(s) for s in sources]})
    return budget


def plan_budget(cfg, budget: float | None, model, input_shape, steps_per_epoch: int) -> int | None:
    """The run's number of steps under a budget of FLOPs (None: no budget); sets trainer.epochs."""
    from growrun.train.trainer import TRAIN_FLOPS_PER_FORWARD

    t = cfg.trainer
    if budget is None:
        return None
    forward = count_flops(model, input_shape)
    per_step = TRAIN_FLOPS_PER_FORWARD * forward * t.batch_size
    steps = budget_steps(budget, per_step)
    if steps < 1:
        what = f"trainer.budget_from={t.budget_from} (budget {budget:g})" if t.budget_from else \
            f"trainer.budget_flops={budget:g}"
        raise GrowrunError(f"{what}: less than one training step of this model "
                           f"({per_step:g} FLOPs: {TRAIN_FLOPS_PER_FORWARD} x {forward} per image x batch "
                           f"{t.batch_size}); must be at least {per_step:g}")
    t.epochs = math.ceil(steps / steps_per_epoch)
    log.info("budget %g FLOPs: %d steps of %g FLOPs (%d epochs, the last %s)", budget, steps,
             per_step, t.epochs, "whole" if steps % steps_per_epoch == 0 else
             f"{steps % steps_per_epoch} of {steps_per_epoch} steps")
    return steps


def main(argv: list[str]) -> int:
    """python -m growrun.train.budget SWEEP --seed S: its completed growing runs with seed S."""
    if len(argv) != 3 or argv[1] != "--seed":
        print("usage: python -m growrun.train.budget SWEEP_DIR --seed S", file=sys.stderr)
        return 2
    sweep = Path(argv[0])
    try:
        seed = int(argv[2])
    except ValueError:
        print(f"--seed {argv[2]}: not an integer", file=sys.stderr)
        return 2
    runs = grown_runs(sweep, seed) if sweep.is_dir() else []
    if not runs:
        print(f"{sweep}: no completed growing run with seed={seed}", file=sys.stderr)
        return 1
    print(",".join(str(r) for r in runs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
