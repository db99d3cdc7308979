"""Bad inputs and configurations in which nothing can grow (issue 13, item 6): each is one line
`growrun: error: ...` naming the bad value and what is allowed, a non-zero exit, and nothing
half-written. Config faults are caught before Hydra creates the run directory
(growrun.config.precheck); data faults when the run reads its files (summary.json "failed", no
metrics, no checkpoint). Bad values already covered by tests/test_cli.py (negative lr, unknown dataset
option, a non-integer, a bad value inside a sweep, missing CIFAR, an existing checkpoint) are
not repeated here.

The commands run in the test's process (tests/conftest.py: run_cli, the same growrun.cli.main
as `python -m growrun`) to spare each the 2-3 s start-up of a fresh interpreter; three cases
(the two of test_refusals_in_a_real_process, test_damaged_cifar_through_the_cli[runs_code]) run
as a real `python -m growrun` process: its exit status and a stderr of one line, no traceback."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import helpers_zygote as zygote

from growrun.config import store  # noqa: F401  (registers the schema)
from growrun.config.growable import check_growth
from growrun.config.rundir import check_output_dir
from growrun.data.cifar import read_cifar
from growrun.data.fake import py2_pickle, write_cifar10
from growrun.errors import GrowrunError
from growrun.growth.policy import growth_blocker
from helpers_cli import SMALL, compose_cfg, one_line_error

GROWING = ["model=resnet18", "model.width=0.0625", "model.start_fraction=0.015625"]  # after SMALL: grows


def growrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m growrun ARGS` in a fresh process (run_cli: the same in this process)."""
    env = {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"} | {"OMP_NUM_THREADS": "1"}
    return zygote.run(args, cwd=cwd, env=env, timeout=300)


# --- configurations in which nothing can grow ----------------------------------------------------

def gcfg(**kw):
    base = dict(method="tiny", dt=1.0, first_epoch=1.0, last_epoch=None, only=None, target_fraction=1.0,
                target_widths=None, param_budget=0)
    return SimpleNamespace(**{**base, **kw})


START, TARGETS, PER_NEURON = {"a": 2, "b": 4}, {"a": 8, "b": 4}, {"a": 10, "b": 20}


@pytest.mark.parametrize("kw, epochs, spe, start, targets, params, expected", [
    (dict(), 3, 10, START, TARGETS, 1000, None),
    (dict(method="none"), 1, 10, START, START, 1000, None),  # growth=none: any widths, any schedule
    (dict(), 3, 10, START, START, 1000, ["no site can grow", "model.start_fraction", "growth.target_fraction (now 1)"]),
    (dict(only=["b"]), 3, 10, START, {"a": 2, "b": 4}, 1000, ["growth.only=['b']", "start [4], target [4]"]),
    (dict(only=[]), 3, 10, START, START, 1000, ["growth.only=[]: no site to grow; name sites of a, b"]),
    (dict(), 1, 10, START, TARGETS, 1000, ["growth.first_epoch=1", "trainer.epochs=1"]),
    (dict(first_epoch=2.0, dt=100.0), 2, 10, START, TARGETS, 1000, ["growth.first_epoch=2", "trainer.epochs=2"]),
    (dict(first_epoch=2.0, last_epoch=1.0), 5, 10, START, TARGETS, 1000, ["growth.last_epoch=1", "first_epoch=2"]),
    (dict(), 1, None, START, TARGETS, 1000, None),  # steps per epoch unknown: the schedule is not checked
    (dict(first_epoch=0.9), 1, 1, START, TARGETS, 1000, ["trainer.epochs=1: 1 training step(s)"]),
    (dict(first_epoch=0.96), 1, 10, START, TARGETS, 1000, ["growth.first_epoch=0.96", "must be at most 0.9"]),
    (dict(param_budget=1005), 3, 10, START, TARGETS, 1000, ["growth.param_budget=1005", "at least 1010"]),
    (dict(param_budget=1010), 3, 10, START, TARGETS, 1000, None),  # one neuron of site a fits
])
def test_growth_blocker(kw, epochs, spe, start, targets, params, expected):
    message = growth_blocker(gcfg(**kw), epochs, spe, start, targets, params, PER_NEURON)
    if expected is None:
        assert message is None
    else:
        assert message is not None and "\n" not in message
        assert all(part in message for part in expected), message


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "vgg", "resnet18"])
def test_check_growth_accepts_growing_models_and_growth_none(model):
    check_growth(compose_cfg("dataset=synthetic", f"model={model}", "growth=tiny", "model.start_fraction=0.1"))
    check_growth(compose_cfg("dataset=synthetic", f"model={model}", "growth=none"))  # full widths
    for name in ("cifar10_tiny", "cifar10_tiny_zero", "table1_cpu", "table1_full"):
        check_growth(compose_cfg(f"+experiment={name}"))


