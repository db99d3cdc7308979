"""Data-parallel growth (growrun/train/distributed.py): 2 CPU processes (gloo) against one process
over the same global batches, and a rank that dies. The ranks are forked from the test zygote
with torchrun's environment (tests/helpers_ranks.py); the dead rank runs under torchrun itself,
whose agent reports it and stops the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import helpers_ranks as ranks
import helpers_zygote as zygote
from helpers_shared import built_once
import torch
from helpers_cli import read_csv

from growrun.train.outputs import load_checkpoint

# an MLP without BatchNorm (BatchNorm normalises per rank), 8x8 images; growth events at steps
# 4 and 6 (dt = 0.5 epoch of 4 global batches of 64)
ARGS = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=8",
        "dataset.augment=true", "model=mlp", "model.hidden=[32,32]", "model.batchnorm=false",
        "model.start_fraction=0.125", "growth=tiny", "growth.steps=2", "growth.dt=0.5", "growth.samples=128",
        "growth.stats_batch_size=64", "growth.line_search.batch_size=64", "trainer.batch_size=64",
        "trainer.epochs=2", "trainer.threads=1", "trainer.progress=off"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GROWRUN_UID", "GROWRUN_KILL_AT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(*args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=2 -m growrun train ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "growrun", "train", *args]


def final(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")[0]


def one_process(root: Path, *extra: str) -> Path:
    proc = zygote.run(["train", *ARGS, *extra, f"hydra.run.dir={root / 'run'}"], cwd=root, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The one-process run of ARGS (tests only read it)."""
    return built_once(tmp_path_factory, "distributed_single", one_process) / "run"


def assert_two_ranks_grow_like(single: Path, run_dir: Path, *extra: str) -> None:
    """Two ranks (run into run_dir): same growth decisions (growth.csv up to `added`) and widths;
    weights equal to float32 rounding; only rank 0 wrote."""
    proc = ranks.run(["train", *ARGS, *extra, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    a, b = final(run_dir), final(single)
    assert a["arch"] == b["arch"] and a["arch"]["hidden"] != [4, 4]  # grown, to the same widths
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    grew = [line.split(",")[:8] for line in (run_dir / "growth.csv").read_text().splitlines()]
    assert grew == [line.split(",")[:8] for line in (single / "growth.csv").read_text().splitlines()]
    assert len(grew) == 1 + 2 * 2  # header + 2 events x 2 sites, written once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["widths"] == json.loads(
        (single / "summary.json").read_text())["widths"]


def test_two_ranks_grow_like_one_process_and_only_rank_0_logs(tmp_path, single):
    assert_two_ranks_grow_like(single, tmp_path / "two", "logger=tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((tmp_path / "two" / "tensorboard").glob("*tfevents*"))
    assert len(files) == 1, files  # one writer
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("metrics/test_acc")]
    assert steps == [int(row["step"]) for row in read_csv(tmp_path / "two" / "metrics.csv")]  # each epoch once


def test_splitting_grows_alike_on_two_ranks(tmp_path):
    """splitting reduces its own statistics across ranks: S_i and the kernel width's std(z) of
    each batch (firefly's reduced training: tests/test_firefly.py, ranks as threads)."""
    assert_two_ranks_grow_like(one_process(tmp_path, "growth=splitting"), tmp_path / "two", "growth=splitting")


def test_a_dead_rank_stops_the_run_and_it_resumes(tmp_path, single):
    """SIGKILL rank 1 after the first checkpoint: torchrun's launch fails, naming the lost rank;
    the same command with resume=true (its two ranks) finishes the run, with the widths of the
    uninterrupted one."""
    run_dir = tmp_path / "two"
    args = [*ARGS, f"hydra.run.dir={run_dir}", "trainer.checkpoint_every=2"]
    proc = subprocess.Popen(torchrun(*args), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before a rank could be killed"
        time.sleep(0.05)
    rank1 = _rank_pid(proc.pid, rank=1)
    os.kill(rank1, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rank 1" in out or "local_rank: 1" in out, out[-3000:]
    again = ranks.run(["train", *args, "resume=true"], cwd=tmp_path, env=_env())  # the ranks torchrun would start
    assert again.returncode == 0, again.stdout[-3000:]
    assert final(run_dir)["arch"] == final(single)["arch"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the worker process with RANK=rank below the torchrun launcher."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and f"TORCHELASTIC_AGENT_PID={launcher}".encode() in env:
                return int(pid)
            if f"RANK={rank}".encode() in env and b"GROUP_RANK=0" in env and _descends(int(pid), launcher):
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process under {launcher}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def test_two_ranks_resume_inside_a_training_statistics_window(tmp_path):
    """growth.stats=training on 2 ranks, killed in the event of step 6 after the checkpoint of
    step 5, which holds the window's first batch: each rank's partial sums were saved and each
    rank resumes its own (before, every rank resumed rank 0's, and the event grew other
    neurons). The resumed run is the uninterrupted one: growth.csv and weights equal."""
    extra = ["growth.stats=training", "trainer.checkpoint_every=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    for run_dir, env in ((full, {}), (cut, {"GROWRUN_KILL_AT": "stats:2"})):
        proc = ranks.run(["train", *ARGS, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={**_env(), **env})
        assert (proc.returncode == 0) == (run_dir == full), proc.stdout[-3000:]
    window = final(cut)["trainer"]["growth"]["window"]
    assert final(cut)["trainer"]["step"] == 5 and [r["fc1"]["batches"] for r in window["ranks"]] == [1, 1]
    again = ranks.run(["train", *ARGS, *extra, "resume=true", f"hydra.run.dir={cut}"], cwd=tmp_path, env=_env())
    assert again.returncode == 0, again.stdout[-3000:]
    a, b = final(full), final(cut)
    assert a["arch"] == b["arch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    def rows(run_dir):
        lines = (run_dir / "growth.csv").read_text().splitlines()
        keep = [i for i, c in enumerate(lines[0].split(",")) if "seconds" not in c]
        return [[line.split(",")[i] for i in keep] for line in lines]

    assert rows(cut) == rows(full) and len(rows(full)) == 1 + 2 * 2
