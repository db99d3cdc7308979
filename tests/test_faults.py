"""Faults a long run meets (issue 13): kills at any moment, torn and unsafe checkpoints, a full
disk, divergence, broken statistics, a second process, a changed config, signals.

The kill tests run the real CLI in subprocesses that SIGKILL themselves at named points
(growrun/faults.py, GROWRUN_KILL_AT) and check that resuming ends bit-identical to the
uninterrupted run."""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import helpers_zygote as zygote
import torch
from helpers_shared import built_once
from helpers_training import compose_cfg

from growrun.errors import Diverged, GrowrunError
from growrun.faults import ENV as KILL_ENV
from growrun.train.events import event as controller
from growrun.train import outputs
from growrun.train import run as run_module
from growrun.train.outputs import FORMAT, CheckpointError, load_checkpoint, read_checkpoint
from growrun.train.safety import RunLock, config_differences

# growth events at steps 4, 6, 8, 10 (4 steps per epoch, dt = 0.5), 3 epochs, 8 sites
GROW = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=16", "model=resnet18",
        "model.width=0.125", "model.start_fraction=0.015625", "growth=tiny", "growth.target_fraction=0.0625",
        "growth.steps=2", "growth.dt=0.5", "growth.samples=128", "growth.stats_batch_size=64",
        "growth.line_search.batch_size=64", "trainer.batch_size=64", "trainer.epochs=3", "trainer.threads=1",
        "trainer.progress=off", "dataset.augment=true", "trainer.checkpoint_every=2"]


