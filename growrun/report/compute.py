"""Accuracy against compute, so that a growth study can say "grown to the reference's
accuracy with X % of its compute".

A run's compute after an epoch is metrics.csv's train_flops + growth_flops: the training FLOPs
of every image seen at the width it was seen at (3 x the forward FLOPs per image) plus the
growth events' statistics passes and line searches (growrun.train.trainer,
growrun.train.events.compute). Evaluation is not counted.

The reference is the group of fixed networks (growth.method=none, trained for epochs, not for a
budget; of several, the one with the most parameters). For each group and fraction f in FRACTIONS, a run's compute to reach f is
its compute at the first evaluated epoch whose test accuracy is >= f x the reference's mean
final test accuracy; the group's value is the mean over the runs that reach it (how many did is
shown), and the ratio divides it by the reference's own value.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from growrun.report.runs import Run, is_equal_compute
from growrun.report.table import Group

FRACTIONS = (0.95, 0.99)


def row_compute(row: dict) -> float | None:
    """train_flops + growth_flops of a metrics row (None when it lacks them)."""
    train, growth = row.get("train_flops"), row.get("growth_flops")
    return None if train is None or growth is None else train + growth


def add_compute(runs: list[Run]) -> None:
    """metrics rows gain "compute" (row_compute)."""
    for run in runs:
        for row in run.metrics:
            row["compute"] = row_compute(row)


def reference_group(groups: list[Group]) -> Group | None:
    fixed = [g for g in groups if g.methods == ["none"] and g.stats["final_test_acc"].mean is not None
             and not any(is_equal_compute(r) for r in g.runs)]
    return max(fixed, key=lambda g: g.stats["params"].mean or 0) if fixed else None


def compute_to_reach(run: Run, threshold: float) -> float | None:
    for row in run.metrics:
        if row.get("test_acc") is not None and row["test_acc"] >= threshold:
            return row.get("compute")
    return None


@dataclass
class Reach:
    mean: float | None  # mean compute over the runs that reached the threshold
    reached: int
    runs: int
    ratio: float | None  # mean / the reference's mean


def reach_table(groups: list[Group], reference: Group) -> dict[str, dict[float, Reach]]:
    """{group label: {fraction: Reach}} against the reference's mean final test accuracy."""
    target = reference.stats["final_test_acc"].mean
    table: dict[str, dict[float, Reach]] = {}
    for fraction in FRACTIONS:
        ref_mean = _mean_reach(reference, fraction * target)[0]
        for g in groups:
            mean, reached = _mean_reach(g, fraction * target)
            ratio = mean / ref_mean if mean is not None and ref_mean else None
            table.setdefault(g.label, {})[fraction] = Reach(mean, reached, len(g.runs), ratio)
    return table


def _mean_reach(group: Group, threshold: float) -> tuple[float | None, int]:
    values = [v for v in (compute_to_reach(r, threshold) for r in group.runs) if v is not None]
    return (statistics.mean(values) if values else None), len(values)


def total_compute(group: Group) -> tuple[float | None, float | None]:
    """(mean final compute, mean growth share of it) over the group's runs."""
    totals, shares = [], []
    for run in group.runs:
        last = run.metrics[-1] if run.metrics else {}
        if last.get("compute"):
            totals.append(last["compute"])
            shares.append(last["growth_flops"] / last["compute"])
    return (statistics.mean(totals) if totals else None), (statistics.mean(shares) if shares else None)


def training_rate(group: Group) -> tuple[float | None, float | None]:
    """(mean wall seconds, mean training FLOP rate) over the group's runs: the rate is train_flops /
    (wall seconds - growth seconds), so that narrow early widths' poor use of the machine shows
    beside the FLOPs they save."""
    walls, rates = [], []
    for run in group.runs:
        last = run.metrics[-1] if run.metrics else {}
        total, train = last.get("total_seconds"), last.get("train_flops")
        growth = sum(r.get("growth_seconds") or 0.0 for r in run.metrics)
        if total:
            walls.append(total)
            if train is not None and total > growth:
                rates.append(train / (total - growth))
    return (statistics.mean(walls) if walls else None), (statistics.mean(rates) if rates else None)


def mean_curve(group: Group) -> list[tuple[float, float]]:
    """(mean compute, mean test accuracy) per epoch over the runs that evaluated that epoch."""
    by_epoch: dict[float, list[tuple[float, float]]] = {}
    for run in group.runs:
        for row in run.metrics:
            if row.get("compute") is not None and row.get("test_acc") is not None:
                by_epoch.setdefault(row["epoch"], []).append((row["compute"], row["test_acc"]))
    return [(statistics.mean(c for c, _ in pts), statistics.mean(a for _, a in pts))
            for _, pts in sorted(by_epoch.items())]


def markdown(groups: list[Group]) -> list[str]:
    """The report's compute section."""
    if not any(r.metrics and r.metrics[-1].get("compute") is not None for g in groups for r in g.runs):
        return ["No run logged its compute (train_flops / growth_flops: runs of an older growrun)."]
    reference = reference_group(groups)
    lines = ["Compute = training FLOPs (3 x forward FLOPs per image seen, at the width it was seen at) + growth "
             "FLOPs (statistics passes, BatchNorm moments, line searches); evaluation not counted. Training FLOP/s "
             "= training FLOPs / (wall time - growth time): a narrow network uses the machine less well, so its "
             "saved FLOPs save less wall time.", ""]
    if reference is None:
        lines.append("No group of fixed networks (growth.method=none) to compare against: totals only.")
    else:
        acc = 100 * reference.stats["final_test_acc"].mean
        lines.append(f"Reference: `{reference.label}` (final test accuracy {acc:.2f} %). Compute to reach a "
                     "fraction of it: mean over the runs that reach it (reached / runs), and the ratio to the "
                     "reference's own compute to reach it.")
    lines.append("")
    header = ["group", "compute (FLOPs)", "growth share", "wall time (s)", "training FLOP/s"]
    reach = reach_table(groups, reference) if reference else {}
    if reference:
        for f in FRACTIONS:
            header += [f"to {100 * f:.0f} % of ref", "x ref"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        total, share = total_compute(g)
        wall, rate = training_rate(g)
        row = [g.label, _si(total), "—" if share is None else f"{100 * share:.1f} %",
               "—" if wall is None else f"{wall:.0f}", _si(rate)]
        for f in FRACTIONS if reference else ():
            r = reach[g.label][f]
            row += [f"{_si(r.mean)} ({r.reached}/{r.runs})", "—" if r.ratio is None else f"{r.ratio:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _si(v: float | None) -> str:
    if v is None:
        return "—"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g}"
