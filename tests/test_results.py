"""Results as data (scripts/results.py): every published results table is the one its committed
rows give; the table's numbers are the rows' means, sample stds and per-seed differences."""
from __future__ import annotations

import csv
import json
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


def fake_run(run: Path, seed: int, epochs: list[tuple[float, float, float]]) -> Path:
    """A finished run directory: per epoch (train FLOPs so far, growth FLOPs so far, test accuracy)."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "lr", "test_acc", "params", "train_flops", "growth_flops", "total_seconds"])
        for i, (train, growth, acc) in enumerate(epochs, 1):
            writer.writerow([i, 0.1 / i, acc, 100 * i, train, growth, 10.0 * i])
    (run / "summary.json").write_text(json.dumps({"status": "completed", "best_test_acc": max(a for *_, a in epochs),
                                                  "growth_seconds": 1.0, "epochs_done": len(epochs),
                                                  "step": 10 * len(epochs)}))
    return run


def test_add_writes_the_curves_and_their_table_reads_the_last_epoch_within_each_compute(tmp_path):
    results = results_module()
    rows = tmp_path / "study" / "runs.csv"
    a = fake_run(tmp_path / "a", 0, [(10e12, 1e12, 0.50), (30e12, 2e12, 0.60), (50e12, 2e12, 0.70)])
    b = fake_run(tmp_path / "b", 1, [(20e12, 0.0, 0.40), (40e12, 0.0, 0.65), (60e12, 0.0, 0.72)])
    for run in (a, b, a):  # adding a run again replaces its rows
        assert results.main(["add", str(rows), "grown", str(run), "--commit", "abc1234"]) == 0
    curves = results.read_rows(rows.with_name("curves.csv"))
    assert [(r["seed"], r["epoch"], float(r["compute"]), float(r["test_acc"])) for r in curves] == [
        ("0", "1", 11e12, 0.50), ("0", "2", 32e12, 0.60), ("0", "3", 52e12, 0.70),
        ("1", "1", 20e12, 0.40), ("1", "2", 40e12, 0.65), ("1", "3", 60e12, 0.72)]
    assert [r["final_test_acc"] for r in results.read_rows(rows)] == ["0.7", "0.72"]
    page = rows.with_name("page.md")
    page.write_text("<!-- curves rows=curves.csv at=15,20,45,60 -->\n<!-- /curves -->\n")
    assert results.tables(tmp_path, check=True) == 1 and results.tables(tmp_path, check=False) == 0
    line = next(ln for ln in page.read_text().splitlines() if ln.startswith("| grown |"))
    # within 15: seed 1 has no epoch yet; 20: 0.50 and 0.40; 45: 0.60 and 0.65; 60: 0.70 and 0.72
    assert line == f"| grown | 2 | — | {100 * (0.50 + 0.40) / 2:.1f} | {100 * (0.60 + 0.65) / 2:.1f} | " \
                   f"{100 * (0.70 + 0.72) / 2:.1f} |"


def test_walltime_block_puts_the_wall_time_beside_the_compute(tmp_path):
    results = results_module()
    rows = tmp_path / "study" / "runs.csv"
    # epochs end at 10, 20, 30 s (fake_run); compute so far: a 11, 32, 52 TFLOPs, b 20, 40, 60
    a = fake_run(tmp_path / "a", 0, [(10e12, 1e12, 0.50), (30e12, 2e12, 0.60), (50e12, 2e12, 0.70)])
    b = fake_run(tmp_path / "b", 1, [(20e12, 0.0, 0.40), (40e12, 0.0, 0.65), (60e12, 0.0, 0.72)])
    assert results.main(["add", str(rows), "grown", str(a), str(b), "--commit", "abc1234"]) == 0
    assert [float(r["seconds"]) for r in results.read_rows(rows.with_name("curves.csv"))] == [10, 20, 30] * 2
    page = rows.with_name("page.md")
    page.write_text("<!-- walltime rows=curves.csv at=15,40,55 -->\n<!-- /walltime -->\n")
    assert results.tables(tmp_path, check=False) == 0 and results.tables(tmp_path, check=True) == 0
    line = next(ln for ln in page.read_text().splitlines() if ln.startswith("| grown |"))
    at_15 = ((10 + 10 * (15 - 11) / (32 - 11)) + 10 * 15 / 20) / 2  # a within its epoch 2, b within its epoch 1
    at_40 = ((20 + 10 * (40 - 32) / (52 - 32)) + 20) / 2
    rate = (52e12 / 30 + 60e12 / 30) / 2 / 1e9
    assert line == f"| grown | 2 | 0,1 | {at_15:.0f} | {at_40:.0f} | — | {rate:.0f} |"  # 55: past a's end
    old = [{k: v for k, v in r.items() if k != "seconds"} for r in results.read_rows(rows.with_name("curves.csv"))]
    results.write_rows(rows.with_name("curves.csv"), results.CURVE_COLUMNS, old)  # rows from before the column
    results.tables(tmp_path, check=False)
    assert not any(ln.startswith("| grown |") for ln in page.read_text().splitlines())


def test_a_second_study_in_the_same_folder_keeps_its_own_curves(tmp_path):
    results = results_module()
    rows = tmp_path / "study" / "runs.csv"
    run = fake_run(tmp_path / "a", 0, [(10e12, 1e12, 0.50), (30e12, 2e12, 0.60)])
    assert results.main(["add", str(rows), "grown", str(run), "--commit", "abc1234"]) == 0
    other = rows.with_name("lever_curves.csv")
    assert results.main(["add", str(rows.with_name("lever.csv")), "lever", str(run), "--commit", "abc1234",
                         "--curves", str(other)]) == 0
    assert {r["arm"] for r in results.read_rows(rows.with_name("curves.csv"))} == {"grown"}
    assert [(r["arm"], r["epoch"]) for r in results.read_rows(other)] == [("lever", "1"), ("lever", "2")]