def growrun(*args, cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GROWRUN_UID", KILL_ENV)}
    if kill_at:
        env[KILL_ENV] = kill_at
    return zygote.run(args, cwd=cwd, env=env, timeout=600)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")[0]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, optimizer state and logs (time columns aside)."""
    sa, sb = final_state(a), final_state(b)
    assert sa["arch"] == sb["arch"] and sa["trainer"]["step"] == sb["trainer"]["step"]
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    ma, mb = sa["trainer"]["optimizer"]["state"], sb["trainer"]["optimizer"]["state"]
    assert all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)
    assert rows(a / "metrics.csv") == rows(b / "metrics.csv")
    assert rows(a / "growth.csv") == rows(b / "growth.csv")
    assert json.loads((a / "summary.json").read_text())["final"] == json.loads((b / "summary.json").read_text())["final"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run of GROW (tests only read it)."""
    def build(root: Path) -> None:
        proc = growrun("train", *GROW, f"hydra.run.dir={root / 'run'}", cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return built_once(tmp_path_factory, "faults_reference", build) / "run"


def test_killed_anywhere_resumes_bit_identical(tmp_path, reference):
    """One run killed (SIGKILL) mid-epoch, in a growth event's statistics pass and line search,
    while writing a checkpoint, between the two renames of a checkpoint, and with its last.pt
    torn afterwards; each time resumed. It ends bit-identical to the uninterrupted run."""
    cut = tmp_path / "cut"
    resume = ["resume", str(cut)]
    stages = [(["train", *GROW, f"hydra.run.dir={cut}"], "step:3"),  # mid-epoch 1, checkpoint at step 2
              (resume, "stats"),  # growth event 1 (step 4), after the statistics pass
              (resume, "search:2"),  # event 1, second site's line search
              (resume, "write:last.pt"),  # the checkpoint after event 1: temp file written, not renamed
              (resume, "rotate"),  # next checkpoint: last.pt renamed to prev.pt, new one not yet in place
              (resume, "step:3")]  # resumes from prev.pt (last.pt missing), killed 3 steps later
    for args, point in stages:
        proc = growrun(*args, cwd=tmp_path, kill_at=point)
        # the training process died by SIGKILL (`growrun resume` exits with 128 + its signal)
        assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), f"{point}: rc {proc.returncode}\n{proc.stderr[-2000:]}"
    assert not (cut / "summary.json").exists()  # SIGKILL leaves no summary (sweeps call it incomplete)
    last = cut / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn last.pt (machine crash)
    proc = growrun(*resume, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "last.pt: unreadable or torn checkpoint" in said and "using the previous checkpoint" in said
    assert_same_run(cut, reference)


def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, reference):
    """SIGTERM: the run finishes its step, writes a checkpoint, says `interrupted` and exits
    with 128 + 15; `growrun resume` continues from that step, bit-identical."""
    args = [*GROW, "trainer.checkpoint_every=0"]  # a checkpoint only because of the signal
    cut = tmp_path / "cut"
    env = {k: v for k, v in os.environ.items() if k not in ("GROWRUN_UID", KILL_ENV)}
    proc = zygote.Process(["train", *args, f"hydra.run.dir={cut}"], cwd=tmp_path, env=env, stdout=zygote.DEVNULL,
                          stderr=zygote.PIPE)
    _, err = zygote.signal_when(proc, lambda: (cut / "growth.csv").exists() and bool(rows(cut / "growth.csv")),
                                signal.SIGTERM)  # after the first growth event
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "signal 15" in summary["error"]
    assert final_state(cut)["trainer"]["step"] == summary["step"] < 12
    proc = growrun("resume", str(cut), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(cut, reference)


def test_requeue_exit_outside_the_signal_window_leaves_a_resumable_run(tmp_path, monkeypatch):
    """SIGUSR2 just after the training loop (or before it) reaches submitit's own handler, which
    requeues the job and exits (SystemExit): summary.json must say interrupted, so that the
    requeued job resumes (growrun.launch.REQUEUED) instead of refusing the run's checkpoint."""
    real_exit = run_module.StopSignals.__exit__

    def exit_then_requeue(self, *exc):
        real_exit(self, *exc)
        raise SystemExit(3)  # submitit.local's LOCAL_REQUEUE_RETURN_CODE

    monkeypatch.setattr(run_module.StopSignals, "__exit__", exit_then_requeue)
    with pytest.raises(SystemExit):
        run_module.run(compose_cfg("trainer.epochs=1", "growth=none"), tmp_path)
    from growrun.launch import REQUEUED
    assert json.loads((tmp_path / "summary.json").read_text())["status"] in REQUEUED


def test_second_signal_stops_at_once(tmp_path):
    """StopSignals: the first SIGTERM is only recorded, the second ends the process."""
    code = textwrap.dedent("""
        import os, signal, time
        from growrun.train.safety import StopSignals
        with StopSignals() as s:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            assert s.received == signal.SIGTERM
            print("survived the first", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        print("survived the second", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "survived the first\n" and proc.returncode == -signal.SIGTERM


def test_full_disk_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while writing the second epoch's checkpoint: a GrowrunError naming the file and
    the cause, no temporary file left, last.pt still the complete epoch-1 checkpoint."""
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        if not isinstance(f, io.BytesIO):
            calls.append(f)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(outputs.torch, "save", save)
    cfg = compose_cfg("trainer.epochs=3")
    with pytest.raises(GrowrunError, match=r"last\.pt: no space left on the device; free space"):
        run_module.run(cfg, tmp_path)
    ckpt = final_state(tmp_path)
    assert ckpt["trainer"]["epoch"] == 1 and not list((tmp_path / "checkpoints").glob(".*.tmp"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left" in summary["error"]


def test_nonfinite_loss_stops_as_diverged(tmp_path, monkeypatch):
    """A NaN loss at step 6 stops the run naming the step; the epoch-1 checkpoint stays."""
    real_forward, calls = torch.nn.CrossEntropyLoss.forward, [0]

    def forward(self, out, y):
        calls[0] += 1
        loss = real_forward(self, out, y)
        return loss * float("nan") if calls[0] == 6 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
    with pytest.raises(Diverged, match=r"non-finite loss at step 6 \(epoch 2, batch 2\)"):
        run_module.run(compose_cfg("trainer.checkpoint_every=0"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 6" in summary["error"]
    ckpt = final_state(tmp_path)
    assert ckpt["trainer"]["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values()
                                                if t.is_floating_point())


def test_nonfinite_statistics_skip_that_site_only(tmp_path, monkeypatch):
    """NaN in one site's statistics: that site gets no neuron at that event (reason nonfinite),
    the others grow, and training goes on to the end."""
    real, events = controller.collect_statistics, []

    def collect(model, sites, *a, **k):
        stats = real(model, sites, *a, **k)
        events.append(sites[0].name)
        if len(events) == 1:
            stats[sites[0].name].S1[0, 0] = float("nan")
        return stats

    monkeypatch.setattr(controller, "collect_statistics", collect)
    summary = run_module.run(compose_cfg(), tmp_path)
    assert summary["status"] == "completed"
    first = [r for r in rows(tmp_path / "growth.csv") if r["event"] == "1"]
    bad = [r for r in first if r["site"] == events[0]]
    assert [(r["added"], r["reason"]) for r in bad] == [("0", "nonfinite")]
    assert any(int(r["added"]) > 0 for r in first if r["site"] != events[0])


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("wrapped", [False, True])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, wrapped):
    """A pickle that calls os.system when loaded is refused (raw, or as a well-formed growrun
    checkpoint payload) before anything runs."""
    evil = _RunsCode()
    evil.marker = tmp_path / "ran"
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    if wrapped:
        payload = pickle.dumps({"model": evil}, protocol=2)
        torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}, path)
    else:
        torch.save({"model": evil}, path)
    with pytest.raises(CheckpointError, match="refused, it holds objects other than tensors"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):  # no fallback to prev.pt for an unsafe file
        load_checkpoint(path)
    assert not evil.marker.exists()


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A completed in-process run of compose_cfg("trainer.epochs=2"); tests resume copies of it."""
    run_dir = tmp_path_factory.mktemp("two_epochs")
    assert run_module.run(compose_cfg("trainer.epochs=2"), run_dir)["status"] == "completed"
    return run_dir


def test_resume_refuses_a_different_config_and_accepts_a_longer_run(tmp_path, two_epochs):
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    with pytest.raises(GrowrunError, match=r"growth\.method: 'tiny' -> 'random'; optim\.lr: 0\.1 -> 0\.05\)"):
        run_module.run(compose_cfg("trainer.epochs=3", "optim.lr=0.05", "growth=random", "resume=true"), tmp_path)
    summary = run_module.run(compose_cfg("trainer.epochs=3", "resume=true"), tmp_path)
    assert summary["status"] == "completed" and summary["epochs_done"] == 3


def test_config_differences_ignores_run_length_only():
    a = {"trainer": {"epochs": 3, "batch_size": 64}, "optim": {"lr": 0.1}, "resume": False}
    b = {"trainer": {"epochs": 9, "batch_size": 32}, "optim": {"lr": 0.1}, "resume": True, "new": 1}
    assert config_differences(a, b) == ["new: (absent) -> 1", "trainer.batch_size: 64 -> 32"]


def test_a_second_process_cannot_train_in_a_locked_directory(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(GrowrunError, match=f"being trained by another growrun process \\(pid {os.getpid()}\\)"):
            run_module.run(compose_cfg("trainer.epochs=2"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert run_module.run(compose_cfg("trainer.epochs=2"), tmp_path)["status"] == "completed"


def test_checkpoint_of_an_older_growrun_still_resumes(tmp_path, two_epochs):
    """Before the checksummed format, last.pt was the state itself, its numpy RNG state an
    array: it loads (numpy's array types allowed, nothing else) and the run continues."""
    import numpy as np

    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "checkpoints" / "last.pt"
    state, _ = load_checkpoint(path)
    kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    del state["trainer"]["partial"]
    torch.save(state, path)
    (tmp_path / "checkpoints" / "prev.pt").unlink()
    summary = run_module.run(compose_cfg("trainer.epochs=3", "resume=true"), tmp_path)
    assert summary["status"] == "completed" and summary["epochs_done"] == 3


def test_keys_newer_than_the_checkpoint_resume_at_their_default():
    """A checkpoint from before growth.stats / growth.when existed resumes while they keep their
    defaults (the behaviour it was trained with); another value is a difference."""
    a = {"growth": {"method": "tiny"}}
    b = {"growth": {"method": "tiny", "stats": "pass", "when": "schedule"}}
    assert config_differences(a, b) == []
    b["growth"]["stats"] = "training"
    assert config_differences(a, b) == ["growth.stats: (absent) -> 'training'"]
