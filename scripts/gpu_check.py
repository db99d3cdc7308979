#!/usr/bin/env python3
"""`make gpu-check`: prove a growrun run end to end on this machine's GPU (or, without one, as far
as a CPU can), in real `python -m growrun train` subprocesses on synthetic data.

    python scripts/gpu_check.py [--quick] [--out PATH] [--keep DIR] [--jobs N] [--device auto|cpu|cuda]
    python scripts/gpu_check.py --compare RUN_A RUN_B      # two run dirs' final weights and growth.csv

Every check prints `PASS <check>: <numbers>`, `FAIL <check>: <what differed>` or, for a part that
needs CUDA on a machine without it, `SKIP <check>: no CUDA device`; the exit status is 1 if any
check failed. What each check proves:

  machine     what ran the checks: GPU model(s), CUDA / cuDNN / torch versions, torch's TF32
              settings (cuda.matmul.allow_tf32, cudnn.allow_tf32, fp32_precision where torch has it)
              and growrun.machine.describe() (CPU, cores, torch build).
  methods/M   every growth method's preset of the registry (growrun.growth.methods.presets(): tiny,
              tiny_full, tiny_noproj, gradmax, random, zero, net2net, firefly, splitting) and growth=none
              train and grow on the device: status completed, finite final losses, and growth.csv
              rows with added > 0 (none: no growth row). CUDA only: bf16 for tiny and net2net
              (function preserving), growth.stats=training, growth.solve_device=cpu and =auto.
  resume/...  a growing run (tiny) stopped by SIGTERM after the first growth event (it signals
              itself right after step N, see gpu_check_lib.SIGTERM_BOOT) and resumed with
              `growrun resume DIR`, and one SIGKILLed inside the second growth event
              (GROWRUN_KILL_AT=stats:2) and resumed with `resume=true`, end with the uninterrupted
              run's architecture, step, weights (checkpoints/last.pt) and growth.csv rows, bit for
              bit (CPU; CUDA with trainer.deterministic=true). CUDA only: the same with
              trainer.deterministic=false, the max abs weight difference reported, not required 0.
  proposal    CUDA only: TINY proposals solved on the GPU (growth.solve_device=model) equal those of
              the same statistics solved in float64 on the CPU (lambdas, per-neuron fan-out x fan-in
              products, first-order gain) to 1e-8 relative on a float64 ResNet18, and on a float32
              one (its neurons to float32 rounding, 1e-5).
  throughput  training images/s (metrics.csv: images of the steps / (epoch - growth seconds)) and
              growth share (summary.json: growth / total seconds) of a growing run; CUDA: with
              trainer.deterministic=true and =false. Written with the machine and every result to
              bench/gpu_check.json (CUDA) or bench/gpu_check.cpu.local.json (CPU, git-ignored).
  ddp         2+ GPUs only: a torchrun --nproc_per_node=2 growing run completes, and one SIGTERMed
              after its first growth event completes when the same command is re-run with resume=true.

--quick runs tiny and none only (and takes throughput from the tiny run): the test suite's CPU check.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check_lib import (
    REPO, Launcher, Report, Run, added, completed_run, csv_rows, nondeterministic_ops, require, summary, throughput,
)
from gpu_check_measure import compare_runs, machine, proposal_difference

# CPU: ResNet18 at 1/8 width, hidden widths grown from 1/64 to 1/16 of ResNet18's in 2 visits per
# site, 16x16 images, 4 steps per epoch, growth events every half epoch from the end of epoch 1
# (steps 4, 6; a run: ~10 s, most of it start-up). CUDA: 1/4 width grown from 1/64 to 1/4, 32x32
# images, 16 steps per epoch (events at 16, 24). The resume checks (and methods/tiny, their
# reference) train 3 epochs with 3 visits per site (events at 4, 6, 8, 10; CUDA 16, 24, 32, 40);
# throughput and DDP use twice the images.
PROFILES = {
    "cpu": dict(train=256, test=64, image=16, width=0.125, target=0.0625, samples=128, stats_bs=64, search_bs=64,
                batch=64, epochs=2),
    "cuda": dict(train=2048, test=512, image=32, width=0.25, target=0.25, samples=512, stats_bs=256, search_bs=256,
                 batch=128, epochs=2),
}


def registry_methods() -> tuple[list[str], str]:
    from growrun.growth import methods

    return methods.presets(), "the method registry's presets"


def train_args(p: dict, method: str, device: str, threads: int, *extra: str) -> list[str]:
    args = ["dataset=synthetic", f"dataset.train_size={p['train']}", f"dataset.test_size={p['test']}",
            f"dataset.image_size={p['image']}", "dataset.augment=true", "model=resnet18", f"model.width={p['width']}",
            "model.start_fraction=0.015625", f"trainer.batch_size={p['batch']}", f"trainer.eval_batch_size={p['test']}",
            f"trainer.epochs={p['epochs']}", "trainer.progress=off", f"device={device}", f"growth={method}"]
    if method != "none":
        args += [f"growth.target_fraction={p['target']}", f"growth.steps={p.get('steps', 2)}", "growth.dt=0.5",
                 f"growth.samples={p['samples']}", f"growth.stats_batch_size={p['stats_bs']}",
                 f"growth.line_search.batch_size={p['search_bs']}"]
    if threads:
        args.append(f"trainer.threads={threads}")
    return args + list(extra)


class Checker:
    def __init__(self, opts, report: Report, root: Path):
        import torch

        self.opts, self.report, self.root = opts, report, root
        self.cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
        self.device = "cuda" if self.cuda else "cpu"
        self.gpus = torch.cuda.device_count() if self.cuda else 0
        self.no_cuda = "no CUDA device" if not torch.cuda.is_available() else "--device cpu"  # the SKIP lines' reason
        self.p = PROFILES[self.device]
        self.steps_per_epoch = self.p["train"] // self.p["batch"]
        self.threads = 1 if not self.cuda and opts.jobs > 1 else 0  # 2 jobs x 1 thread on 2 cores
        self.env = {"OMP_NUM_THREADS": "1"} if self.threads == 1 else {}  # of `growrun resume` runs
        self.launcher = Launcher(root, report, opts.jobs, opts.timeout)
        self.record: dict = {"device": self.device, "quick": opts.quick, "profile": self.p, "checks": []}

    def run(self, label: str, method: str, *extra: str, command: str = "train", env: dict | None = None,
            profile: dict | None = None, threads: int | None = None) -> Run:
        threads = self.threads if threads is None else threads
        args = train_args(profile or self.p, method, self.device, threads, *extra)
        base = {"OMP_NUM_THREADS": "1"} if threads == 1 else {}
        run_dir = self.root / re.sub(r"[^\w./-]", "_", label)  # '=' in hydra.run.dir would not parse
        return Run(label, args, run_dir, env=base | (env or {}), command=command)

    # ---------------------------------------------------------------------------- 1. machine
    def machine(self) -> None:
        with self.report.check("machine") as out:
            info = machine()
            self.record["machine"] = info
            tf = info["tf32"]
            tf32 = (f"TF32 matmul {tf['cuda.matmul.allow_tf32']} / cuDNN {tf['cudnn.allow_tf32']}"
                    + (f" (fp32_precision {tf['cuda.matmul.fp32_precision']})" if tf["cuda.matmul.fp32_precision"] else ""))
            gpus = ", ".join(f"{g['name']} ({g['capability']}, {g['memory_gib']} GiB)" for g in info["gpus"])
            where = (f"{len(info['gpus'])} GPU: {gpus}, CUDA {info['cuda_runtime']}, cuDNN {info['cudnn']}, "
                     f"driver {info.get('driver')}" if self.cuda else f"no CUDA device (torch CUDA build {info['cuda_runtime']})")
            out["pass"] = f"{where}; torch {info['torch']}; {tf32}; CPU {info['cpu']}, {info['cores']} cores"

    # ---------------------------------------------------------------------------- 2.-3. training runs
    def runs(self) -> None:
        """Every run of the methods and resume checks, `jobs` at a time, then their checks."""
        methods, source = registry_methods()
        if self.opts.quick:
            methods = ["tiny"]
        det = "trainer.deterministic=true"
        # methods/tiny is also the resume checks' reference: a checkpoint every step; growth events
        # at the ends of epochs 1, 1.5, 2, 2.5 (--quick: 1, 1.5), so 1-3 of them come after the kill
        resume_args = ("trainer.checkpoint_every=1", det)
        rp = dict(self.p, steps=3, epochs=3) if not self.opts.quick else self.p
        runs = {m: self.run(f"methods/{m}", m, *(resume_args if m == "tiny" else ()), profile=rp if m == "tiny" else None)
                for m in [*methods, "none"]}
        if self.cuda:
            for label, method, extra in [("tiny+bf16", "tiny", "trainer.precision=bf16"),
                                         ("net2net+bf16", "net2net", "trainer.precision=bf16"),
                                         ("tiny+stats=training", "tiny", "growth.stats=training"),
                                         ("tiny+solve_device=cpu", "tiny", "growth.solve_device=cpu"),
                                         ("tiny+solve_device=auto", "tiny", "growth.solve_device=auto")]:
                runs[label] = self.run(f"methods/{label}", method, extra)
        spe = self.steps_per_epoch
        term = {"GPU_CHECK_SIGTERM_AT": str(spe + 1)}  # right after the step after growth event 1
        killed = self.run("resume/sigterm", "tiny", *resume_args, command="sigterm", env=term, profile=rp)
        chains = {"sigterm": [killed, Run("resume/sigterm.resumed", [], killed.run_dir, self.env, "resume")]}
        killed = self.run("resume/sigkill", "tiny", *resume_args, env={"GROWRUN_KILL_AT": "stats:2"}, profile=rp)
        chains["sigkill"] = [killed, Run("resume/sigkill.resumed", [*killed.args, "resume=true"], killed.run_dir,
                                         self.env)]
        if self.cuda:  # non-deterministic kernels: its own reference, the difference reported
            nd = ("trainer.checkpoint_every=1", "trainer.deterministic=false")
            killed = self.run("resume/nondet", "tiny", *nd, command="sigterm", env=term, profile=rp)
            chains["nondet"] = [self.run("resume/nondet.reference", "tiny", *nd, profile=rp), killed,
                                Run("resume/nondet.resumed", [], killed.run_dir, self.env, "resume")]

        def chain(runs_in_turn):  # one after the other (a resume needs its killed run)
            return lambda launcher: [launcher.run(r) for r in runs_in_turn]

        tasks = [chain(c) for c in chains.values()] + [lambda la, r=r: la.run(r) for r in runs.values()]
        self.launcher.run_all(tasks)
        self.methods(runs, source)
        self.resume(chains, runs["tiny"], spe)
        self.tiny = runs["tiny"]

    def methods(self, runs: dict, source: str) -> None:
        for label, r in runs.items():
            with self.report.check(f"methods/{label}", run_dir=str(r.run_dir), seconds=round(r.seconds, 1)) as out:
                s = completed_run(r)
                rows, grew, neurons = added(r.run_dir)
                if label == "none":
                    require(rows == 0, f"growth=none logged {rows} growth.csv rows")
                    grown = "no growth (no growth.csv rows)"
                else:  # every method adds neurons on this data (checked per method; see the module doc)
                    require(rows > 0 and grew > 0, f"growth.csv: {rows} rows, none with added > 0")
                    grown = f"+{neurons} neurons in {grew} of {rows} site visits"
                losses = ", ".join(f"{k} {v:.4f}" for k, v in s["final"].items() if k.endswith("_loss"))
                out["pass"] = (f"completed; {losses}; {grown}; "
                               f"{s['params']} params; {r.seconds:.0f} s")
                out["details"].update(final=s["final"], added=neurons, params=s["params"])
        if not self.cuda:
            self.report.skip("methods/cuda", self.no_cuda)  # bf16, growth.stats=training, growth.solve_device=cpu|auto
        self.record["methods_source"] = source

    def resume(self, chains: dict, reference: Run, spe: int) -> None:
        for name, (killed, resumed) in [("sigterm", chains["sigterm"]), ("sigkill", chains["sigkill"])]:
            with self.report.check(f"resume/{name}", run_dir=str(killed.run_dir)) as out:
                completed_run(reference)
                status, step = killed.ended.get("status"), killed.ended.get("step")
                if name == "sigterm":
                    require(killed.returncode == 128 + signal.SIGTERM and status == "interrupted",
                            f"SIGTERM after step {spe + 1}: exit {killed.returncode}, status {status}, "
                            f"expected {128 + signal.SIGTERM} and interrupted: {killed.last_error()}")
                    require(step == spe + 1, f"SIGTERM after step {spe + 1}: its checkpoint is at step {step}")
                    how = f"SIGTERM after step {step} (exit 143, interrupted), `growrun resume DIR`"
                else:
                    require(killed.returncode == -signal.SIGKILL and status is None and step is not None,
                            f"GROWRUN_KILL_AT=stats:2: exit {killed.returncode} (expected -9), summary status "
                            f"{status} (expected none), checkpoint step {step}: {killed.last_error()}")
                    how = f"SIGKILL in growth event 2 (last checkpoint step {step}), `train ... resume=true`"
                completed_run(resumed)
                later = sorted({int(r["step"]) for r in csv_rows(killed.run_dir / "growth.csv") if int(r["step"]) > step})
                require(bool(later), f"no growth event after the kill at step {step}: the check grows nothing resumed")
                diff = compare_runs(killed.run_dir, reference.run_dir)
                out["details"].update(max_abs=diff["max_abs"], problems=diff["problems"])
                ops = nondeterministic_ops([reference, killed, resumed])
                require(diff["equal"], "not bit-identical to the uninterrupted run: " + "; ".join(diff["problems"][:3])
                        + (f" (torch warned: no deterministic kernel for {', '.join(ops)})" if ops else ""))
                events = f"event at step {later[0]}" if len(later) == 1 else \
                    f"events at steps {', '.join(map(str, later))}"
                out["pass"] = (f"{how}: bit-identical to the uninterrupted run ({diff['tensors']} tensors, "
                               f"{diff['elements']} values, {diff['growth_rows']} growth.csv rows; growth {events} "
                               f"in the resumed span)")
        if "nondet" not in chains:
            self.report.skip("resume/nondeterministic", self.no_cuda)
            return
        reference, killed, resumed = chains["nondet"]
        with self.report.check("resume/nondeterministic", run_dir=str(killed.run_dir)) as out:
            completed_run(reference)
            require(killed.returncode == 128 + signal.SIGTERM, f"SIGTERM: exit {killed.returncode}: {killed.last_error()}")
            completed_run(resumed)
            diff = compare_runs(killed.run_dir, reference.run_dir)
            out["details"].update(max_abs=diff["max_abs"], problems=diff["problems"])
            same_arch = not any(p.startswith("architectures differ") for p in diff["problems"])
            out["pass"] = ("trainer.deterministic=false, SIGTERM + `growrun resume`: completed; " +
                           ("bit-identical" if diff["equal"] else
                            f"max abs weight difference {diff['max_abs']:.3g}" if same_arch else
                            "growth decisions differ (other widths)") + " vs the uninterrupted run (not required equal)")

    # ---------------------------------------------------------------------------- 4. proposal
    def proposal(self) -> None:
        if not self.cuda:
            self.report.skip("proposal", self.no_cuda)
            return
        import torch

        for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-5)):
            name = f"proposal/{str(dtype).split('.')[1]}"
            with self.report.check(name) as out:
                worst = proposal_difference(torch.device(self.device), dtype)
                out["details"].update(worst)
                require(worst["compared"] > 0, "no site proposed a neuron: nothing was compared")
                bad = {k: worst[k] for k in ("lambdas", "neurons", "first_order")
                       if not worst[k] <= (tol if k == "neurons" else 1e-8)}
                require(not bad, f"GPU vs CPU float64 solve: relative differences {bad} (limits: lambdas, "
                                 f"first-order 1e-8, neurons {tol:g})")
                out["pass"] = (f"TINY, {worst['compared']} neurons of {worst['sites']} ResNet18 sites: GPU vs CPU "
                               f"solve of the same statistics, largest relative differences "
                               f"lambdas {worst['lambdas']:.2g}, neurons {worst['neurons']:.2g}, first-order "
                               f"{worst['first_order']:.2g}")

    # ---------------------------------------------------------------------------- 5. throughput
    def throughput(self) -> None:
        if self.cuda:
            p = dict(self.p, train=2 * self.p["train"], epochs=3)
            variants = [(name, self.run(name, "tiny", f"trainer.deterministic={d}", profile=p), p)
                        for name, d in (("throughput", "true"), ("throughput/nondeterministic", "false"))]
        elif self.opts.quick:  # the tiny run of the methods check (two runs at a time, a checkpoint per step)
            variants = [("throughput", self.tiny, self.p)]
        else:
            p = dict(self.p, train=2 * self.p["train"])  # alone, on every core
            variants = [("throughput", self.run("throughput/tiny", "tiny", threads=0, profile=p), p)]
        for name, r, p in variants:
            with self.report.check(name, run_dir=str(r.run_dir)) as out:
                if r.returncode is None:
                    self.launcher.run(r)  # alone: nothing else runs meanwhile
                completed_run(r)
                t = throughput(r.run_dir, p["batch"])
                out["details"].update(t)
                out["pass"] = (f"{t['images_per_s']:.0f} img/s training ({t['last_epoch_images_per_s']:.0f} in the "
                               f"last epoch), growth {100 * t['growth_share']:.1f} % of {t['total_seconds']:.1f} s "
                               f"({p['train']} images {p['image']}x{p['image']}, ResNet18 width {p['width']}, "
                               f"{t['steps']} steps{'' if r is not self.tiny else ', shared cores'}"
                               f"{', ' + det[0] if (det := [a for a in r.args if 'deterministic' in a]) else ''})")
        if not self.cuda:
            self.report.skip("throughput/nondeterministic", self.no_cuda)

    # ---------------------------------------------------------------------------- 6. ddp
    def ddp(self) -> None:
        if self.gpus < 2:
            self.report.skip("ddp", self.no_cuda if not self.cuda else f"needs 2 CUDA devices, found {self.gpus}")
            return
        p = dict(self.p, train=2 * self.p["train"], epochs=4)
        args = train_args(p, "tiny", "cuda", 0)
        for name in ("ddp", "ddp/sigterm"):
            with self.report.check(name) as out:
                run_dir = self.root / name
                out["pass"] = torchrun_check(self, args, run_dir, kill=name.endswith("sigterm"))


def torchrun_check(checker: Checker, args: list[str], run_dir: Path, kill: bool) -> str:
    """A 2-rank torchrun run into run_dir; kill: SIGTERM to the launcher once the first growth event
    is logged, then the same command with resume=true. Both must end completed, grown."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "growrun", "train", *args, f"hydra.run.dir={run_dir}"]
    label = str(run_dir.relative_to(checker.root))
    log = checker.root / "logs" / (label.replace("/", "_") + ".log")
    env = {k: v for k, v in os.environ.items() if k not in ("GROWRUN_UID", "GROWRUN_KILL_AT")}
    proc, note, timeout = None, "", checker.opts.timeout

    def start(extra: list[str]) -> subprocess.Popen:
        checker.report.progress(f"start {label}: torchrun --nproc_per_node=2 growth=tiny {' '.join(extra)}".rstrip())
        return subprocess.Popen(command + extra, cwd=checker.root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: the launcher and its ranks

    with open(log, "a") as f:
        try:
            proc = start([])
            if kill:
                deadline = time.time() + timeout
                while not csv_rows(run_dir / "growth.csv") and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.05)
                require(proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be signalled")
                proc.send_signal(signal.SIGTERM)  # as scancel would: torchrun passes it to its ranks
                code = proc.wait(timeout=timeout)
                require(code != 0, "SIGTERM to torchrun: exit 0, the run was not interrupted")
                s = summary(run_dir) or {}
                note = f"SIGTERM to torchrun, stopped at step {s.get('step')} (exit {code}, {s.get('status')}), resume=true: "
                proc = start(["resume=true"])
            code = proc.wait(timeout=timeout)
        finally:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    s = summary(run_dir) or {}
    require(code == 0 and s.get("status") == "completed", f"torchrun exit {code}, status {s.get('status')}; see {log}")
    rows, grew, neurons = added(run_dir)
    require(grew > 0, f"growth.csv: {rows} rows, none with added > 0")
    return f"{note}2 ranks completed, +{neurons} neurons in {grew} site visits, widths {list(s['widths'].values())}"


def compare_main(a: Path, b: Path) -> int:
    """--compare: one PASS / FAIL line for two run dirs (weights, architecture, step, growth.csv)."""
    report = Report()
    with report.check("compare") as out:
        diff = compare_runs(a, b)
        require(diff["equal"], "; ".join(diff["problems"][:3]))
        out["pass"] = f"bit-identical: {diff['tensors']} tensors, {diff['elements']} values, {diff['growth_rows']} growth.csv rows"
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny and none only, throughput from the tiny run")
    ap.add_argument("--out", type=Path, help="the JSON record (default bench/gpu_check.json on CUDA, "
                                             "bench/gpu_check.cpu.local.json on CPU)")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory, removed)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"))
    opts = ap.parse_args(argv)
    if opts.compare:
        return compare_main(*opts.compare)
    t0 = time.time()
    root = opts.keep.resolve() if opts.keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report = Report()
    checker = Checker(opts, report, root)
    out = opts.out or REPO / "bench" / ("gpu_check.json" if checker.cuda else "gpu_check.cpu.local.json")
    try:
        report.say(f"gpu-check on {checker.device}{' (--quick)' if opts.quick else ''}: runs in {root}")
        for phase in (checker.machine, checker.runs, checker.proposal, checker.throughput, checker.ddp):
            try:
                phase()
            except Exception as ex:  # a crash outside a check's own guard: a failure, and the rest goes on
                report.add(phase.__name__, "FAIL", f"{type(ex).__name__}: {ex}")
        record = dict(checker.record, wall_seconds=round(time.time() - t0, 1), command=sys.argv,
                      counts=report.counts(), checks=[vars(r) for r in report.results])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    c = report.counts()
    failed = f"; FAILED: {', '.join(r.name for r in report.failed)}" if c["FAIL"] else ""
    report.say(f"gpu-check: {c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP in {time.time() - t0:.0f} s "
               f"on {checker.device}; record {out}{failed}")
    return 1 if c["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
