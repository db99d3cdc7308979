"""`growrun report`: comparison tables and plots of sweeps (entry point: growrun.report.cli.report_main).

    runs.py       find run directories, read their files, decide which runs are usable
    table.py      group runs by the swept keys, mean and std over seeds
    reference.py  the TINY paper's reported numbers and when a group is comparable to them
    render.py     report.md and report.csv
    plots.py      the PNG figures
    cli.py        argument parsing and atomic writing

run_plots(run_dir) draws one run's figures for the loggers (growrun/loggers/), as the report would.
"""
from __future__ import annotations

from pathlib import Path


def collect(dirs: list[Path]):
    """(runs, swept keys, groups) of the run directories in `dirs`, compute counted."""
    from growrun.report.compute import add_compute
    from growrun.report.runs import load_runs
    from growrun.report.table import group_runs

    runs = load_runs(dirs)
    add_compute(runs)
    keys, groups = group_runs(runs)
    return runs, keys, groups


def run_plots(run_dir: Path) -> tuple[dict[str, bytes], list[str]]:
    """The figures `growrun report RUN_DIR` draws of one completed run ({file name: PNG bytes}),
    and a note for each figure left out (no data, matplotlib not installed)."""
    from growrun.report.plots import build_plots

    _, _, groups = collect([Path(run_dir)])
    images, _, skipped = build_plots(groups)
    return images, skipped
