"""Group the ok runs by the swept keys and summarise each group over its seeds.

Swept keys: the override keys (from each run's .hydra/overrides.yaml) whose value differs
between runs. Not swept, whatever their values: `seed` (what each group averages over),
`resume`, `hydra.*`, and keys that only say where data lives or how the run is displayed
(IGNORED_KEYS). A key's value in a run is its value in the run's composed config when the key
names a scalar there (so `optim.lr=0.10` and a default of 0.1 agree), else the override text
(config groups: `growth=tiny`), else "(default)"; "n/a" for growth.* keys of a run with
growth.method=none (a fixed network: its growth settings do nothing).

Per group and metric: n, mean and sample standard deviation (ddof = 1; None when n = 1) of
    final_test_acc   test_acc of the last metrics.csv row (fraction 0..1)
    best_test_acc    max test_acc over the rows
    growth_end_acc   test_acc at the end of the epoch of the last growth event that added
                     neurons (growth.csv), i.e. before the extra epochs; none without growth
    params           params of the last row
    flops_per_image  flops_per_image of the last row
    wall_seconds     total_seconds of the last row
    growth_share     growth time / wall_seconds, growth time = the sum of metrics.csv's per-epoch
                     growth_seconds (equal to summary.json's growth_seconds), else growth.csv's
                     stats_seconds + solve_seconds + search_seconds
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from growrun.report.reference import Reference, match_reference
from growrun.report.runs import Run

IGNORED_KEYS = {"seed", "resume", "dataset.root", "dataset.download", "dataset.verify", "trainer.progress"}
IGNORED_PREFIXES = ("hydra.", "hydra/")
DEFAULT = "(default)"
NOT_APPLICABLE = "n/a"
BUDGET_FROM = "trainer.budget_from"  # a fixed run at a grown run's compute: grouped by its source's group
METRICS = ["final_test_acc", "best_test_acc", "growth_end_acc", "params", "flops_per_image", "wall_seconds", "growth_share"]


@dataclass
class Stat:
    n: int
    mean: float | None
    std: float | None  # sample std; None when n < 2


@dataclass
class Group:
    key: dict[str, str]  # swept key -> value
    runs: list[Run]
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per run
    stats: dict[str, Stat] = field(default_factory=dict)
    reference: Reference | None = None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key.items() if not (k == BUDGET_FROM and v == "null")) \
            or "all runs"

    @property
    def short_label(self) -> str:
        """The label for plots: last key component, numbers to 4 significant digits."""
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_compact(v)}" for k, v in self.key.items()) or "all runs"

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.runs))


def parse_override(text: str) -> tuple[str, str | None]:
    """`key=value` -> (key, value), without Hydra's +, ++ and ~ prefixes; `~key` -> (key, None)."""
    key, sep, value = text.partition("=")
    key = key.lstrip("+~").strip()
    return key, (value.strip() if sep else None)


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key == "hydra" or key.startswith(IGNORED_PREFIXES)


def key_value(run: Run, key: str) -> str:
    if key.startswith("growth.") and run.method == "none":
        return NOT_APPLICABLE  # growth settings of a run that does not grow
    node: object = run.config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            node = _MISSING
            break
        node = node[part]
    if node is not _MISSING and not isinstance(node, dict):
        return _text(node)
    for override in run.overrides:
        k, v = parse_override(override)
        if k == key:
            return "(deleted)" if v is None else v
    return DEFAULT


_MISSING = object()


def _compact(text: str) -> str:
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def _text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def swept_keys(runs: list[Run]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        for override in run.overrides:
            key = parse_override(override)[0]
            if key and not is_ignored(key) and key not in keys:
                keys.append(key)
    return [k for k in keys if len({key_value(r, k) for r in runs}) > 1]


def group_runs(runs: list[Run]) -> tuple[list[str], list[Group]]:
    """(swept keys, groups of the ok runs in order of first appearance, with their statistics)."""
    ok = [r for r in runs if r.ok]
    keys = swept_keys(ok)
    groups: dict[tuple, Group] = {}
    paired = [r for r in ok if _budget_sources(r)]
    for run in [r for r in ok if not _budget_sources(r)]:
        value = tuple(key_value(run, k) for k in keys)
        groups.setdefault(value, Group(key=dict(zip(keys, value)), runs=[])).runs.append(run)
    labels = {str(r.path.resolve()): ", ".join(f"{k}={v}" for k, v in g.key.items() if k != BUDGET_FROM)
              or "all runs" for g in groups.values() for r in g.runs}  # each grown run's group, for its fixed runs
    for run in paired:
        value = tuple(_source_label(run, labels) if k == BUDGET_FROM else key_value(run, k) for k in keys)
        groups.setdefault(value, Group(key=dict(zip(keys, value)), runs=[])).runs.append(run)
    for group in groups.values():
        summarise(group)
    return keys, list(groups.values())


def _budget_sources(run: Run) -> list[str]:
    return list((run.budget or {}).get("sources") or []) if run.method == "none" else []


def _source_label(run: Run, labels: dict[str, str]) -> str:
    """trainer.budget_from's value for grouping: "= <the group of its source runs>" when they are
    among the runs reported, all in one group (so the fixed runs at the compute of one grown group,
    one per seed, form one group), else the path given."""
    found = {labels.get(s) for s in _budget_sources(run)}
    if len(found) == 1 and None not in found:
        return f"= {found.pop()}"
    return key_value(run, BUDGET_FROM)


def run_values(run: Run) -> dict[str, float | None]:
    rows = run.metrics
    last = rows[-1]
    accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
    total = last.get("total_seconds")
    growth = growth_seconds(run)
    share = growth / total if (growth is not None and total) else None
    return {"final_test_acc": last.get("test_acc"), "best_test_acc": max(accs) if accs else None,
            "growth_end_acc": growth_end_acc(run), "params": last.get("params"), "flops_per_image": last.get("flops_per_image"),
            "wall_seconds": total, "growth_share": share}


def growth_end_acc(run: Run) -> float | None:
    """test_acc of the first evaluated epoch at or after the last growth event with added > 0."""
    epochs = [row["epoch"] for row in run.growth or () if row.get("added") and row.get("epoch") is not None]
    if not epochs:
        return None
    end = math.ceil(max(epochs) - 1e-9)
    return next((r["test_acc"] for r in run.metrics if r["epoch"] >= end and r.get("test_acc") is not None), None)


def growth_seconds(run: Run) -> float | None:
    per_epoch = [r.get("growth_seconds") for r in run.metrics]
    if per_epoch and all(v is not None for v in per_epoch):
        return float(sum(per_epoch))
    if run.summary and isinstance(run.summary.get("growth_seconds"), (int, float)):
        return float(run.summary["growth_seconds"])
    if run.growth is not None:
        return float(sum((row.get(c) or 0.0) for row in run.growth
                         for c in ("stats_seconds", "solve_seconds", "search_seconds")))
    return None


def summarise(group: Group) -> None:
    per_run = [run_values(r) for r in group.runs]
    for metric in METRICS:
        values = [v[metric] for v in per_run if v[metric] is not None]
        group.values[metric] = values
        group.stats[metric] = describe(values)
    group.reference = match_reference([r.config for r in group.runs])


def describe(values: list[float]) -> Stat:
    if not values:
        return Stat(0, None, None)
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(len(values), mean, std)
