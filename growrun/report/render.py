"""The report's text: the markdown table and report.md, and report.csv.

report.md shows accuracies in percent, mean ± sample std over seeds (— when n = 1);
report.csv holds the raw, unrounded numbers, one row per group: accuracies and the growth
share as fractions (0..1, as in metrics.csv), times in seconds.
"""
from __future__ import annotations

import csv
import io

from growrun.report import compute, equal
from growrun.report.reference import REFERENCE_NOTE, REFERENCES, SOURCE, rule_text
from growrun.report.runs import Run
from growrun.report.table import METRICS, Group, Stat

DASH = "—"
COLUMNS = [  # (metric, markdown header, formatter of one number)
    ("final_test_acc", "final test acc (%)", lambda v: f"{100 * v:.2f}"),
    ("best_test_acc", "best test acc (%)", lambda v: f"{100 * v:.2f}"),
    ("growth_end_acc", "test acc at growth end (%)", lambda v: f"{100 * v:.2f}"),
    ("params", "params", lambda v: si(v)),
    ("flops_per_image", "FLOPs / image", lambda v: si(v)),
    ("wall_seconds", "wall time (s)", lambda v: f"{v:.1f}"),
    ("growth_share", "growth share (%)", lambda v: f"{100 * v:.1f}"),
]
PAPER_HEADER = "paper (%)†"
EQUAL_HEADER = "Δ vs fixed @ equal compute (pp)"


def si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def cell(stat: Stat, fmt) -> str:
    if stat.mean is None:
        return DASH
    return f"{fmt(stat.mean)} ± {fmt(stat.std) if stat.std is not None else DASH}"


def _escape(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_table(keys: list[str], groups: list[Group], pairs: dict | None = None) -> str:
    """pairs: growrun.report.equal.pair_runs (a column of differences to the fixed network at equal
    compute when any)."""
    paper = any(g.reference is not None for g in groups)
    header = [*(keys or ["group"]), "method", "n", "seeds"]
    for metric, title, _ in COLUMNS:
        header.append(title)
        if metric == "final_test_acc" and paper:
            header.append(PAPER_HEADER)
        if metric == "final_test_acc" and pairs:
            header.append(EQUAL_HEADER)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for g in groups:
        row = [*(g.key[k] for k in keys)] if keys else [g.label]
        row += ["/".join(g.methods), str(len(g.runs)), ",".join(str(s) for s in g.seeds)]
        for metric, _, fmt in COLUMNS:
            row.append(cell(g.stats[metric], fmt))
            if metric == "final_test_acc" and paper:
                row.append(g.reference.text() if g.reference else "")
            if metric == "final_test_acc" and pairs:
                row.append(equal.cell(pairs.get(g.label)) if g.label in pairs else "")
        lines.append("| " + " | ".join(_escape(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(sources: list[str], runs: list[Run], keys: list[str], groups: list[Group],
                    plots: list[tuple[str, str]], skipped: list[str], pairs: dict | None = None) -> str:
    bad = [r for r in runs if not r.ok]
    out = ["# growrun report", ""]
    out.append(f"Sources: {', '.join(f'`{s}`' for s in sources)}. Runs: {len(runs)} found, "
               f"{len(runs) - len(bad)} ok, {len(bad)} missing or failed.")
    out.append("")
    if keys:
        out.append(f"Groups: the swept keys {', '.join(f'`{k}`' for k in keys)} (override keys whose value "
                   "differs between runs); the runs of a group differ by `seed` only and are averaged.")
    else:
        out.append("Groups: no override key other than `seed` differs between the runs, so they form one "
                   "group, averaged over seeds.")
    out += ["", "## Results", ""]
    if groups:
        out.append(markdown_table(keys, groups, pairs))
        out.append("Mean ± sample standard deviation (n − 1) over the runs of a group; — when a group has "
                   "one run. Final = last epoch, best = best epoch of each run; params, FLOPs and wall "
                   "time at the end of the run; growth share = time spent in growth events / wall time.")
    else:
        out.append("No run completed: nothing to tabulate.")
    out += ["", "## Compute", ""]
    out += compute.markdown(groups)
    out += ["", "## Equal compute", ""]
    out += equal.markdown(pairs or {})
    out += ["", "## Paper reference", ""]
    out += _reference_section(groups)
    out += ["", "## Plots", ""]
    out += [f"- `{name}`: {what}" for name, what in plots] or ["- none written"]
    out += [f"- skipped: {why}" for why in skipped]
    out += ["", "## Missing or failed runs", ""]
    if bad:
        out += [f"- `{r.name}` (`{r.path}`): {_escape(r.reason or '')}" for r in bad]
        out.append("")
        out.append("These runs are excluded from every mean above.")
    else:
        out.append("none")
    return "\n".join(out) + "\n"


def _reference_section(groups: list[Group]) -> list[str]:
    values = "; ".join(f"{r.label} {r.text()} %" for r in REFERENCES.values())
    best = REFERENCES["tiny"]
    lines = [f"† {REFERENCE_NOTE}. {SOURCE}: {values} (best TINY variant {best.best_variant:.1f} ± "
             f"{best.best_variant_std:.1f} %).", ""]
    matched = [g for g in groups if g.reference is not None]
    if matched:
        lines.append("The paper column (beside the final test accuracy) is filled for the groups whose protocol "
                     f"matches: {', '.join(f'`{g.label}` ({g.reference.label})' for g in matched)}.")
    else:
        lines.append("No group runs the paper's protocol, so the table has no paper column.")
    lines += ["", f"Matching rule: {rule_text()}."]
    return lines


def report_csv(keys: list[str], groups: list[Group], pairs: dict | None = None) -> str:
    """One row per group; equal_delta_*: final test accuracy minus the fixed network's at equal
    compute (fractions), per seed as seed:value;..."""
    pairs = pairs or {}
    header = [*keys, "group", "method", "n", "seeds", "runs"]
    for metric in METRICS:
        header += [f"{metric}_mean", f"{metric}_std", f"{metric}_n"]
    header += ["paper_reference", "paper_test_acc", "paper_test_acc_std"]
    header += ["equal_delta_mean", "equal_delta_std", "equal_delta_n", "equal_delta_per_seed", "equal_budget_ratio"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for g in groups:
        row: list = [*(g.key[k] for k in keys), g.label, "/".join(g.methods), len(g.runs),
                     ";".join(str(s) for s in g.seeds), ";".join(r.name for r in g.runs)]
        for metric in METRICS:
            s = g.stats[metric]
            row += [_raw(s.mean), _raw(s.std), s.n]
        ref = g.reference
        row += [ref.label if ref else "", _raw(ref.acc / 100 if ref else None),
                _raw(ref.std / 100 if ref and ref.std is not None else None)]
        d = pairs.get(g.label)
        row += [_raw(d.mean if d else None), _raw(d.std if d else None), len(d.pairs) if d else 0,
                ";".join(f"{p.grown.seed}:{p.delta!r}" for p in d.pairs) if d else "",
                ";".join(repr(1 + p.mismatch) for p in d.pairs) if d else ""]
        writer.writerow(row)
    return buf.getvalue()


def _raw(v: float | None) -> str:
    return "" if v is None else repr(float(v))
