"""`growrun report`: run discovery, grouping by swept keys, statistics over seeds, report.md /
report.csv / PNG outputs, paper references, one-line errors; and one real sweep end to end.

Most tests build run directories by hand with the exact file shapes a real run writes
(test_real_sweep_end_to_end checks those shapes against a real run), so they take milliseconds.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import helpers_zygote as zygote
import yaml

from growrun.cli import main as cli_main
from growrun.growth.growth_log import COLUMNS as GROWTH_COLUMNS
from growrun.report import reference
from growrun.report.cli import report_main
from helpers_report import BASE_CONFIG, METRIC_COLUMNS, _set, make_run

PNGS = ["acc_vs_params.png", "acc_vs_time.png", "acc_vs_compute.png", "widths.png", "psi.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PAPER_TINY = {"dataset.name": "cifar100", "model.width": 1.0, "model.start_fraction": 0.015625,
              "growth.dt": 0.25, "growth.target_fraction": 1.0}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def expected_stats(run_dirs: list[Path]) -> dict[str, tuple[float, float | None]]:
    """Mean and sample std of each reported quantity, computed straight from the runs' CSVs."""
    per_run = {k: [] for k in ("final", "best", "end", "params", "flops", "wall", "share")}
    for d in run_dirs:
        rows = read_csv(d / "metrics.csv")
        total = float(rows[-1]["total_seconds"])
        last_event = max(float(r["epoch"]) for r in read_csv(d / "growth.csv") if int(r["added"]))
        per_run["end"].append(next(float(r["test_acc"]) for r in rows if int(r["epoch"]) >= math.ceil(last_event)))
        per_run["final"].append(float(rows[-1]["test_acc"]))
        per_run["best"].append(max(float(r["test_acc"]) for r in rows))
        per_run["params"].append(float(rows[-1]["params"]))
        per_run["flops"].append(float(rows[-1]["flops_per_image"]))
        per_run["wall"].append(total)
        per_run["share"].append(sum(float(r["growth_seconds"]) for r in rows) / total)
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None) for k, v in per_run.items()}


@pytest.fixture
def sweep(tmp_path):
    """tiny x3 seeds, gradmax x3 seeds (different numbers), one failed run, one without summary.json."""
    root = tmp_path / "sweep"
    accs = {"tiny": [(0.2, 0.55, 0.5), (0.25, 0.6, 0.52), (0.3, 0.5, 0.47)],
            "gradmax": [(0.1, 0.3, 0.35), (0.15, 0.3, 0.3), (0.2, 0.4, 0.38)]}
    dirs = {"tiny": [], "gradmax": []}
    job = 0
    for method in ("tiny", "gradmax"):
        for seed in range(3):
            dirs[method].append(make_run(root / str(job), seed, ["dataset=synthetic", f"growth={method}",
                                                                  f"hydra.run.dir=/x/{job}"],
                                         config={"growth.method": method}, accs=accs[method][seed]))
            job += 1
    make_run(root / "6", 3, ["dataset=synthetic", "growth=tiny"], status="failed", accs=(0.9, 0.99, 0.99),
             error="trainer.batch_size=512: larger than the 256 training images; use at most 256")
    make_run(root / "7", 4, ["dataset=synthetic", "growth=gradmax"], config={"growth.method": "gradmax"},
             status=None, accs=(0.9, 0.99))
    return root, dirs


@pytest.mark.slow
def test_table_means_and_stds_match_the_csvs(sweep, capsys):
    root, dirs = sweep
    assert report_main([str(root)]) == 0
    stdout = capsys.readouterr().out
    rows = {r["growth"]: r for r in read_csv(root / "report.csv")}
    assert set(rows) == {"tiny", "gradmax"}  # grouped by the swept key, seeds averaged
    md = (root / "report.md").read_text()
    for method, run_dirs in dirs.items():
        exp, row = expected_stats(run_dirs), rows[method]
        assert row["n"] == "3" and row["seeds"] == "0;1;2" and row["runs"] == ";".join(d.name for d in run_dirs)
        for name, col in [("final", "final_test_acc"), ("best", "best_test_acc"), ("end", "growth_end_acc"),
                          ("params", "params"),
                          ("flops", "flops_per_image"), ("wall", "wall_seconds"), ("share", "growth_share")]:
            assert float(row[f"{col}_mean"]) == pytest.approx(exp[name][0], rel=1e-12), col
            assert float(row[f"{col}_std"]) == pytest.approx(exp[name][1], rel=1e-12), col
        # report.md (and stdout) show accuracies in percent, mean ± std
        final = f"{100 * exp['final'][0]:.2f} ± {100 * exp['final'][1]:.2f}"
        best = f"{100 * exp['best'][0]:.2f} ± {100 * exp['best'][1]:.2f}"
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {method} |"))
        assert final in line and best in line and final in stdout
    # the failed run and the run without summary.json are listed, not averaged
    missing = md.split("## Missing or failed runs", 1)[1]
    assert "`6`" in missing and "failed" in missing and "batch_size=512" in missing
    assert "`7`" in missing and "incomplete" in missing and "summary.json" in missing
    assert "Runs: 8 found, 6 ok, 2 missing or failed" in md
    assert "hydra.run.dir" not in md and "dataset" not in read_csv(root / "report.csv")[0]


