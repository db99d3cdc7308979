"""Compute accounting (metrics.csv train_flops / growth_flops, summary.json) and the report's
accuracy-vs-compute outputs."""
from __future__ import annotations

import csv

import pytest

from helpers_training import compose_cfg

from growrun.models import build_model, count_flops, initial_arch
from growrun.train import run as run_module
from growrun.train.trainer import TRAIN_FLOPS_PER_FORWARD


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_flops_count_every_image_at_the_width_it_was_seen_at(tmp_path):
    """Growth at the last step of epochs 1 and 2 (dt = 1): epoch e trains at the width the
    metrics row of epoch e - 1 reports, so train_flops grows by 3 x that row's flops_per_image x
    256 images per epoch; growth_flops grows at the events only; the summary has the totals."""
    cfg = compose_cfg("growth.dt=1", "trainer.epochs=3")
    summary = run_module.run(cfg, tmp_path)
    rows = _rows(tmp_path / "metrics.csv")
    shape = (3, cfg.dataset.image_size, cfg.dataset.image_size)
    arch = initial_arch(cfg.model, 10, shape)
    start_flops = count_flops(build_model(arch), shape)
    widths_before = [start_flops] + [int(r["flops_per_image"]) for r in rows[:-1]]
    expected, total = [], 0
    for f in widths_before:
        total += TRAIN_FLOPS_PER_FORWARD * f * 256
        expected.append(total)
    assert [int(r["train_flops"]) for r in rows] == expected
    assert widths_before[1] > widths_before[0]  # the model did grow between epochs
    growth = [int(r["growth_flops"]) for r in rows]
    assert 0 < growth[0] < growth[1] and growth[2] == growth[1]  # events after epochs 1 and 2 only
    assert summary["train_flops"] == expected[-1] and summary["growth_flops"] == growth[-1]


def _with_compute(run_dir, per_epoch_train: float, per_epoch_growth: float) -> None:
    """Add cumulative train_flops / growth_flops columns (e x the per-epoch values) to a run."""
    rows = _rows(run_dir / "metrics.csv")
    for r in rows:
        e = int(r["epoch"])
        r["train_flops"], r["growth_flops"] = e * per_epoch_train, e * per_epoch_growth
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.slow
def test_compute_to_reach_the_reference(tmp_path):
    """Reference (fixed) final accuracy 0.7; 95 % of it = 0.665 is reached by the reference at
    epoch 3 (compute 900) and by the grown runs at epochs 3 and 2 (330 and 220: mean 275, ratio
    0.306); 99 % = 0.693 by the reference only."""
    from helpers_report import make_run

    from growrun.report.cli import report_main
    from growrun.report.compute import add_compute, reach_table, reference_group
    from growrun.report.runs import load_runs
    from growrun.report.table import group_runs

    for seed, accs in enumerate([(0.3, 0.6, 0.7), (0.3, 0.5, 0.7)]):
        _with_compute(make_run(tmp_path / "ref" / str(seed), seed, ["growth=none"], growth=False, accs=accs), 300, 0)
    for seed, accs in enumerate([(0.2, 0.5, 0.68), (0.2, 0.67, 0.69)]):
        _with_compute(make_run(tmp_path / "grown" / str(seed), seed, ["growth=tiny"], accs=accs), 100, 10)
    runs = load_runs([tmp_path / "ref", tmp_path / "grown"])
    add_compute(runs)
    _, groups = group_runs(runs)
    ref = reference_group(groups)
    assert ref.methods == ["none"]
    table = reach_table(groups, ref)
    grown = next(g.label for g in groups if g is not ref)
    r95, r99 = table[grown][0.95], table[grown][0.99]
    assert (r95.mean, r95.reached, r95.runs) == (275, 2, 2) and abs(r95.ratio - 275 / 900) < 1e-12
    assert (r99.mean, r99.reached, r99.ratio) == (None, 0, None)
    assert table[ref.label][0.99].ratio == 1.0
    assert report_main([str(tmp_path / "ref"), str(tmp_path / "grown"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Compute" in text and "275 (2/2) | 0.31" in text
    # wall time and training FLOP rate side by side: train_flops / (wall - growth seconds), mean of the runs
    grown_rows = [_rows(tmp_path / "grown" / str(seed) / "metrics.csv") for seed in (0, 1)]
    walls = [float(r[-1]["total_seconds"]) for r in grown_rows]
    rates = [float(r[-1]["train_flops"]) / (float(r[-1]["total_seconds"]) - sum(float(x["growth_seconds"]) for x in r))
             for r in grown_rows]
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {grown} |"))
    assert f"| {sum(walls) / 2:.0f} | {sum(rates) / 2:.3g} |" in line
    assert (tmp_path / "out" / "acc_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
