"""Results as data: one committed row per finished run, and the table made from those rows.

    python scripts/results.py add results/STUDY/runs.csv ARM RUN_DIR [RUN_DIR ...] [--equal ARM]
        --commit SHA [--note TEXT] [--curves CURVES.csv]
    python scripts/results.py tables [ROOT] [--check]
    python scripts/results.py plot results/STUDY/curves.csv OUT.png

`add` reads each run directory (summary.json, metrics.csv, .hydra/config.yaml) and writes its row
(replacing a row of the same arm and seed): final and best test accuracy, compute (train_flops +
growth_flops), wall and growth seconds, the commit and this machine (growrun.machine), and --equal:
the arm of the fixed runs at this arm's compute, paired by seed. `tables` makes, per arm, mean ±
sample std over seeds of the final accuracy, compute and wall time, the difference to the
equal-compute arm per seed (grown - fixed, points), and against the reference arm (the fixed
network trained for its full length): accuracy and compute as a share of its means. Where: every
page under results/ (ROOT) with a `<!-- table rows=FILE [reference=ARM] -->` ... `<!-- /table -->`
block gets the table of FILE (relative to the page) between those lines; --check compares instead
of writing (the test suite runs it, so a published table cannot drift from its rows).

`add` also writes each run's accuracy-vs-compute curve (one row per epoch: compute so far, test
accuracy, learning rate, parameters) to curves.csv beside the rows file (--curves: another file, for
a second study in the same folder). A `<!-- curves
rows=FILE at=X,Y,... -->` ... `<!-- /curves -->` block gets, per arm, the mean over seeds of the
test accuracy of the last epoch finished within X, Y, ... TFLOPs; `plot` draws the curves (one
line per run, a colour per arm; needs matplotlib). The curves also hold the wall seconds spent by
each epoch's end (rows added before that column have none): a `<!-- walltime rows=FILE at=X,Y,...
-->` ... `<!-- /walltime -->` block gets, per arm, the mean wall time by which its runs had spent X,
Y, ... TFLOPs (linear within an epoch) and their mean FLOP rate: FLOPs and wall time side by side.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

import yaml

COLUMNS = ["arm", "seed", "final_test_acc", "best_test_acc", "compute", "train_flops", "growth_flops",
           "wall_seconds", "growth_seconds", "epochs", "steps", "equal_arm", "run", "commit", "machine", "note"]


def run_row(arm: str, run: Path, equal: str, commit: str, machine: str, note: str = "") -> dict:
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("status") != "completed":
        raise SystemExit(f"{run}: status {summary.get('status')}, not completed; only finished runs are rows")
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    with open(run / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    train, growth = float(last["train_flops"]), float(last["growth_flops"])
    return {"arm": arm, "seed": config["seed"], "final_test_acc": float(last["test_acc"]),
            "best_test_acc": summary["best_test_acc"], "compute": train + growth, "train_flops": train,
            "growth_flops": growth, "wall_seconds": float(last["total_seconds"]),
            "growth_seconds": summary["growth_seconds"], "epochs": summary["epochs_done"], "steps": summary["step"],
            "equal_arm": equal, "run": run.name, "commit": commit, "machine": machine, "note": note}


CURVE_COLUMNS = ["arm", "seed", "epoch", "compute", "test_acc", "lr", "params", "seconds"]


def curve_rows(arm: str, run: Path) -> list[dict]:
    """A run's accuracy-vs-compute curve: per epoch, the training + growth FLOPs and the wall seconds
    (training, growth and evaluation) spent so far."""
    seed = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"]
    with open(run / "metrics.csv", newline="") as f:
        return [{"arm": arm, "seed": seed, "epoch": int(r["epoch"]),
                 "compute": float(r["train_flops"]) + float(r["growth_flops"]), "test_acc": float(r["test_acc"]),
                 "lr": float(r["lr"]), "params": int(r["params"]), "seconds": float(r["total_seconds"])}
                for r in csv.DictReader(f)]


def _replace(rows: list[dict], new: list[dict]) -> list[dict]:
    """rows without those of new's (arm, seed) pairs, then new; sorted by arm, seed (and epoch)."""
    pairs = {(r["arm"], str(r["seed"])) for r in new}
    kept = [r for r in rows if (r["arm"], str(r["seed"])) not in pairs] + new
    return sorted(kept, key=lambda r: (r["arm"], int(r["seed"]), int(r.get("epoch") or 0)))


