"""`growrun train` end to end, as a user runs it: subprocesses, real files, real exit codes.
Refusals (bad config, missing data, an existing run) and --cfg / --help run the same
growrun.cli.main in the test's process instead (tests/conftest.py: run_cli), which spares each
call the 2-3 s start-up of a fresh interpreter; tests/test_bad_inputs.py keeps real-process
refusals."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import helpers_zygote as zygote

from growrun.data.fake import write_cifar10
from growrun.train.outputs import load_checkpoint

# A run small enough for a test: 256 synthetic images, a ResNet18 at 1/16 width.
SMALL = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=128", "dataset.image_size=16", "model=resnet18",
         "model.width=0.0625", "trainer.batch_size=64", "trainer.eval_batch_size=128", "trainer.threads=1"]
TIME_COLUMNS = {"epoch_seconds", "growth_seconds", "total_seconds"}


def growrun(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"}
    full_env.update(env or {})
    proc = zygote.run(args, cwd=cwd, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"growrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]


@pytest.mark.slow
def test_train_writes_run_outputs(tmp_path):
    run_dir = tmp_path / "run"
    growrun("train", *SMALL, "trainer.epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    rows = read_csv(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    required = {"epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "params",
                "flops_per_image", "epoch_seconds", "total_seconds"}
    assert required <= set(rows[0])
    assert int(rows[1]["step"]) == 2 * (256 // 64)
    assert float(rows[1]["total_seconds"]) >= float(rows[0]["total_seconds"]) > 0
    assert all(0 <= float(r["test_acc"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    ckpt, _ = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["arch"]["name"] == "resnet18" and ckpt["trainer"]["epoch"] == 2
    assert {"model", "trainer", "rng", "arch"} <= set(ckpt)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert summary["final"]["test_acc"] == pytest.approx(float(rows[1]["test_acc"]), rel=1e-6)
    assert summary["params"] == int(rows[1]["params"]) > 0


@pytest.mark.slow
def test_training_learns_and_is_deterministic(tmp_path):
    """Two identical runs give identical metrics (CPU determinism), and the loss goes down."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        growrun("train", *SMALL, "model=mlp", "model.hidden=[64]", "trainer.epochs=3", "optim.lr=0.05",
                f"hydra.run.dir={d}", cwd=tmp_path)
    rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert without_times(rows_a) == without_times(rows_b)
    assert float(rows_a[-1]["train_loss"]) < float(rows_a[0]["train_loss"])


@pytest.mark.parametrize("override, key", [("optim.lr=-1", "optim.lr"), ("dataset=imagenet", "dataset"),
                                           ("trainer.epochs=abc", "trainer.epochs")])
