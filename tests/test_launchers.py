"""Sweeps through Hydra's launchers (issue 14): growrun's presets hydra/launcher=parallel (joblib)
and slurm_local (submitit's local mode) complete, re-run without training anything, and finish
only the rest after the whole launcher was killed; SIGUSR2 (submitit's preemption signal) makes
a job checkpoint and be requeued, and the requeued job ends bit-identical to an uninterrupted
run; the sbatch script of hydra/launcher=slurm is checked with a stand-in `sbatch` on PATH.
Real CLI, real subprocesses, CPU; the refusals before anything runs, and the sweep that a
`growrun resume` test starts from, run in the test's process (tests/conftest.py: run_cli)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import helpers_zygote as zygote
import torch
from hydra.errors import MissingConfigException
from helpers_proc import alive

from growrun.config.precheck import _missing_message
from growrun.train.outputs import load_checkpoint

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux signals and /proc")
# the launcher plugins (pyproject's test extra, which `make test` installs)
PLUGIN = {"parallel": "hydra_plugins.hydra_joblib_launcher", "slurm_local": "hydra_plugins.hydra_submitit_launcher",
          "slurm": "hydra_plugins.hydra_submitit_launcher"}

# 256 synthetic images, a 16-unit MLP: an epoch takes a few milliseconds.
TINY = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "model=mlp", "model.hidden=[16]",
        "trainer.batch_size=64", "trainer.eval_batch_size=64", "trainer.progress=off"]
LAUNCHERS = ["parallel", "slurm_local"]


def env(**extra: str) -> dict:
    return {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"} | {"OMP_NUM_THREADS": "1"} | extra


def growrun(*args: str, cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    proc = zygote.run(args, cwd=cwd, env=env(**extra_env), timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start(*args: str, cwd: Path, **extra_env: str) -> subprocess.Popen:
    """`growrun ARGS` in its own process group (the launcher and every job it starts)."""
    return zygote.Process(args, cwd=cwd, env=env(**extra_env), stdout=zygote.DEVNULL, stderr=zygote.PIPE,
                          start_new_session=True)


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def epochs_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "summary.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "incomplete"


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """The files a run trains into."""
    return {p.name: p.read_bytes() for p in [run_dir / "metrics.csv", *(run_dir / "checkpoints").glob("*.pt")]}


def rows(run_dir: Path) -> list[str]:
    """metrics.csv without its time columns."""
    lines = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if "seconds" not in name]
    return [",".join(line[i] for i in keep) for line in lines]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = (load_checkpoint(d / "checkpoints" / "last.pt")[0] for d in (a, b))
    assert sa["trainer"]["step"] == sb["trainer"]["step"] and sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    ma, mb = sa["trainer"]["optimizer"]["state"], sb["trainer"]["optimizer"]["state"]
    assert all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)
    assert rows(a) == rows(b)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_killed_sweep_reruns_only_the_rest(tmp_path, launcher):
    """Job 0 is short, job 1 long (the two run at once); the whole launcher (its process group)
    is SIGKILLed while job 1 trains. The re-run skips job 0 (completed: nothing of it is written
    again), resumes job 1 from its checkpoint, and completes it."""
    pytest.importorskip(PLUGIN[launcher])
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.epochs=2,150", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}"]
    short, long = sweep / "0", sweep / "1"
    proc = start("train", *args, cwd=tmp_path)
    try:
        wait_for(lambda: status(short) == "completed" and epochs_logged(long) >= 3 or proc.poll() is not None,
                 "job 1 to train")
        assert proc.poll() is None, proc.stderr.read()
        trainer = int((long / ".lock").read_text())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # also when the wait failed: no sweep left training
        proc.wait(timeout=60)
    wait_for(lambda: not alive(trainer), "the killed job's process to end", timeout=30)  # gone or a zombie
    assert status(long) == "incomplete" and epochs_logged(long) < 150
    assert all("trainer.threads=1: " in (r / "train.log").read_text() for r in (short, long))  # 2 jobs, 1 thread each
    done = snapshot(short)

    rerun = growrun("train", *args, "resume=true", cwd=tmp_path)
    said = [line for line in rerun.stderr.splitlines() if line.startswith("growrun: job ")]
    assert said == ["growrun: job 0 (trainer.epochs=2): completed, skipped",
                    "growrun: job 1 (trainer.epochs=150): incomplete, resuming from its checkpoint"], rerun.stderr[-3000:]
    assert status(short) == status(long) == "completed" and snapshot(short) == done
    assert "resumed " in (long / "train.log").read_text() and epochs_logged(long) == 150


def test_preemption_signal_checkpoints_requeues_and_resumes_exactly(tmp_path):
    """SIGUSR2 (submitit's preemption / time-limit warning) to a job of hydra/launcher=slurm_local:
    the run finishes its step, writes a checkpoint, says `interrupted`; submitit requeues the
    job, which continues from the checkpoint and ends bit-identical to an uninterrupted run."""
    pytest.importorskip(PLUGIN["slurm_local"])
    # 8x8 images: each of the reference's and the job's 150 epochs writes a 40 kB checkpoint, not 620 kB
    args = [*TINY, "dataset.augment=true", "dataset.image_size=8", "trainer.epochs=150", "seed=3"]
    reference = tmp_path / "reference"
    growrun("train", *args, "trainer.threads=1", f"hydra.run.dir={reference}", cwd=tmp_path)

    sweep = tmp_path / "sweep"
    job = sweep / "0"
    proc = start("train", "-m", *args, "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    try:
        wait_for(lambda: epochs_logged(job) >= 2 or proc.poll() is not None, "the job to train")
        assert proc.poll() is None, proc.stderr.read()
        os.kill(int((job / ".lock").read_text()), signal.SIGUSR2)
        wait_for(lambda: status(job) == "interrupted", "the checkpoint and status interrupted")
        assert (job / "checkpoints" / "last.pt").exists()
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (job / "train.log").read_text()
    assert "SIGUSR2 received" in log and "Requeued job" in log and "job requeued: " in log, log[-3000:]
    assert "resumed " in log and status(job) == "completed"
    assert_same_weights(job, reference)


def test_sbatch_script_for_two_nodes_of_four_gpus(tmp_path):
    """hydra/launcher=slurm with a stand-in `sbatch` (and `srun`) on PATH that records what it is
    given: the job array's script asks for 2 nodes x 4 tasks x 4 GPUs, the time limit, SIGUSR2
    before it, and runs the pickled job through srun."""
    pytest.importorskip(PLUGIN["slurm"])
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" > {record}.args
        cp "$1" {record}.tmp && mv {record}.tmp {record}.sh  # complete once it exists (the test kills us then)
        echo "Submitted batch job 4242"
        """))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
                "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600", "hydra.launcher.signal_delay_s=90",
                "hydra.launcher.partition=gpu", "hydra.launcher.account=lab"]
    proc = start("train", "-m", "+experiment=cifar10_tiny", "dataset=synthetic", "seed=0,1", *launcher,
                 f"hydra.sweep.dir={sweep}", cwd=tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    try:  # the launcher then waits for the jobs (polling sacct): stop it once sbatch was called
        wait_for(lambda: Path(f"{record}.sh").exists() or proc.poll() is not None, "sbatch to be called", 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    script = Path(f"{record}.sh").read_text().splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=600", "--signal=USR2@90",
                 "--array=0-1%2", "--partition=gpu", "--account=lab", "--cpus-per-task=8",
                 "--job-name=growrun-cifar10_tiny"):
        assert f"#SBATCH {flag}" in script, (flag, script)
    assert any(line.startswith("srun ") and "-m submitit.core._submit" in line for line in script), script
    assert (sweep / ".submitit").is_dir() and not list(sweep.glob("[0-9]"))  # nothing ran here


def test_slurm_launcher_needs_slurm_and_plugins_say_how_to_install(tmp_path, run_cli):
    pytest.importorskip(PLUGIN["slurm"])
    proc = run_cli("train", "-m", *TINY, "seed=0,1", "hydra/launcher=slurm", cwd=tmp_path, env={"PATH": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "hydra/launcher=slurm_local" in proc.stderr
    assert not (tmp_path / "outputs").exists()
    missing = MissingConfigException("x", missing_cfg_file="hydra/launcher/joblib")
    assert "pip install hydra-joblib-launcher" in _missing_message(missing)


def test_resume_of_a_sweep_starts_the_jobs_never_started(tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    first = run_cli("train", "-m", *TINY, "trainer.epochs=1", "seed=0,1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (sweep / "1" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    subprocess.run(["rm", "-r", str(sweep / "2")], check=True)  # as if the sweep died before job 2
    said = growrun("resume", str(sweep), cwd=tmp_path).stderr
    assert f"skipping {sweep / '0'} (completed)" in said and f"resuming {sweep / '1'} (interrupted)" in said
    assert f"starting {sweep / '2'} (not started)" in said
    assert [status(sweep / str(i)) for i in range(3)] == ["completed"] * 3
    assert "seed=2" in (sweep / "2" / ".hydra" / "overrides.yaml").read_text()


def test_job_killed_during_hydra_setup_counts_as_never_started(tmp_path, run_cli):
    """A parallel launcher's job killed with its sweep while Hydra wrote .hydra/ (config.yaml
    there, overrides.yaml not yet or still empty): both ways of re-running the sweep start that
    job afresh."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.epochs=1", "seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    first = run_cli("train", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    def kill_job_2_during_setup():
        config = (sweep / "2" / ".hydra" / "config.yaml").read_text()
        subprocess.run(["rm", "-r", str(sweep / "2")], check=True)
        (sweep / "2" / ".hydra").mkdir(parents=True)
        (sweep / "2" / ".hydra" / "config.yaml").write_text(config)

    kill_job_2_during_setup()
    rerun = run_cli("train", *args, "resume=true", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "job 2 (seed=2): not started, starting" in rerun.stderr, rerun.stderr[-3000:]
    kill_job_2_during_setup()
    (sweep / "2" / ".hydra" / "overrides.yaml").touch()  # killed between creating and writing it
    said = growrun("resume", str(sweep), cwd=tmp_path).stderr
    assert f"starting {sweep / '2'} (not started)" in said, said[-3000:]
    assert [status(sweep / str(i)) for i in range(3)] == ["completed"] * 3
    assert "seed=2" in (sweep / "2" / ".hydra" / "overrides.yaml").read_text()


def test_resume_of_a_sweep_killed_while_hydra_wrote_multirun_yaml(tmp_path, run_cli):
    """multirun.yaml is written before any job: a sweep killed then has a truncated one and no
    job; `growrun resume` says so in one line instead of a traceback."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra:\n  run:\n    dir: outp")
    proc = run_cli("resume", str(sweep), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{sweep}: not a growrun run or sweep directory" in proc.stderr


def test_rerun_with_other_values_is_refused_before_anything_runs(tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    first = run_cli("train", "-m", *TINY, "trainer.epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(sweep / "0")
    proc = run_cli("train", "-m", *TINY, "trainer.epochs=1", "seed=5,1", "resume=true", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "job 0 holds a run of other overrides (seed: 0 -> 5)" in proc.stderr
    assert snapshot(sweep / "0") == before and "seed=0" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize("first, second, survives", [("SIGTERM", "SIGUSR2", True), ("SIGUSR2", "SIGTERM", True),
                                                     ("SIGUSR2", "SIGUSR2", False)])
def test_scheduler_signal_pair_still_checkpoints(first, second, survives):
    """SLURM sends SIGTERM and the preemption signal around a preemption: the second of the pair
    does not stop the run at once (it would lose the checkpoint), the reason becomes SIGUSR2
    (requeue); the same signal twice still stops at once."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from growrun.train.safety import StopSignals
        with StopSignals() as s:
            os.kill(os.getpid(), signal.{first})
            time.sleep(0.2)
            os.kill(os.getpid(), signal.{second})
            time.sleep(0.5)
            print(signal.Signals(s.received).name, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if survives:
        assert proc.returncode == 0 and proc.stdout == "SIGUSR2\n", proc.stderr
    else:
        assert proc.returncode == -signal.SIGUSR2 and proc.stdout == ""
