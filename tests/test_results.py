"""Results as data (scripts/results.py): every published results table is the one its committed
rows give; the table's numbers are the rows' means, sample stds and per-seed differences."""
from __future__ import annotations

import csv
import importlib.util
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def results_module():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_published_table_is_the_one_its_rows_give():
    assert results_module().tables(ROOT / "results", check=True) == 0


def test_a_table_follows_its_rows_and_check_sees_a_stale_one(tmp_path):
    results = results_module()
    rows = [  # arm, seed, final accuracy, compute
        ("grown", 0, 0.80, 60e12), ("grown", 1, 0.84, 62e12), ("grown", 2, 0.79, 61e12),
        ("fixed_eq", 0, 0.81, 60e12), ("fixed_eq", 1, 0.82, 62e12), ("fixed_eq", 2, 0.80, 61e12),
        ("fixed_full", 0, 0.86, 100e12), ("fixed_full", 1, 0.85, 100e12),
    ]
    with open(tmp_path / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, results.COLUMNS)
        writer.writeheader()
        for arm, seed, acc, compute in rows:
            writer.writerow({"arm": arm, "seed": seed, "final_test_acc": acc, "compute": compute, "wall_seconds": 10.0,
                             "equal_arm": "fixed_eq" if arm == "grown" else ""})
    page = tmp_path / "page.md"
    page.write_text("# study\n\n<!-- table rows=runs.csv reference=fixed_full -->\n<!-- /table -->\ntail\n")
    assert results.tables(tmp_path, check=True) == 1  # empty: differs from its rows
    assert results.tables(tmp_path, check=False) == 0 and results.tables(tmp_path, check=True) == 0
    text = page.read_text()
    assert text.startswith("# study\n") and text.endswith("<!-- /table -->\ntail\n")
    line = next(ln for ln in text.splitlines() if ln.startswith("| grown |"))
    accs = [0.80, 0.84, 0.79]
    deltas = [0.80 - 0.81, 0.84 - 0.82, 0.79 - 0.80]
    assert f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}" in line
    assert f"{100 * statistics.mean(deltas):.2f} ± {100 * statistics.stdev(deltas):.2f}" in line
    assert "s0 -1.00, s1 +2.00, s2 -1.00" in line
    assert f"{100 * statistics.mean(accs) / 0.855:.1f} %" in line and f"{100 * 61e12 / 100e12:.1f} %" in line
    (tmp_path / "runs.csv").write_text((tmp_path / "runs.csv").read_text().replace("0.84,", "0.74,"))
    assert results.tables(tmp_path, check=True) == 1  # a row changed: the published table is stale
