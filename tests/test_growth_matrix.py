"""Every growth option end to end: a pairwise (all-pairs) selection of model kind x growth
method x growth.neurons x growth.sites x apply_dw x bn_init x normalize x dt x param_budget x extra_epochs
x rel_eps, each run through the CLI entry point (growrun.cli.main, in process) on tiny
synthetic data (64 images: the default growth draws of 1024 + 512 images shrink to fit) for a
few growth events. Every run must complete and log consistent rows: widths that add up in
growth.csv and match metrics.csv, a reason for every site that got fewer neurons than
requested, and insertions that keep what the method promises (the same loss for gradmax and
zero, the line search's loss for the others)."""
from __future__ import annotations

import itertools
import json

import pytest

from helpers_allpairs import all_pairs, covered_pairs
from helpers_cli import cli, read_csv
from helpers_matrix import (COMBOS, FACTORS, FUNCTION_PRESERVING, INCOMPATIBLE, MODELS, budget, check_growth_rows,
                            compatible, overrides)

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("restore_torch_threads")]


def combo_id(combo: dict) -> str:
    return "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in combo.items())


@pytest.mark.slow
def test_pairwise_selection_covers_every_compatible_pair():
    product = [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]
    assert covered_pairs(COMBOS) == covered_pairs([c for c in product if compatible(c)])
    assert all(compatible(c) for c in COMBOS) and all_pairs(FACTORS, compatible) == COMBOS  # deterministic
    for model in MODELS:  # every option value runs at least once on every model kind
        for key, values in list(FACTORS.items())[1:]:
            assert {c[key] for c in COMBOS if c["model"] == model} == set(values), (model, key)
    assert len(COMBOS) < 0.01 * len(product)


@pytest.mark.slow
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_option_matrix_runs_end_to_end(tmp_path, combo):
    run_dir = tmp_path / "run"
    assert cli("train", *overrides(combo), f"hydra.run.dir={run_dir}") == 0
    spec = MODELS[combo["model"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics, rows = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "growth.csv")
    assert summary["status"] == "completed" and len(metrics) == summary["epochs"]
    assert rows, "no growth event ran"
    check_growth_rows(rows, combo["growth"], spec.start_widths())
    check_metric_widths(metrics, rows, spec.start_widths())
    if combo["growth.param_budget"] == "half":
        assert int(metrics[-1]["params"]) <= budget(spec)
    uncut = combo["growth.neurons"] != "adaptive" and combo["growth.param_budget"] == "none" \
        and combo["growth.rel_eps"] == 1e-7
    if combo["growth"] in FUNCTION_PRESERVING and uncut:  # no line search, no cut: neurons must come
        assert sum(int(r["added"]) for r in rows) > 0, "a function-preserving method added nothing"


def check_metric_widths(metrics: list[dict], rows: list[dict], start: dict) -> None:
    """The widths in metrics.csv after every epoch are the widths after the last growth event
    before that epoch's end; the final parameter count is the last event's."""
    for m in metrics:
        widths = dict(start)
        for r in rows:
            if int(r["step"]) <= int(m["step"]):
                widths[r["site"]] = int(r["width_after"])
        assert {n: int(m[f"width:{n}"]) for n in start} == widths, m["epoch"]
    assert int(metrics[-1]["params"]) == int(rows[-1]["params_after"])


@pytest.mark.parametrize("bad", INCOMPATIBLE, ids=combo_id)
def test_incompatible_options_fail_up_front(tmp_path, capsys, bad):
    combo = dict(COMBOS[0])
    combo.update(bad)
    assert cli("train", *overrides(combo), f"hydra.run.dir={tmp_path / 'run'}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("growrun: error:"), lines
    assert all(("growth.method" if key == "growth" else key) in lines[0] for key in bad), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "vgg"])
@pytest.mark.parametrize("method", ["tiny", "tiny_noproj"])
def test_apply_dw_inserts_what_the_line_search_evaluated(tmp_path, model, method):
    """growth.apply_dw=true on the conv models: neurons are inserted, and the loss after
    insertion (neurons + gamma^2 dW2* on the existing columns) is the line search's."""
    combo = {**COMBOS[0], "model": model, "growth": method, "growth.neurons": "fixed", "growth.sites": "all",
             "growth.apply_dw": True, "growth.param_budget": "none", "growth.extra_epochs": None,
             "growth.rel_eps": 1e-7}
    assert cli("train", *overrides(combo), f"hydra.run.dir={tmp_path}") == 0
    rows = read_csv(tmp_path / "growth.csv")
    check_growth_rows(rows, method, MODELS[model].start_widths())
    grown = [r for r in rows if int(r["added"])]
    assert grown and all(float(r["loss_candidate"]) < float(r["loss_before"]) for r in grown)


@pytest.mark.slow
def test_too_small_training_set_fails_up_front(tmp_path, capsys):
    """3 training images cannot hold a statistics draw and a line-search batch of 2 each."""
    args = [*overrides(COMBOS[0]), "dataset.train_size=3", "trainer.batch_size=3", f"hydra.run.dir={tmp_path}"]
    assert cli("train", *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "growth needs at least 4 training images" in lines[0], lines
    assert not (tmp_path / "growth.csv").exists() and not (tmp_path / "metrics.csv").exists()
