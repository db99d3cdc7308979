"""The fixed network at equal compute: each grown run beside the fixed run trained for its compute.

A fixed run at equal compute is a growth.method=none run with a budget.json (trainer.budget_flops or
trainer.budget_from; growrun.train.budget). Each grown run (growth.method != none) is paired with
    1. the fixed run whose budget.json names it as its only source (trainer.budget_from=RUN), else
    2. of the fixed runs with a budget and the same seed and dataset, the one whose budget is the
       nearest to the grown run's compute (|log ratio|; trainer.budget_from=SWEEP, budget_flops).
Per pair: delta = grown final test accuracy - fixed final test accuracy, and the compute mismatch
m = fixed compute / grown compute - 1 (compute = train_flops + growth_flops of a run's last row).
A pair with |m| > max(TOLERANCE, one training step of the fixed run / grown compute) compares
unequal budgets: the report warns.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from growrun.report.compute import row_compute
from growrun.report.runs import Run, is_equal_compute
from growrun.report.table import Group

TOLERANCE = 0.02


@dataclass
class Pair:
    grown: Run
    fixed: Run
    delta: float  # accuracy difference, fraction (grown - fixed)
    mismatch: float  # fixed compute / grown compute - 1
    step: float  # one training step of the fixed run / grown compute (its budget's rounding)

    @property
    def unequal(self) -> bool:
        return abs(self.mismatch) > max(TOLERANCE, self.step)


@dataclass
class Deltas:
    pairs: list[Pair] = field(default_factory=list)
    unpaired: list[Run] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [p.delta for p in self.pairs]

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.pairs else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.pairs) > 1 else None


def final_compute(run: Run) -> float | None:
    return row_compute(run.metrics[-1]) if run.metrics else None


def pair_runs(groups: list[Group]) -> dict[str, Deltas]:
    """{grown group label: its pairs}; empty when no fixed run has a budget."""
    fixed = [r for g in groups for r in g.runs if is_equal_compute(r)]
    if not fixed:
        return {}
    out: dict[str, Deltas] = {}
    for g in groups:
        if g.methods == ["none"]:
            continue
        deltas = out.setdefault(g.label, Deltas())
        for run in g.runs:
            match = _match(run, fixed)
            compute = final_compute(run)
            if match is None or not compute:
                deltas.unpaired.append(run)
                continue
            delta = match.metrics[-1]["test_acc"] - run.metrics[-1]["test_acc"]
            deltas.pairs.append(Pair(run, match, -delta, final_compute(match) / compute - 1, _step(match) / compute))
    return out


def _step(run: Run) -> float:
    """FLOPs of one training step of a fixed run: 3 x forward FLOPs per image x batch size."""
    batch = (run.config.get("trainer") or {}).get("batch_size") or 0
    return 3 * (run.metrics[-1].get("flops_per_image") or 0) * batch


def _match(run: Run, fixed: list[Run]) -> Run | None:
    path = str(run.path.resolve())
    exact = [f for f in fixed if f.budget.get("sources") == [path]]
    if exact:
        return exact[0]
    compute = final_compute(run)
    same = [f for f in fixed if f.seed == run.seed and f.config.get("dataset") == run.config.get("dataset")
            and f.budget.get("budget_flops")]
    if not same or not compute:
        return None
    return min(same, key=lambda f: abs(math.log(f.budget["budget_flops"] / compute)))


def cell(deltas: Deltas | None) -> str:
    """'+0.35 ± 0.80 (s0 +1.20, s1 -0.50)' in percentage points; '—' without pairs."""
    if deltas is None or not deltas.pairs:
        return "—"
    std = "—" if deltas.std is None else f"{100 * deltas.std:.2f}"
    seeds = ", ".join(f"s{p.grown.seed} {100 * p.delta:+.2f}" for p in deltas.pairs)
    return f"{100 * deltas.mean:+.2f} ± {std} ({seeds})"


def warnings(table: dict[str, Deltas]) -> list[str]:
    """One line per grown group whose comparison mixes budgets (or lacks a fixed run)."""
    lines = []
    for label, d in table.items():
        off = [p for p in d.pairs if p.unequal]
        if off:
            worst = max(off, key=lambda p: abs(p.mismatch))
            share = 100 * (1 + worst.mismatch)
            lines.append(f"warning: {label}: {len(off)} of {len(d.pairs)} comparisons at equal compute mix budgets "
                         f"(worst: seed {worst.grown.seed}, the fixed run's compute is {share:.1f} % of the grown "
                         f"run's compute; tolerance ±{100 * TOLERANCE:g} %)")
        if d.unpaired:
            seeds = ", ".join(str(r.seed) for r in d.unpaired)
            lines.append(f"warning: {label}: no fixed run at equal compute for seed {seeds}")
    return lines


def markdown(table: dict[str, Deltas]) -> list[str]:
    """The report's equal-compute section."""
    if not table:
        return ["No fixed run with a compute budget (trainer.budget_from / trainer.budget_flops): nothing to "
                "compare at equal compute."]
    lines = ["Each grown run beside the fixed network trained for its compute (same seed): difference of final "
             "test accuracy in points, grown − fixed (positive: growing paid). Compute = the fixed run's compute "
             "as a share of the grown run's (it trains whole steps: up to one step below its budget).", "",
             "| group | Δ acc (pp), mean ± std (per seed) | fixed runs | compute vs grown |",
             "|---|---|---|---|"]
    for label, d in table.items():
        fixed = ", ".join(f"`{p.fixed.name}`" for p in d.pairs) or "—"
        budget = ", ".join(f"{100 * (1 + p.mismatch):.1f} %" for p in d.pairs) or "—"
        lines.append(f"| {label} | {cell(d)} | {fixed} | {budget} |")
    notes = warnings(table)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return lines
