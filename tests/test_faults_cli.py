"""`growrun resume` under signals: SIGTERM / SIGINT to the `growrun resume` process must reach the
training it runs in a child process, which must not outlive it (issue 13), and a resumed sweep
stops at the run a signal interrupted. Real subprocesses, real signals (Linux /proc); only the
run or sweep to resume is trained in the test's process (tests/conftest.py: run_cli)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import helpers_zygote as zygote

from helpers_proc import alive, stat

# 256 synthetic images, a 16-unit MLP: an epoch takes a few milliseconds.
TINY = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "model=mlp", "model.hidden=[16]",
        "trainer.batch_size=64", "trainer.eval_batch_size=64", "trainer.threads=1"]
LONG = "trainer.epochs=1000000"  # a resume that runs until it is stopped

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "GROWRUN_UID"} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def trained(run_cli):
    """`growrun train ARGS` (in this process: the run to resume), which must succeed."""
    def train(*args: str, cwd: Path) -> None:
        proc = run_cli("train", *args, cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return train


def children(pid: int) -> list[int]:
    """Live child processes of pid."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def trainers(pid: int) -> list[int]:
    """Live children of pid that run `growrun train` (not a transient helper such as the `uname -p`
    that platform.processor() spawns while the parent starts). Under the test zygote the training
    child is forked, and its command line is the zygote's (helpers_zygote.py)."""
    def training(child: int) -> bool:
        try:
            args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (b"growrun" in args and b"train" in args) or any(a.endswith(b"helpers_zygote.py") for a in args)

    return [c for c in children(pid) if training(c)]


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def epochs_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


class Resume:
    """`growrun resume ARGS` in its own session (so that the test can clean up after it)."""

    def __init__(self, cwd: Path, *args: str):
        self.proc = zygote.Process(["resume", *args], cwd=cwd, env=env(), stdout=zygote.DEVNULL,
                                   stderr=zygote.PIPE, start_new_session=True)
        self.child: int | None = None

    def training_child(self, run_dir: Path, epochs_before: int) -> int:
        """The child process, once it has trained at least one more epoch in run_dir."""
        self.child = wait_for(lambda: next(iter(trainers(self.proc.pid)), None), 120, "the training child")
        wait_for(lambda: epochs_logged(run_dir) > epochs_before or self.proc.poll() is not None, 120,
                 "a resumed epoch")
        assert self.proc.poll() is None, self.proc.stderr.read()
        return self.child

    def cleanup(self) -> None:
        for pid in [self.child] if self.child else trainers(self.proc.pid):  # its own group: not killed with us
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_resume_reaches_the_training_child(tmp_path, trained, signum):
    run_dir = tmp_path / "run"
    trained(*TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    resume = Resume(tmp_path, str(run_dir), LONG)
    try:
        child = resume.training_child(run_dir, epochs_before=1)
        groups = stat(child)[2], stat(resume.proc.pid)[2]
        resume.proc.send_signal(signum)
        code = resume.proc.wait(timeout=60)
        wait_for(lambda: not alive(child), 5, f"the training child {child} to end")
    finally:
        resume.cleanup()
    assert code != 0
    # A terminal's Ctrl-C goes to the whole foreground group: the child must get it once,
    # through the parent, not a second time directly (a second signal means "exit at once").
    assert groups[0] != groups[1], "the child shares the parent's process group"
    stderr = resume.proc.stderr.read()
    assert f"interrupted by {signum.name}" in stderr, stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] != "completed"


def test_resume_of_a_sweep_stops_at_the_interrupted_run(tmp_path, trained):
    trained("-m", *TINY, "trainer.epochs=1", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    runs = [tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]
    for run_dir in runs:  # both unfinished, as after a crash
        (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    resume = Resume(tmp_path, str(tmp_path / "sweep"), LONG)
    try:
        child = resume.training_child(runs[0], epochs_before=1)
        resume.proc.send_signal(signal.SIGTERM)
        code = resume.proc.wait(timeout=60)
        wait_for(lambda: not alive(child), 5, f"the training child {child} to end")
        assert not children(resume.proc.pid)
    finally:
        resume.cleanup()
    stderr = resume.proc.stderr.read()
    assert code != 0
    assert f"resuming {runs[0]}" in stderr and f"resuming {runs[1]}" not in stderr, stderr
    assert "1 more run(s) of the sweep not resumed" in stderr, stderr
    assert json.loads((runs[1] / "summary.json").read_text())["status"] == "interrupted"