def test_bad_config_fails_in_one_line_before_writing(tmp_path, run_cli, override, key):
    proc = run_cli("train", *SMALL, override, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("growrun: error:") and key in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_bad_value_inside_a_sweep_is_caught_before_any_run(tmp_path, run_cli):
    proc = run_cli("train", "-m", *SMALL, "seed=0,1", "optim.lr=0.1,-2", cwd=tmp_path)
    assert proc.returncode != 0 and "optim.lr" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_missing_cifar_is_a_one_line_error(tmp_path, run_cli):
    proc = run_cli("train", "dataset=cifar10", f"dataset.root={tmp_path / 'nothing'}", "dataset.download=false",
                   "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar-10-batches-py" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_train_on_official_cifar10_files(tmp_path):
    write_cifar10(tmp_path / "data", n_train=200, n_test=100)
    run_dir = tmp_path / "run"
    growrun("train", "dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "dataset.verify=false",
            "model=mlp", "model.hidden=[32]", "trainer.epochs=1", "trainer.batch_size=50",
            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    rows = read_csv(run_dir / "metrics.csv")
    assert len(rows) == 1 and int(rows[0]["step"]) == 4
    assert int(rows[0]["flops_per_image"]) == 2 * (3072 * 32 + 32 * 10)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path):
    """SIGINT a run after its first checkpoint; `growrun resume` then reproduces the
    uninterrupted run's metrics exactly (cosine schedule, augmentation, CPU)."""
    args = [*SMALL, "dataset.augment=true", "trainer.epochs=4", "dataset.train_size=512"]
    full = tmp_path / "full"
    growrun("train", *args, f"hydra.run.dir={full}", cwd=tmp_path)

    cut = tmp_path / "cut"
    env = {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"}
    proc = zygote.Process(["train", *args, f"hydra.run.dir={cut}"], cwd=tmp_path, env=env, stdout=zygote.DEVNULL,
                          stderr=zygote.PIPE)
    zygote.signal_when(proc, lambda: (cut / "metrics.csv").exists() and len(read_csv(cut / "metrics.csv")) >= 1,
                       signal.SIGINT)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_done"] < 4

    growrun("resume", str(cut), cwd=tmp_path)
    assert without_times(read_csv(cut / "metrics.csv")) == without_times(read_csv(full / "metrics.csv"))
    assert json.loads((cut / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_existing_checkpoint_is_not_overwritten(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    first = run_cli("train", *SMALL, "model=mlp", "model.hidden=[16]", "trainer.epochs=1", f"hydra.run.dir={run_dir}",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    proc = run_cli("train", *SMALL, "model=mlp", "model.hidden=[16]", "trainer.epochs=1",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "resume=true" in proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_directory_and_reports_failures(tmp_path):
    proc = growrun("train", "-m", *SMALL, "model=mlp", "model.hidden=[16]", "trainer.epochs=1",
                   "dataset.train_size=128,100", "trainer.batch_size=120", cwd=tmp_path, check=False)
    # train_size=100 < batch_size=120: that job fails, the other completes, the sweep exits non-zero.
    assert proc.returncode != 0 and "did not complete" in proc.stderr
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1
    statuses = {p.name: json.loads((p / "summary.json").read_text())["status"] for p in sweeps[0].iterdir()
                if (p / ".hydra").is_dir()}
    assert statuses == {"0": "completed", "1": "failed"}


@pytest.mark.slow
def test_simultaneous_runs_never_share_a_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"}
    cmd = ["train", *SMALL, "model=mlp", "model.hidden=[8]", "trainer.epochs=1"]
    procs = [zygote.Process(cmd, cwd=tmp_path, env=env, stdout=zygote.DEVNULL, stderr=zygote.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").is_file() for r in runs)


@pytest.mark.slow
def test_cfg_job_help_and_user_config_dir(tmp_path, run_cli):
    def succeeds(*args, cwd):
        proc = run_cli(*args, cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    conf = tmp_path / "myconf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# @package _global_\noptim:\n  lr: 0.0123\n")
    out = succeeds("train", "--config-dir", str(tmp_path / "myconf"), "+experiment=mine", "--cfg", "job",
                   cwd=tmp_path).stdout
    assert "lr: 0.0123" in out
    assert "Config groups" in succeeds("train", "--help", cwd=tmp_path).stdout
    assert "train" in succeeds("--help", cwd=tmp_path).stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_editable_install_is_quiet_and_finds_the_configs(tmp_path):
    """`make install`'s editable install prints nothing at --quiet (setuptools' simple layout:
    growrun/configs is a symlink to configs/, no package-dir mapping that needs an import hook)."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    # pip from this interpreter, installing into the new venv (its site-packages: --prefix);
    # --ignore-installed: without it pip would first uninstall this venv's own growrun
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed",
                            "--prefix", str(tmp_path / "venv"), "-e", str(repo)], capture_output=True, text=True,
                           timeout=600)
    said = [line for line in (build.stdout + build.stderr).splitlines() if "is ignored" not in line]  # pip's own index notes
    assert build.returncode == 0 and said == [], "\n".join(said)[-3000:]
    proc = subprocess.run([str(python), "-c", "import importlib.resources as r, growrun; "
                           "print(r.files('growrun.configs').joinpath('train.yaml').is_file(), growrun.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", str(repo / "growrun" / "__init__.py")], proc.stdout + proc.stderr


@pytest.mark.slow
def test_regular_install_carries_the_configs(tmp_path):
    """A non-editable install (wheel contents in a plain directory) finds its configs from any cwd."""
    repo = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--target", str(site),
                            str(repo)], check=True, capture_output=True, text=True, timeout=600)
    # every config file ships, and setuptools has nothing to warn about (no "Package would be ignored")
    assert "would be ignored" not in build.stdout + build.stderr
    shipped = {p.relative_to(site / "growrun" / "configs") for p in (site / "growrun" / "configs").rglob("*.yaml")}
    assert shipped == {p.relative_to(repo / "configs") for p in (repo / "configs").rglob("*.yaml")}
    assert {p.name for p in (site / "growrun" / "configs" / "hydra" / "launcher").iterdir()} >= \
        {"parallel.yaml", "slurm.yaml", "slurm_local.yaml"}  # the launcher presets
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import growrun, sys; print(growrun.__file__); from growrun.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "train", "dataset=synthetic", "--cfg", "job"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(site)) and "name: synthetic" in proc.stdout