NO_GROWTH = [
    (["model=resnet18", "growth=tiny"],  # the default model: every site starts at its full width
     ["growth.method=tiny: no site can grow", "model.start_fraction", "growth.target_fraction (now 1)"]),
    ([*GROWING, "growth=tiny", "model.start_fraction=0.5", "growth.target_fraction=0.25"],
     ["model.start_fraction=0.5: above growth.target_fraction=0.25"]),
    ([*GROWING, "growth=zero", "trainer.epochs=1"], ["growth.first_epoch=1: no growth event", "trainer.epochs=1"]),
    ([*GROWING, "growth=tiny", "growth.first_epoch=3", "growth.dt=5"],
     ["growth.first_epoch=3: no growth event", "trainer.epochs=2", "must be at most 1.75"]),
    ([*GROWING, "growth=random", "growth.last_epoch=0.5"], ["growth.last_epoch=0.5: before growth.first_epoch=1"]),
    ([*GROWING, "growth=gradmax", "growth.param_budget=1000"], ["growth.param_budget=1000", "must be at least"]),
    ([*GROWING, "growth=tiny", "growth.only=[layer1.0]", "model.site_widths=[64,0,0,0,0,0,0,0]"],
     ["every site of growth.only=['layer1.0']", "start [64], target [64]"]),
]


@pytest.mark.parametrize("overrides, expected", NO_GROWTH,
                         ids=["full_width", "start_above_target", "epochs", "first_epoch", "last_epoch", "budget",
                              "only"])
