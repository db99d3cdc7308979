"""Helpers of scripts/gpu_check.py: the report (PASS / FAIL / SKIP lines), launching growrun runs
as subprocesses (several at a time, one progress line per run started) and reading a run's
outputs (summary.json, metrics.csv, growth.csv, checkpoints/last.pt). Comparing runs, the GPU vs
CPU solve of TINY proposals and the machine record: gpu_check_measure.py. No check lives here.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Started as a growrun run, but this process sends itself SIGTERM right after its N-th optimizer
# step (growrun.faults' step hook, GPU_CHECK_SIGTERM_AT=N): a real signal through growrun's own
# handler, at a step the check chooses, so the kill can never miss the run's end on a fast GPU.
SIGTERM_BOOT = """
import os, signal, sys
from pathlib import Path
import growrun
from growrun import faults
at, seen, reach = int(os.environ["GPU_CHECK_SIGTERM_AT"]), [0], faults.reach
def hook(point):
    if point == "step":
        seen[0] += 1
        if seen[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
    reach(point)
faults.reach = hook
sys.argv = [str(Path(growrun.__file__).parent / "__main__.py"), *sys.argv[1:]]
from growrun.cli import main
sys.exit(main(sys.argv[1:]))
"""


class CheckFailed(Exception):
    """A check's property does not hold; the message says what differed (one line)."""


# ------------------------------------------------------------------------------------ the report
@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    text: str
    details: dict = field(default_factory=dict)


class Report:
    """Prints one line per result, `STATUS name: text`, as it is added; keeps them for the JSON."""

    def __init__(self, out=None):
        self.results: list[Result] = []
        self.out, self.t0 = out, time.time()
        self.lock = threading.Lock()

    def add(self, name: str, status: str, text: str, **details) -> Result:
        text = " ".join(str(text).split())  # one line, whatever the message held
        result = Result(name, status, text, details)
        self.results.append(result)
        self.say(f"{status} {name}: {text}")
        return result

    def skip(self, name: str, why: str = "no CUDA device") -> Result:
        return self.add(name, "SKIP", why)

    def say(self, line: str) -> None:
        with self.lock:
            print(line, file=self.out or sys.stdout, flush=True)

    def progress(self, line: str) -> None:
        self.say(f"[{time.time() - self.t0:5.0f}s] {line}")

    @contextmanager
    def check(self, name: str, **details):
        """Run a check's body: CheckFailed or any other exception becomes one FAIL line. The body
        reports its PASS itself (with its numbers) through the yielded dict's "pass" entry."""
        outcome: dict = {"details": details}
        try:
            yield outcome
        except CheckFailed as ex:
            self.add(name, "FAIL", str(ex), **outcome["details"])
        except Exception as ex:  # a crash of the check itself is a failure too, never a silent pass
            self.add(name, "FAIL", f"{type(ex).__name__}: {ex}", **outcome["details"])
        else:
            if "pass" not in outcome:
                self.add(name, "FAIL", "the check ended without a result", **outcome["details"])
            else:
                self.add(name, "PASS", outcome["pass"], **outcome["details"])

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == "FAIL"]

    def counts(self) -> dict:
        return {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """One growrun command (train, or resume of a directory) and what came of it."""
    label: str
    args: list[str]
    run_dir: Path
    env: dict = field(default_factory=dict)
    command: str = "train"  # train | resume | sigterm (train, signalling itself, see SIGTERM_BOOT)
    returncode: int | None = None
    seconds: float = 0.0
    log: Path | None = None
    ended: dict = field(default_factory=dict)  # status and checkpoint step right after it ended


    def argv(self) -> list[str]:
        if self.command == "resume":
            return [sys.executable, "-m", "growrun", "resume", str(self.run_dir), *self.args]
        rest = ["train", *self.args, f"hydra.run.dir={self.run_dir}"]
        if self.command == "sigterm":
            return [sys.executable, "-c", SIGTERM_BOOT, *rest]
        return [sys.executable, "-m", "growrun", *rest]

    def last_error(self) -> str:
        """The last non-empty line of the run's output (growrun's one-line error, a traceback's end)."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, AttributeError):
            return "(no log)"
        return (lines[-1] if lines else "(empty log)")[:300]


def nondeterministic_ops(runs) -> list[str]:
    """The ops torch warned about in these runs' logs (trainer.deterministic=true sets
    use_deterministic_algorithms(warn_only=True): an op without a deterministic kernel only warns)."""
    found = []
    for run in runs:
        try:
            text = run.log.read_text(errors="replace")
        except (OSError, AttributeError):
            continue
        found += [m.strip() for m in re.findall(r"([\w.:]+) does not have a deterministic implementation", text)]
    return sorted(set(found))


class Launcher:
    """Starts runs as subprocesses in `root` (their own process group each), `jobs` at a time."""

    popen = staticmethod(subprocess.Popen)  # how a run's process starts (the test suite forks warm ones)

    def __init__(self, root: Path, report: Report, jobs: int, timeout: float):
        self.root, self.report, self.jobs, self.timeout = root, report, jobs, timeout
        self.live: set[subprocess.Popen] = set()
        self.stopped = False  # interrupted (Ctrl-C): start nothing more
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, run: Run) -> Run:
        if self.stopped:
            return run
        env = {k: v for k, v in os.environ.items() if k not in ("GROWRUN_UID", "GROWRUN_KILL_AT")} | run.env
        run.log = self.root / "logs" / (run.label.replace("/", "_") + ".log")
        what = " ".join(a for a in run.args if a.startswith(("growth=", "device=", "trainer.precision")))
        self.report.progress(f"start {run.label}: {run.command} {what}".rstrip())
        t0 = time.time()
        with open(run.log, "a") as log:
            proc = self.popen(run.argv(), cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
            self.live.add(proc)
            try:
                run.returncode = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.kill(proc)
                run.returncode = proc.wait()
                log.write(f"\ngpu_check: killed after the {self.timeout:.0f} s time limit\n")
            finally:
                self.live.discard(proc)
        run.seconds = time.time() - t0
        s = summary(run.run_dir)  # before a resume of the same directory changes them
        run.ended = {"status": s.get("status") if s else None, "step": None}
        try:
            run.ended["step"] = final_state(run.run_dir)["trainer"]["step"]
        except Exception:  # no (usable) checkpoint: the check says so
            pass
        return run

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the run's own process group (the run and its children, nothing else)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def run_all(self, tasks) -> list:
        """Call each task (a function of this launcher, which may run several runs in turn)
        `jobs` at a time; their return values, in order. Interrupted (Ctrl-C): the runs going on
        are killed, no other starts."""
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = [pool.submit(task, self) for task in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            self.stopped = True
            for proc in list(self.live):
                self.kill(proc)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------ outputs
def summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def csv_rows(path: Path, timing: bool = False) -> list[dict]:
    """The rows of a CSV log; without the columns that hold seconds unless timing=True."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if timing or "seconds" not in k} for r in csv.DictReader(f)]