def write_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def add(args) -> None:
    from growrun.machine import describe

    machine = describe()
    text = f"{machine['cpu']}, {machine['cores']} cores, {machine['aten_cpu_capability']}"
    curves_path = args.curves or args.rows.with_name("curves.csv")
    rows, curves = read_rows(args.rows), read_rows(curves_path)
    for run in args.runs:
        rows = _replace(rows, [run_row(args.arm, run, args.equal or "", args.commit, text, args.note)])
        curves = _replace(curves, curve_rows(args.arm, run))
    write_rows(args.rows, COLUMNS, rows)
    write_rows(curves_path, CURVE_COLUMNS, curves)


def _ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else None
    return f"{mean:.{digits}f} ± {'—' if std is None else f'{std:.{digits}f}'}"


def _markdown(head: list[str], body: list[list[str]]) -> str:
    """A markdown table: its header line, the separator, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines) + "\n"


def _curves_by_arm(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Curve rows grouped: arm -> seed -> that run's rows (in file order, by epoch)."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        runs.setdefault(r["arm"], {}).setdefault(str(r["seed"]), []).append(r)
    return runs


def table(rows: list[dict], reference: str | None) -> str:
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    ref = arms.get(reference or "", [])
    ref_acc = statistics.mean(float(r["final_test_acc"]) for r in ref) if ref else None
    ref_compute = statistics.mean(float(r["compute"]) for r in ref) if ref else None
    head = ["arm", "n", "seeds", "final test acc (%)", "Δ vs fixed @ equal compute (pp), per seed",
            "compute (TFLOPs)", "wall time (s)"]
    if ref:
        head += [f"acc / {reference}", f"compute / {reference}"]
    body = []
    for arm, rs in arms.items():
        accs = [float(r["final_test_acc"]) for r in rs]
        computes = [float(r["compute"]) for r in rs]
        deltas = []
        fixed = {str(r["seed"]): float(r["final_test_acc"]) for r in arms.get(rs[0]["equal_arm"], [])}
        for r in rs:
            if str(r["seed"]) in fixed:
                deltas.append((r["seed"], float(r["final_test_acc"]) - fixed[str(r["seed"])]))
        delta = "—" if not deltas else (f"{_ms([d for _, d in deltas], 100)} ("
                                        + ", ".join(f"s{s} {100 * d:+.2f}" for s, d in deltas) + ")")
        cells = [arm, str(len(rs)), ",".join(str(r["seed"]) for r in rs), _ms(accs, 100), delta,
                 _ms(computes, 1e-12), _ms([float(r["wall_seconds"]) for r in rs], 1, 0)]
        if ref:
            cells += [f"{100 * statistics.mean(accs) / ref_acc:.1f} %", f"{100 * statistics.mean(computes) / ref_compute:.1f} %"]
        body.append(cells)
    return _markdown(head, body)


def curve_table(rows: list[dict], at: list[float]) -> str:
    """Per arm, the mean over its seeds of the test accuracy (%) of the last epoch finished within
    each compute in `at` (TFLOPs); — where a seed has no epoch that cheap."""
    body = []
    for arm, seeds in _curves_by_arm(rows).items():
        cells = [arm, str(len(seeds))]
        for x in at:
            reached = [[float(r["test_acc"]) for r in curve if float(r["compute"]) <= x * 1e12] for curve in seeds.values()]
            cells.append(f"{100 * statistics.mean(accs[-1] for accs in reached):.1f}" if all(reached) else "—")
        body.append(cells)
    return _markdown(["arm", "n"] + [f"<= {x:g} TFLOPs" for x in at], body)


def seconds_at(curve: list[dict], flops: float) -> float | None:
    """Wall seconds when the run had spent `flops`: linear between its epochs' ends (from 0 at 0);
    None past its end."""
    done_flops, done_seconds = 0.0, 0.0
    for r in curve:
        c, t = float(r["compute"]), float(r["seconds"])
        if c >= flops:
            return done_seconds + (t - done_seconds) * (flops - done_flops) / (c - done_flops)
        done_flops, done_seconds = c, t
    return None


def wall_table(rows: list[dict], at: list[float]) -> str:
    """Per arm, over its runs whose curve has wall seconds: the mean wall time (s) by which each run
    had spent X TFLOPs, for X in `at`, and the mean rate of the whole run (GFLOP/s: its training and
    growth FLOPs over its wall time); — past a run's end."""
    body = []
    for arm, seeds in _curves_by_arm([r for r in rows if r.get("seconds")]).items():
        cells = [arm, str(len(seeds)), ",".join(seeds)]
        for x in at:
            times = [seconds_at(curve, x * 1e12) for curve in seeds.values()]
            cells.append("—" if None in times else f"{statistics.mean(times):.0f}")
        rates = [float(c[-1]["compute"]) / float(c[-1]["seconds"]) / 1e9 for c in seeds.values()]
        body.append(cells + [f"{statistics.mean(rates):.0f}"])
    return _markdown(["arm", "n", "seeds"] + [f"s at {x:g} TFLOPs" for x in at] + ["GFLOP/s over the run"], body)