def test_nothing_can_grow_fails_up_front(tmp_path, run_cli, overrides, expected):
    proc = run_cli("train", *SMALL, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = one_line_error(proc)
    assert all(part in line for part in expected), line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_growing_config_passes_the_precheck(tmp_path, run_cli):
    proc = run_cli("train", *SMALL, *GROWING, "growth=tiny", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0 and "method: tiny" in proc.stdout, proc.stderr


# --- bad values, keys and groups -----------------------------------------------------------------

BAD_CONFIG = [
    ("trainer.batch_size=0", "trainer.batch_size=0: out of range; must be >= 1"),
    ("growth.dt=0", "growth.dt=0.0: out of range; must be > 0"),
    ("growth.dt=-1", "growth.dt=-1.0: out of range; must be > 0"),
    ("trainer.epoch=3", "trainer.epoch: no such config key; did you mean trainer.epochs?"),
    ("+trainer.epoch=3", "trainer.epoch: no such config key; did you mean trainer.epochs?"),  # was ignored
    ("++optim.lrr=0.1", "optim.lrr: no such config key; did you mean optim.lr?"),  # was ignored
    ("grwth=tiny", "grwth: no such config key; did you mean growth?"),
    ("growth=tinyy", "growth=tinyy: no such config; available in growth/: firefly, gradmax, net2net, none, random, splitting, tiny"),
    ("model.site_widths=[4,4]", "model.site_widths=[4, 4]: needs 1 widths >= 0, one per site (fc1)"),  # was late
    ("growth.target_widths=[4,4]", "growth.target_widths=[4, 4]: needs 1 widths, one per site (fc1)"),
    ("growth.only=[fc9]", "growth.only=['fc9']: no such site; sites are fc1"),
]


@pytest.mark.parametrize("override, expected", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_bad_config_is_one_line_before_anything_is_written(tmp_path, run_cli, override, expected):
    grow = ["growth=tiny", "model.start_fraction=0.25"] if override.startswith(("growth.only", "growth.target")) else []
    proc = run_cli("train", *SMALL, *grow, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert expected in one_line_error(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, expected", [NO_GROWTH[0], ([BAD_CONFIG[3][0]], [BAD_CONFIG[3][1]])],
                         ids=["nothing_can_grow", "unknown_key"])
@pytest.mark.slow
def test_refusals_in_a_real_process(tmp_path, overrides, expected):
    """Two of the refusals above as a user meets them, in a fresh `python -m growrun`: exit status
    2 and one line on stderr (no traceback, no warning), nothing written."""
    proc = growrun("train", *SMALL, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = one_line_error(proc)
    assert all(part in line for part in expected), line
    assert not (tmp_path / "run").exists()


# --- output directories --------------------------------------------------------------------------

@pytest.mark.slow
def test_run_directory_under_a_file_is_one_line(tmp_path, run_cli):
    afile = tmp_path / "afile"
    afile.write_text("")
    for flags in ([f"hydra.run.dir={afile / 'run'}"], ["-m", f"hydra.sweep.dir={afile / 'sw'}"]):
        line = one_line_error(run_cli("train", *flags, *SMALL, cwd=tmp_path))
        assert f"{afile} is a file, not a directory" in line, line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_directory_is_one_line(tmp_path, run_cli):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        line = one_line_error(run_cli("train", *SMALL, f"hydra.run.dir={parent / 'run'}", cwd=tmp_path))
    finally:
        parent.chmod(0o700)
    assert f"cannot write into {parent} (permission denied)" in line
    assert not (parent / "run").exists()


def test_unwritable_output_directory_check(tmp_path, monkeypatch):
    """The permission check itself, also where the tests run as root."""
    cfg = compose_cfg(f"hydra.run.dir={tmp_path / 'ro' / 'run'}", hydra_node=True)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    with pytest.raises(GrowrunError, match=r"hydra.run.dir=.*: cannot write into .*ro \(permission denied\)"):
        check_output_dir(cfg, multirun=False)


@pytest.mark.slow
def test_run_directory_of_another_run_is_refused_and_left_alone(tmp_path, run_cli):
    """Hydra used to write the new command's .hydra/ over the old run's before the run refused
    to start: `growrun resume` would then have continued the old run with the new config."""
    run_dir = tmp_path / "run"
    assert run_cli("train", *SMALL, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = run_cli("train", *SMALL, "optim.lr=0.5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert {p: p.read_bytes() for p in before} == before
    line = one_line_error(proc)
    assert f"hydra.run.dir={run_dir}: already holds a run (status completed); add resume=true" in line


@pytest.mark.slow
def test_sweep_directory_of_another_sweep_is_refused(tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    assert run_cli("train", "-m", *SMALL, "trainer.epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path).returncode == 0
    overrides = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    proc = run_cli("train", "-m", *SMALL, "seed=2,3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert (sweep / "0" / ".hydra" / "overrides.yaml").read_text() == overrides  # was overwritten, and exit 0
    line = one_line_error(proc)
    assert f"hydra.sweep.dir={sweep}: already holds a sweep (2 runs); `growrun resume {sweep}`" in line


# --- data files ----------------------------------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _corrupt(folder: Path, kind: str) -> str:
    """Damage one file of a fake cifar-10-batches-py; the part of the message that names it."""
    if kind == "truncated":
        data = (folder / "data_batch_3").read_bytes()
        (folder / "data_batch_3").write_bytes(data[: len(data) // 2])
        return "data_batch_3: not a readable CIFAR-10 batch (UnpicklingError: pickle data was truncated)"
    if kind == "empty":
        (folder / "test_batch").write_bytes(b"")
        return "test_batch: not a readable CIFAR-10 batch (EOFError"
    if kind == "not_a_dict":
        (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
        return "data_batch_1: not a readable CIFAR-10 batch"
    if kind == "missing_key":
        (folder / "data_batch_1").write_bytes(py2_pickle({"data": np.zeros((20, 3072), np.uint8)}))
        return "data_batch_1: not a readable CIFAR-10 batch (KeyError: 'labels')"
    if kind == "wrong_shape":
        (folder / "data_batch_2").write_bytes(py2_pickle({"labels": [1] * 20, "data": np.zeros((20, 3000), np.uint8)}))
        return "data_batch_2: expected 'data' of shape (N, 3072) and N labels, got (20, 3000) and (20,)"
    if kind == "labels_out_of_range":
        (folder / "data_batch_2").write_bytes(py2_pickle({"labels": [1] * 19 + [10],
                                                          "data": np.zeros((20, 3072), np.uint8)}))
        return "data_batch_2: labels outside 0..9"
    if kind == "runs_code":
        (folder / "data_batch_4").write_bytes(pickle.dumps({"data": _Boom(), "labels": []}, protocol=2))
        return "data_batch_4: not a readable CIFAR-10 batch (UnpicklingError: refused posix.system"
    if kind == "missing_file":
        (folder / "data_batch_5").unlink()
        return "CIFAR-10 not found: expected"
    raise ValueError(kind)


DATA_FAULTS = ["truncated", "empty", "not_a_dict", "missing_key", "wrong_shape", "labels_out_of_range", "runs_code",
               "missing_file"]


@pytest.mark.parametrize("kind", DATA_FAULTS)
def test_damaged_cifar_files_are_one_line(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = _corrupt(write_cifar10(tmp_path / "data", n_train=100, n_test=20).folder, kind)
    with pytest.raises(GrowrunError) as e:
        read_cifar("cifar10", tmp_path / "data", download=False, verify=False)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind, in_process", [("truncated", True), ("runs_code", False)])
def test_damaged_cifar_through_the_cli(tmp_path, run_cli, kind, in_process):
    """The run reads its files after Hydra created its directory: one line, status failed, no
    metrics or checkpoint. runs_code in a real process (the exit status of a failed run)."""
    expected = _corrupt(write_cifar10(tmp_path / "data", n_train=100, n_test=20).folder, kind)
    run_dir = tmp_path / "run"
    cli = run_cli if in_process else growrun
    proc = cli("train", "dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "dataset.verify=false",
               "dataset.download=false", "model=mlp", "model.hidden=[8]", "trainer.epochs=1",
               "trainer.batch_size=20", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert expected in one_line_error(proc)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert not any((run_dir / name).exists() for name in ("metrics.csv", "checkpoints", "growth.csv"))
    assert not (tmp_path / "pwned").exists()

