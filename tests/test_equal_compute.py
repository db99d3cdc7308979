"""The fixed network at equal compute (growrun/train/budget.py: trainer.budget_from; growrun/report/
equal.py): budgets taken from finished runs and sweeps, kept on resume, refused when they cannot
mean "equal compute"; the report pairing each grown run with its fixed run, the per-seed
differences, the warning when budgets differ, the stars in the accuracy-vs-compute plot."""
from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest
import helpers_zygote as zygote
from helpers_shared import built_once
from omegaconf import OmegaConf

from growrun.errors import GrowrunError
from growrun.train import budget as budget_module

BASE = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=8", "model=mlp",
        "model.hidden=[32,32]", "trainer.batch_size=64", "trainer.threads=1", "trainer.progress=off",
        "trainer.epochs=3", "optim.warmup_epochs=0"]
GROWN = ["model.start_fraction=0.25", "growth.dt=1", "growth.target_fraction=1", "growth.steps=2"]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compute(run: Path) -> float:
    last = rows(run / "metrics.csv")[-1]
    return float(last["train_flops"]) + float(last["growth_flops"])


def final_acc(run: Path) -> float:
    return float(rows(run / "metrics.csv")[-1]["test_acc"])


def per_step(run: Path) -> float:
    return 3 * float(rows(run / "metrics.csv")[-1]["flops_per_image"]) * 64


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """random and zero x seeds 0, 1 (4 grown MLP runs); the fixed network at each seed-0 run's compute
    (trainer.budget_from=<run>, two runs) and at the seed-1 runs' mean (trainer.budget_from=<sweep>)."""
    def build(root: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"} | {"OMP_NUM_THREADS": "1"}

        def growrun(*args):
            proc = zygote.run(args, cwd=root, env=env, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc

        growrun("train", "-m", *BASE, *GROWN, "growth=random,zero", "seed=0,1", f"hydra.sweep.dir={root / 'grown'}")
        # `python -m growrun.train.budget SWEEP --seed 0`, forked from the warm zygote
        listed = zygote.run([str(root / "grown"), "--seed", "0"], cwd=root, env=env, timeout=120,
                            source=zygote.module_source("growrun.train.budget"))
        growrun("train", "-m", *BASE, "growth=none", "seed=0", f"trainer.budget_from={listed.stdout.strip()}",
                f"hydra.sweep.dir={root / 'equal' / 'seed0'}")
        growrun("train", "-m", *BASE, "growth=none", "seed=1", f"trainer.budget_from={root / 'grown'}",
                f"hydra.sweep.dir={root / 'equal' / 'seed1'}")
        report = growrun("report", str(root / "grown"), str(root / "equal"), "--out", str(root / "report"))
        (root / "outputs.json").write_text(json.dumps([listed.stdout.strip(), report.stdout]))

    root = built_once(tmp_path_factory, "equal_compute_study", build)
    return root, *json.loads((root / "outputs.json").read_text())


def test_budgets_come_from_the_run_of_the_same_seed_or_the_sweeps_mean(study):
    root, listed, _ = study
    grown = {(_seed(d), _method(d)): d for d in (root / "grown").iterdir() if (d / "summary.json").exists()}
    assert listed.split(",") == [str(grown[0, "random"].resolve()), str(grown[0, "zero"].resolve())]
    for i, method in enumerate(("random", "zero")):  # a run directory: that run's compute, exactly
        fixed = root / "equal" / "seed0" / str(i)
        record = json.loads((fixed / "budget.json").read_text())
        summary = json.loads((grown[0, method] / "summary.json").read_text())
        assert record["budget_flops"] == summary["train_flops"] + summary["growth_flops"] == compute(grown[0, method])
        assert record["sources"] == [str(grown[0, method].resolve())]
        spent = compute(fixed)
        assert spent <= record["budget_flops"] < spent + per_step(fixed)
        assert float(rows(fixed / "metrics.csv")[-1]["growth_flops"]) == 0
    fixed = root / "equal" / "seed1" / "0"  # a sweep: the mean of its growing runs with seed 1
    record = json.loads((fixed / "budget.json").read_text())
    assert record["budget_flops"] == pytest.approx(statistics.mean([compute(grown[1, "random"]),
                                                                    compute(grown[1, "zero"])]), rel=1e-12)
    assert sorted(record["sources"]) == sorted(str(grown[1, m].resolve()) for m in ("random", "zero"))


def test_report_pairs_each_grown_run_with_its_fixed_run(study):
    root, _, stdout = study
    table = {r["growth"]: r for r in rows(root / "report" / "report.csv")}
    for method in ("random", "zero"):
        grown = {_seed(d): d for d in (root / "grown").iterdir() if (d / "summary.json").exists()
                 and _method(d) == method}
        exact = next(d for d in (root / "equal" / "seed0").iterdir() if (d / "budget.json").exists() and
                     json.loads((d / "budget.json").read_text())["sources"] == [str(grown[0].resolve())])
        expected = {0: final_acc(grown[0]) - final_acc(exact),
                    1: final_acc(grown[1]) - final_acc(root / "equal" / "seed1" / "0")}
        row = table[method]
        got = dict(item.split(":") for item in row["equal_delta_per_seed"].split(";"))
        assert {int(k): float(v) for k, v in got.items()} == pytest.approx(expected, abs=1e-12)
        assert float(row["equal_delta_mean"]) == pytest.approx(statistics.mean(expected.values()), abs=1e-12)
        assert float(row["equal_delta_std"]) == pytest.approx(statistics.stdev(expected.values()), abs=1e-12)
        # the warning names a group exactly when the seed-1 fixed run's compute is off by > 2 % (and a step)
        ratio = compute(root / "equal" / "seed1" / "0") / compute(grown[1])
        off = abs(ratio - 1) > max(0.02, per_step(root / "equal" / "seed1" / "0") / compute(grown[1]))
        warned = [line for line in stdout.splitlines() if line.startswith("warning:") and f"growth={method}" in line]
        assert bool(warned) == off
        if off:
            assert f"{100 * ratio:.1f} % of the grown run's compute" in warned[0]
    # each seed-0 fixed run is grouped under its source's group; the sweep-mean one under the path given
    fixed = {r["trainer.budget_from"]: int(r["n"]) for r in rows(root / "report" / "report.csv")
             if r["method"] == "none"}
    same = "model.start_fraction=0.25, growth.dt=1.0, growth.target_fraction=1.0, growth.steps=2"
    assert fixed == {f"= {same}, growth=random": 1, f"= {same}, growth=zero": 1, str(root / "grown"): 1}
    assert "## Equal compute" in (root / "report" / "report.md").read_text()


def test_the_compute_plot_shows_the_fixed_runs_as_points(study):
    pytest.importorskip("matplotlib")
    from growrun.report.compute import add_compute
    from growrun.report.equal import final_compute
    from growrun.report.plots import acc_vs_compute
    from growrun.report.runs import load_runs
    from growrun.report.table import group_runs

    root = study[0]
    runs = load_runs([root / "grown", root / "equal"])
    add_compute(runs)
    _, groups = group_runs(runs)
    fig = acc_vs_compute(groups)
    points = sorted(tuple(p) for c in fig.axes[0].collections for p in c.get_offsets())
    fixed = [r for r in runs if r.method == "none"]
    assert points == sorted((final_compute(r), 100 * r.metrics[-1]["test_acc"]) for r in fixed)


def test_a_resumed_run_keeps_its_recorded_budget(tmp_path, study):
    root = study[0]
    source = root / "equal" / "seed0" / "0"
    cfg = OmegaConf.create({"seed": 0, "trainer": {"budget_flops": None, "budget_from": str(root / "grown" / "0")}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = budget_module.resolve_budget(cfg, run_dir)
    assert first == json.loads((source / "budget.json").read_text())["budget_flops"]
    cfg.trainer.budget_from = str(tmp_path / "gone")  # the source moved away: the recorded budget holds
    assert budget_module.resolve_budget(cfg, run_dir) == first


@pytest.mark.parametrize("case, words", [
    ("seed", "that run has seed=0, this one seed=1; equal compute compares the same seed: give seed=0"),
    ("incomplete", "that run is incomplete, not completed"),
    ("no_seed", "no completed growing run with seed=7 in that sweep; seeds it has: 0, 1"),
    ("missing", "no such directory"),
])
def test_budget_sources_that_cannot_mean_equal_compute_are_refused(tmp_path, study, case, words):
    root = study[0]
    path, seed = {"seed": (root / "grown" / "0", 1), "no_seed": (root / "grown", 7),
                  "missing": (tmp_path / "nowhere", 0), "incomplete": (tmp_path / "copy", 0)}[case]
    if case == "incomplete":
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(GrowrunError, match="^trainer.budget_from=") as ex:
        budget_module.budget_from(path, seed)
    assert words in str(ex.value) and "\n" not in str(ex.value)


@pytest.mark.parametrize("overrides, words", [
    (["growth=random", *GROWN, "trainer.budget_from=x"],
     "only for a fixed network (growth=none; here growth.method=random)"),
    (["growth=none", "trainer.budget_from=x", "trainer.budget_flops=1e9"], "not with trainer.budget_flops=1e+09"),
])
def test_budget_from_is_refused_with_growth_or_with_a_budget(tmp_path, run_cli, overrides, words):
    proc = run_cli("train", *BASE, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr


def _seed(run: Path) -> int:
    return budget_module.run_seed_method(run)[0]


def _method(run: Path) -> str:
    return budget_module.run_seed_method(run)[1]