def final_state(run_dir: Path) -> dict:
    from growrun.train.outputs import load_checkpoint  # the path only: its device argument is gone

    loaded = load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")
    if loaded is None:
        raise CheckFailed(f"{run_dir}: no checkpoints/last.pt")
    return loaded[0]


def completed_run(run: Run) -> dict:
    """summary.json of a run that must have completed with finite final losses (else CheckFailed)."""
    s = summary(run.run_dir)
    if run.returncode != 0 or s is None or s.get("status") != "completed":
        status = s.get("status") if s else "no summary.json"
        raise CheckFailed(f"{run.label}: exit {run.returncode}, status {status}: {run.last_error()}")
    losses = {k: v for k, v in s.get("final", {}).items() if k.endswith("_loss")}
    require(bool(losses), f"{run.label}: summary.json has no final loss")
    bad = {k: v for k, v in losses.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    require(not bad, f"{run.label}: non-finite final losses {bad}")
    return s


def added(run_dir: Path) -> tuple[int, int, int]:
    """(growth.csv rows, rows with added > 0, neurons added in all)."""
    rows = csv_rows(Path(run_dir) / "growth.csv")
    counts = [int(r["added"]) for r in rows]
    return len(rows), sum(c > 0 for c in counts), sum(counts)


def throughput(run_dir: Path, batch_size: int) -> dict:
    """Training images per second (images of the optimizer steps / (epoch seconds - growth
    seconds); epoch seconds include the evaluation) over the whole run and its last epoch, and
    the growth share of the wall time (summary.json: growth_seconds / total_seconds)."""
    rows = csv_rows(Path(run_dir) / "metrics.csv", timing=True)
    require(bool(rows), f"{run_dir}: metrics.csv has no rows")
    per_epoch, step = [], 0
    for r in rows:
        images = (int(r["step"]) - step) * batch_size
        step = int(r["step"])
        per_epoch.append((images, float(r["epoch_seconds"]) - float(r["growth_seconds"])))
    s = summary(run_dir) or {}
    total, grown = s.get("total_seconds") or 0.0, s.get("growth_seconds") or 0.0
    return {"images_per_s": sum(i for i, _ in per_epoch) / max(sum(t for _, t in per_epoch), 1e-9),
            "last_epoch_images_per_s": per_epoch[-1][0] / max(per_epoch[-1][1], 1e-9),
            "growth_share": grown / total if total else None, "total_seconds": total, "growth_seconds": grown,
            "epochs": len(rows), "steps": step}