@pytest.mark.slow
def test_several_swept_keys_and_single_seed_groups(tmp_path, capsys):
    root = tmp_path / "sweep"
    job = 0
    for method in ("tiny", "zero"):
        for lr in ("0.05", "0.1"):
            seeds = (0, 1) if lr == "0.1" else (0,)
            for seed in seeds:
                make_run(root / str(job), seed, [f"growth={method}", f"optim.lr={lr}", f"dataset.root=/d{job}"],
                         config={"growth.method": method, "optim.lr": float(lr)}, accs=(0.3, 0.4 + 0.01 * seed))
                job += 1
    assert report_main([str(root)]) == 0
    rows = read_csv(root / "report.csv")
    assert [(r["growth"], r["optim.lr"], r["n"]) for r in rows] == [
        ("tiny", "0.05", "1"), ("tiny", "0.1", "2"), ("zero", "0.05", "1"), ("zero", "0.1", "2")]
    assert "dataset.root" not in rows[0] and "seed" not in rows[0]
    single = rows[0]
    assert single["final_test_acc_std"] == "" and float(single["final_test_acc_mean"]) == 0.4
    md = (root / "report.md").read_text()
    assert "| tiny | 0.05 | tiny | 1 | 0 | 40.00 ± — |" in md
    assert "`growth`, `optim.lr`" in md


@pytest.mark.slow
def test_growth_keys_of_a_fixed_network_are_not_applicable(tmp_path, capsys):
    """A growth=none run's growth.* values do nothing: the table says n/a, not a default dt; the
    plots' labels use the last key component and 4 significant digits."""
    root = tmp_path / "sweep"
    make_run(root / "0", 0, ["growth=tiny", "growth.dt=0.25", "model.start_fraction=0.00390625"],
             config={"growth.dt": 0.25, "model.start_fraction": 0.00390625})
    make_run(root / "1", 0, ["growth=none", "model.start_fraction=1.0"], config={"model.start_fraction": 1.0},
             growth=False)
    assert report_main([str(root)]) == 0
    rows = read_csv(root / "report.csv")
    assert [(r["growth"], r["growth.dt"]) for r in rows] == [("tiny", "0.25"), ("none", "n/a")]
    from growrun.report.table import Group, key_value, swept_keys
    from growrun.report.runs import read_run

    run = read_run(root / "0")
    group = Group({k: key_value(run, k) for k in swept_keys([run, read_run(root / "1")])}, [run])
    assert group.short_label == "growth=tiny, dt=0.25, start_fraction=0.003906"