# A marked block: its opening comment (what to make, from which rows), the generated body, its closing comment.
MARKERS = [
    (re.compile(r"<!-- table rows=(?P<rows>\S+)(?: reference=(?P<ref>\S+))? -->\n(?P<body>.*?)<!-- /table -->", re.S),
     lambda rows, m: table(rows, m["ref"])),
    (re.compile(r"<!-- curves rows=(?P<rows>\S+) at=(?P<at>[\d.,]+) -->\n(?P<body>.*?)<!-- /curves -->", re.S),
     lambda rows, m: curve_table(rows, [float(x) for x in m["at"].split(",")])),
    (re.compile(r"<!-- walltime rows=(?P<rows>\S+) at=(?P<at>[\d.,]+) -->\n(?P<body>.*?)<!-- /walltime -->", re.S),
     lambda rows, m: wall_table(rows, [float(x) for x in m["at"].split(",")])),
]


def render(page: Path) -> str:
    """The page with every marked block regenerated from its rows file (relative to the page)."""
    text = page.read_text()
    for marker, make in MARKERS:
        def one(m: re.Match, make=make) -> str:
            body = make(read_rows(page.parent / m["rows"]), m)
            return m.group(0).replace(m["body"], body, 1) if m["body"] else m.group(0).replace("-->\n", "-->\n" + body, 1)
        text = marker.sub(one, text)
    return text


def plot(curves: Path, out: Path) -> None:
    """Test accuracy against compute, one line per run, one colour per arm; written whole or not at all."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot needs matplotlib: pip install -e '.[plots]'") from None
    from growrun.files import atomic_write

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[tuple[str, str], list[dict]] = {}
    for r in read_rows(curves):
        runs.setdefault((r["arm"], str(r["seed"])), []).append(r)
    arms = sorted({arm for arm, _ in runs})
    fig, ax = plt.subplots(figsize=(8, 5))
    labelled = set()
    for (arm, _), curve in runs.items():
        ax.plot([float(r["compute"]) / 1e12 for r in curve], [100 * float(r["test_acc"]) for r in curve],
                color=f"C{arms.index(arm)}", marker="o", markersize=2.5, linewidth=1,
                label=None if arm in labelled else arm)
        labelled.add(arm)
    ax.set_xlabel("compute spent (training + growth, TFLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def tables(root: Path, check: bool) -> int:
    """Regenerate (or with check, compare) every marked table of the .md pages under root."""
    stale = []
    for page in sorted(root.rglob("*.md")):
        text = page.read_text()
        if not any(marker.search(text) for marker, _ in MARKERS):
            continue
        new = render(page)
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new)
    for page in stale:
        print(f"{page}: {'differs from its rows' if check else 'table regenerated'}")
    return 1 if check and stale else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add")
    a.add_argument("rows", type=Path)
    a.add_argument("arm")
    a.add_argument("runs", type=Path, nargs="+")
    a.add_argument("--equal", default="")
    a.add_argument("--commit", required=True)
    a.add_argument("--note", default="", help="e.g. why its wall time is not comparable")
    a.add_argument("--curves", type=Path, help="the curves file (default: curves.csv beside ROWS); "
                   "one per study, as a curves block lists every arm in its file")
    t = sub.add_parser("tables")
    t.add_argument("root", type=Path, nargs="?", default=Path(__file__).resolve().parents[1] / "results")
    t.add_argument("--check", action="store_true", help="exit 1 if a table differs from its rows; write nothing")
    p = sub.add_parser("plot")
    p.add_argument("curves", type=Path)
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "add":
        add(args)
        return 0
    if args.command == "plot":
        plot(args.curves, args.out)
        return 0
    return tables(args.root, args.check)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
