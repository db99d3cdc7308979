"""hparams_search=tiny_table1_cpu (configs/hparams_search/): an Optuna search whose trials are
growrun runs, objective optimized_metric from each trial's summary.json, through a launcher; and
its refusals (no -m, a validation objective without a validation split)."""
from __future__ import annotations

import json
import os

import helpers_zygote as zygote
import pytest
import yaml
from helpers_cli import one_line_error

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

# 1,280 synthetic 8x8 images (256 held out for validation), an MLP grown by TINY, 3 epochs
SMALL = ["dataset=synthetic", "dataset.train_size=1280", "dataset.val_size=256", "dataset.test_size=64",
         "dataset.image_size=8", "model=mlp", "model.hidden=[32,32]", "model.start_fraction=0.125", "growth=tiny",
         "growth.steps=2", "growth.stats_batch_size=64", "growth.line_search.batch_size=64", "trainer.batch_size=64",
         "trainer.epochs=3", "trainer.progress=off"]
SPACE = {"growth.line_search.max_gamma": (1.0, 1000.0), "growth.samples": {256, 512, 1024},
         "growth.normalize": {"fan_in", "none"}, "growth.dt": {0.25, 0.5}}


@pytest.mark.slow
def test_a_three_trial_search_through_the_parallel_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"} | {"OMP_NUM_THREADS": "1"}
    proc = zygote.run(["train", "-m", "hparams_search=tiny_table1_cpu", *SMALL, "hydra.sweeper.n_trials=3",
                       "hydra/launcher=parallel", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep}"],
                      cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {}
    for run in sorted(p for p in sweep.iterdir() if p.is_dir()):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed"
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
        params = {k: yaml.safe_load(overrides[k]) for k in SPACE}
        lo, hi = SPACE["growth.line_search.max_gamma"]
        assert lo <= params["growth.line_search.max_gamma"] <= hi
        assert all(params[k] in SPACE[k] for k in SPACE if k != "growth.line_search.max_gamma"), params
        trials[run.name] = (summary["final"]["val_acc"], params, summary["final"]["test_acc"])
    assert sorted(trials) == ["0", "1", "2"]
    assert "trainer.threads=1: " in (sweep / "0" / "train.log").read_text()  # the parallel launcher's share
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(trials.values(), key=lambda t: t[0])
    assert result["best_value"] == best[0]  # the validation accuracy, not the test accuracy
    assert result["best_params"] == best[1]


def test_a_search_without_m_is_refused(tmp_path, run_cli):
    proc = run_cli("train", "hparams_search=tiny_table1_cpu", *SMALL, f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert one_line_error(proc) == ("growrun: error: hparams_search: a search is a sweep of trials; add -m "
                                    "(growrun train -m hparams_search=...)")
    assert not (tmp_path / "run").exists()


def test_a_validation_objective_needs_a_validation_split(tmp_path, run_cli):
    proc = run_cli("train", "-m", "hparams_search=tiny_table1_cpu", *SMALL, "dataset.val_size=0",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert one_line_error(proc).startswith("growrun: error: optimized_metric=final.val_acc: needs a validation split")
    assert not (tmp_path / "sweep").exists()