@pytest.mark.slow
def test_override_value_equals_config_default(tmp_path, capsys):
    """A run that sets optim.lr to its default value groups with runs that don't set it."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_run(a / "0", 0, ["optim.lr=0.10"])
    make_run(b / "0", 1, [])
    assert report_main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    rows = read_csv(tmp_path / "out" / "report.csv")
    assert len(rows) == 1 and rows[0]["n"] == "2" and rows[0]["runs"] == "a/0;b/0"


@pytest.mark.slow
def test_several_sweeps_at_once_and_a_single_run(tmp_path, capsys):
    s1, s2 = tmp_path / "multirun" / "s1", tmp_path / "multirun" / "s2"
    make_run(s1 / "0", 0, ["growth=tiny"])
    make_run(s1 / "1", 1, ["growth=tiny"])
    make_run(s2 / "0", 0, ["growth=random"], config={"growth.method": "random"})
    out = tmp_path / "out"
    assert report_main([str(s1), str(s2), "--out", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    assert [(r["growth"], r["runs"]) for r in rows] == [("tiny", "s1/0;s1/1"), ("random", "s2/0")]
    # a directory of sweeps is searched one level down
    assert report_main([str(tmp_path / "multirun"), "--out", str(tmp_path / "out2")]) == 0
    assert read_csv(tmp_path / "out2" / "report.csv") == rows
    # a single run directory: the report goes into the run directory
    assert report_main([str(s2 / "0")]) == 0
    assert read_csv(s2 / "0" / "report.csv")[0]["n"] == "1"


@pytest.mark.parametrize("damage, reason", [
    ("interrupted", "interrupted"),
    ("no_rows", "metrics.csv has no rows"),
    ("torn_csv", "unreadable metrics.csv"),
    ("short_metrics", "summary.json says 3 epochs"),
    ("no_growth_csv", "growth.csv missing"),
])
@pytest.mark.slow
def test_unusable_runs_are_listed_with_their_reason(tmp_path, damage, reason, capsys):
    root = tmp_path / "sweep"
    make_run(root / "0", 0, ["growth=tiny"])
    bad = make_run(root / "1", 1, ["growth=tiny"], status="interrupted" if damage == "interrupted" else "completed",
                   accs=(0.2, 0.3) if damage == "short_metrics" else (0.2, 0.5, 0.4),
                   epochs=3 if damage == "short_metrics" else None)
    metrics = bad / "metrics.csv"
    if damage == "no_rows":
        metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    elif damage == "torn_csv":
        metrics.write_text(metrics.read_text() + "4,16,0.0\n")
    elif damage == "no_growth_csv":
        (bad / "growth.csv").unlink()
    assert report_main([str(root)]) == 0
    rows = read_csv(root / "report.csv")
    assert len(rows) == 1 and rows[0]["runs"] == "0"
    missing = (root / "report.md").read_text().split("## Missing or failed runs", 1)[1]
    assert "`1`" in missing and reason in missing
    assert f"not included: 1: " in capsys.readouterr().out


@pytest.mark.slow
def test_pngs_are_valid_and_skipped_plots_are_noted(sweep, tmp_path, capsys):
    import matplotlib.pyplot as plt

    root, _ = sweep
    assert report_main([str(root)]) == 0
    for name in PNGS:
        data = (root / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        image = plt.imread(root / name)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.01, name
    assert not list(root.glob(".*.tmp"))
    # without growth there is no growth.csv: the psi plot is skipped, with a note
    fixed = tmp_path / "fixed"
    make_run(fixed / "0", 0, ["growth=none"], growth=False)
    (fixed / "psi.png").write_bytes(PNG_MAGIC)  # left by an earlier report: must not survive
    assert report_main([str(fixed)]) == 0
    assert (fixed / "acc_vs_params.png").is_file() and not (fixed / "psi.png").exists()
    md = (fixed / "report.md").read_text()
    assert "skipped: `psi.png`" in md and "growth.csv" in md


@pytest.mark.slow
def test_paper_column_only_for_the_matching_protocol(tmp_path, capsys):
    root = tmp_path / "sweep"
    make_run(root / "0", 0, ["growth=tiny", "growth.dt=0.25"], config=PAPER_TINY)
    make_run(root / "1", 1, ["growth=tiny", "growth.dt=0.25"], config=PAPER_TINY)
    make_run(root / "2", 0, ["growth=tiny", "growth.dt=1.0"], config={**PAPER_TINY, "growth.dt": 1.0})
    assert report_main([str(root)]) == 0
    md = (root / "report.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| growth.dt"))
    assert "paper (%)" in header
    matched = next(ln for ln in md.splitlines() if ln.startswith("| 0.25 |"))
    other = next(ln for ln in md.splitlines() if ln.startswith("| 1.0 |"))
    assert "69.0 ± 0.1" in matched and "69.0" not in other
    assert "a target not truth" in md and "secondary sources" in md
    rows = {r["growth.dt"]: r for r in read_csv(root / "report.csv")}
    assert float(rows["0.25"]["paper_test_acc"]) == pytest.approx(0.69) and rows["0.25"]["paper_reference"] == "TINY"
    assert rows["1.0"]["paper_test_acc"] == ""
    # no matching group: no paper column at all
    other_root = tmp_path / "plain"
    make_run(other_root / "0", 0, ["growth=tiny"])
    report_main([str(other_root)])
    md = (other_root / "report.md").read_text()
    assert "paper (%)" not in md and "no paper column" in md


def _paper_config(method: str) -> dict:
    cfg = copy.deepcopy(BASE_CONFIG)
    for key, value in PAPER_TINY.items():
        _set(cfg, key, value)
    cfg["growth"]["method"] = method
    if method == "none":
        cfg["model"]["start_fraction"] = None
    return cfg


@pytest.mark.parametrize("method, label", [("tiny", "TINY"), ("gradmax", "GradMax"), ("none", "ResNet18 from scratch")])
def test_reference_matching_rule(method, label):
    cfg = _paper_config(method)
    assert reference.match_one(cfg).label == label
    breaking = {"dataset.name": "cifar10", "model.name": "vgg", "model.width": 0.25, "dataset.train_subset": 1000,
                "model.site_widths": [1] * 8}
    if method != "none":
        breaking |= {"growth.dt": 1.0, "model.start_fraction": 0.03125, "growth.target_fraction": 0.25}
    else:
        breaking |= {"model.start_fraction": 0.5}
    for key, value in breaking.items():
        bad = copy.deepcopy(cfg)
        _set(bad, key, value)
        assert reference.match_one(bad) is None, key
    assert reference.match_reference([cfg, _paper_config("random")]) is None
    assert reference.match_one(_paper_config("random")) is None


@pytest.mark.parametrize("args, words", [
    (["/no/such/dir"], ["/no/such/dir", "no such directory"]),
    (["EMPTY"], ["EMPTY", "no growrun runs found"]),
    (["RUNS", "--colour"], ["--colour", "allowed: --out"]),
    (["RUNS", "RUNS"], ["--out is required"]),
    (["--out"], ["--out needs a directory"]),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, words):
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "runs" / "0", 0, [])
    paths = {"EMPTY": str(tmp_path / "empty"), "RUNS": str(tmp_path / "runs")}
    args = [paths.get(a, a) for a in args]
    words = [paths.get(w, w) for w in words]
    assert cli_main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("growrun: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "runs" / "report.md").exists()


def test_help(capsys):
    assert cli_main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: growrun report DIR [DIR ...] [--out OUT]") and "--out OUT" in out


@pytest.mark.slow
def test_a_crash_leaves_the_previous_report_whole(sweep, monkeypatch, capsys):
    root, _ = sweep
    assert report_main([str(root)]) == 0
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}

    def boom(groups):
        raise RuntimeError("crash while plotting")

    monkeypatch.setattr("growrun.report.plots.build_plots", boom)
    make_run(root / "8", 5, ["dataset=synthetic", "growth=tiny"], config={"growth.method": "tiny"})
    with pytest.raises(RuntimeError):
        report_main([str(root)])
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


# --- end to end: a real 2-run sweep with growth -------------------------------------------------
SWEEP = ["dataset=synthetic", "dataset.train_size=128", "dataset.test_size=64", "dataset.image_size=16", "model=resnet18",
         "model.width=0.0625", "model.start_fraction=0.015625", "growth=tiny", "growth.target_fraction=0.0625",
         "growth.steps=2", "growth.dt=1.0", "growth.samples=64", "growth.stats_batch_size=64",
         "growth.line_search.batch_size=32", "trainer.batch_size=32", "trainer.epochs=3", "trainer.threads=1",
         "trainer.progress=off"]


@pytest.mark.slow
def test_real_sweep_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sweep_dir = tmp_path / "sweep"

    def growrun(*args):
        return zygote.run(args, cwd=tmp_path, env=env, timeout=600)

    train = growrun("train", "-m", *SWEEP, "seed=0,1", f"hydra.sweep.dir={sweep_dir}")
    assert train.returncode == 0, train.stderr[-3000:]
    runs = [sweep_dir / "0", sweep_dir / "1"]
    # the hand-written runs above have the real files' shapes
    assert list(read_csv(runs[0] / "metrics.csv")[0]) == METRIC_COLUMNS
    assert list(read_csv(runs[0] / "growth.csv")[0]) == GROWTH_COLUMNS
    assert yaml.safe_load((runs[0] / ".hydra" / "config.yaml").read_text()).keys() == BASE_CONFIG.keys()

    proc = growrun("report", str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    assert "| all runs | tiny | 2 | 0,1 |" in proc.stdout and f"wrote {sweep_dir / 'report.md'}" in proc.stdout
    (row,) = read_csv(sweep_dir / "report.csv")
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    finals = [s["final"]["test_acc"] for s in summaries]
    assert row["n"] == "2" and float(row["final_test_acc_mean"]) == pytest.approx(statistics.mean(finals), rel=1e-6)
    assert float(row["params_mean"]) == statistics.mean(s["params"] for s in summaries)
    shares = [s["growth_seconds"] / s["total_seconds"] for s in summaries]
    assert float(row["growth_share_mean"]) == pytest.approx(statistics.mean(shares), rel=1e-5)
    for name in PNGS:
        assert (sweep_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert "## Missing or failed runs\n\nnone" in (sweep_dir / "report.md").read_text()
