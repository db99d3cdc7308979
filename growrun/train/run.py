"""One run, start to finish: build everything from the config, train, write the outputs.

Called by the CLI's Hydra task with the composed config and the run directory. Resuming
(resume=true) rebuilds the model from the architecture stored in checkpoints/last.pt (or
prev.pt when last.pt is torn; grown widths included), checks that the config is the one the
checkpoint was trained with, restores optimizer, scheduler, growth, RNG states and the
position inside the epoch, and trims the CSV logs to the checkpoint, so the continued run is
the uninterrupted one, bit for bit on CPU.

Checkpoints are written at the end of every epoch, every trainer.checkpoint_every steps or
trainer.checkpoint_minutes, and when SIGTERM / SIGINT asks the run to stop. The directory is
locked while a process trains in it. summary.json's status: completed | failed | diverged |
interrupted (written however the run ends, except by SIGKILL).
"""
from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from growrun.config.growable import check_growth
from growrun.config.validate import validate
from growrun.data import load_data
from growrun.errors import Diverged, GrowrunError, Interrupted
from growrun.loggers import Loggers
from growrun.loggers import chosen as chosen_loggers
from growrun.models import build_model, count_flops, count_params, full_site_widths, initial_arch
from growrun.train import distributed, runtime
from growrun.train.budget import plan_budget, resolve_budget
from growrun.train.compute_plan import schedule_plan
from growrun.train.optim import build_optimizer, build_scheduler
from growrun.files import disk_error
from growrun.train.outputs import CsvLog, has_checkpoint, load_checkpoint, save_checkpoint, write_summary
from growrun.train.safety import RunLock, StopSignals, check_resume_config
from growrun.train.trainer import Trainer

log = logging.getLogger("growrun")
CHECKPOINT = Path("checkpoints") / "last.pt"


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate(cfg)
    dist = distributed.connect(runtime.resolve_device(cfg.device))
    clean = False
    try:
        run_dir = distributed.run_dir_of_rank0(Path(run_dir), dist)
        with _exclusive(cfg, run_dir, dist):
            summary = _run_locked(cfg, run_dir, dist)
        clean = True
        return summary
    except Exception as ex:
        lost = distributed.lost_peer(ex, dist)
        if lost is None:
            raise
        raise lost from None
    finally:
        dist.close(clean)


@contextmanager
def _exclusive(cfg: DictConfig, run_dir: Path, dist):
    """Hold the run directory's lock (rank 0) and refuse to overwrite a run; all ranks agree."""
    lock, error = RunLock(run_dir), None
    try:
        if dist.is_main:
            lock.__enter__()
        if has_checkpoint(run_dir / CHECKPOINT) and not cfg.resume:
            raise GrowrunError(f"{run_dir} already holds a checkpoint; add resume=true to continue it "
                               "or choose another hydra.run.dir")
    except GrowrunError as ex:
        error = ex
    try:
        if dist.any(error is not None):
            raise error or GrowrunError(f"rank {dist.rank}: rank 0 could not start the run (see its message)")
        yield
    finally:
        lock.__exit__()


def _run_locked(cfg: DictConfig, run_dir: Path, dist) -> dict:
    summary: dict = {"status": "running", "run_dir": str(run_dir)}
    session = None
    try:
        session = _Session(cfg, run_dir, dist)
        summary = session.train()
        return summary
    except Diverged as ex:
        summary.update(status="diverged", error=str(ex))
        raise
    except GrowrunError as ex:
        summary.update(status="failed", error=str(ex))
        raise
    except KeyboardInterrupt as ex:
        reason = f"stopped by signal {ex.signum}" if isinstance(ex, Interrupted) else "interrupted by the user"
        summary.update(status="interrupted", error=reason)
        raise
    except OSError as ex:
        disk = disk_error(ex, Path(ex.filename or run_dir))
        summary.update(status="failed", error=str(disk or f"{type(ex).__name__}: {ex}"))
        if disk is not None:
            raise disk from None
        raise
    except Exception as ex:
        summary.update(status="failed", error=f"{type(ex).__name__}: {ex}")
        raise
    except BaseException as ex:
        # SystemExit: a preemption signal outside StopSignals' window (while the run is set up,
        # or after its loop) reached submitit's own handler, which requeued the job and exits.
        # "interrupted" lets the requeued job resume (growrun.launch.REQUEUED).
        summary.update(status="interrupted", error=f"stopped by {type(ex).__name__}")
        raise
    finally:
        if session is not None and summary.get("status") != "completed":
            summary.update(session.progress_summary())
        try:
            if dist.is_main:
                write_summary(run_dir / "summary.json", summary)
        except GrowrunError as ex:  # e.g. the disk is full: the error being raised says more
            log.error("%s", ex)
        if session is not None and session.loggers is not None:
            session.loggers.finish(summary)
            session.loggers.close()


class _Session:
    """The objects of one run and the bookkeeping around the Trainer."""

    def __init__(self, cfg: DictConfig, run_dir: Path, dist):
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        t = cfg.trainer
        self.device = dist.device
        runtime.configure(t.threads, runtime.deterministic_mode(t.deterministic, self.device), t.tf32)
        distributed.check_batch(t.batch_size, dist)
        if t.precision == "bf16" and self.device.type != "cuda":
            raise GrowrunError(f"trainer.precision=bf16 needs a CUDA device; this run is on {self.device}")
        loaded = load_checkpoint(run_dir / CHECKPOINT) if cfg.resume else None  # on the CPU
        ckpt = None
        if loaded is not None:
            ckpt, path = loaded
            check_resume_config(ckpt["config"], OmegaConf.to_container(cfg, resolve=True), path)
        runtime.seed_everything(cfg.seed)
        self.data = load_data(cfg.dataset, self.device, cfg.seed)
        arch = ckpt["arch"] if ckpt else initial_arch(cfg.model, self.data.num_classes, self.data.input_shape)
        self.model = build_model(arch).to(self.device)
        if ckpt:
            self.model.load_state_dict(ckpt["model"])
        optimizer = build_optimizer(self.model, cfg.optim)
        steps = _steps_per_epoch(len(self.data.train.labels), t.batch_size)
        _plan_epochs(cfg, self.data, steps)
        budget = resolve_budget(cfg, run_dir, dist.is_main)  # trainer.budget_flops / budget_from
        max_steps = plan_budget(cfg, budget, self.model, self.data.input_shape, steps)
        check_growth(cfg, self.data.num_classes, self.data.input_shape, steps)  # exact: the real data's sizes
        clock, events = schedule_plan(cfg, self.data.num_classes, self.data.input_shape, steps, t.epochs)
        scheduler = build_scheduler(optimizer, cfg.optim, steps, t.epochs, max_steps, clock, events)
        growth = _make_growth(cfg, run_dir, self.model, steps, self.data, dist)
        self.trainer = Trainer(cfg, self.model, self.data, self.device, optimizer, scheduler, growth, dist)
        self.trainer.max_steps = max_steps
        self.site_names = list(self.model.sites())
        self.metrics = CsvLog(run_dir / "metrics.csv", self._metric_columns())
        self.total_seconds = 0.0
        self.growth_seconds = 0.0
        self.best = (float("nan"), 0)  # (best test accuracy, its epoch)
        self.last: dict = {}
        self.signals = StopSignals()
        self.stopping: int | None = None  # the signal all ranks agreed to stop on
        self.saved_at = self.epoch_t0 = time.time()
        if ckpt:
            self.trainer.load_state_dict(ckpt["trainer"])
            runtime.set_rng_state(ckpt["rng"], self.device)
            self.total_seconds, self.growth_seconds = ckpt["total_seconds"], ckpt["growth_seconds"]
            self.best, self.last = tuple(ckpt["best"]), ckpt["last"]
            log.info("resumed %s from %s at epoch %d, step %d%s", run_dir, path.name, self.trainer.epoch,
                     self.trainer.step, f" (batch {self.trainer.partial.batches} of epoch {self.trainer.epoch + 1})"
                     if self.trainer.partial.batches else "")
        done = self.trainer.epoch
        if dist.is_main:
            self.metrics.start(keep=(lambda row: int(row["epoch"]) <= done) if ckpt else None)
        if growth is not None:
            growth.start_log(keep_until_step=self.trainer.step if ckpt else None, write=dist.is_main)
        self.loggers = None  # logger=...: rank 0 only, fed by the CSV files' rows (growrun/loggers/)
        if dist.is_main and chosen_loggers(cfg.logger):
            self.loggers = Loggers.open(cfg, run_dir, self.trainer.step if ckpt else None,
                                        OmegaConf.to_container(cfg, resolve=True))
            self.metrics.listeners.append(self.loggers.epoch)
            if growth is not None:
                growth.log.listeners.append(self.loggers.growth)

    def _metric_columns(self) -> list[str]:
        cols = ["epoch", "step", "lr", "train_loss", "train_acc"]
        cols += [f"{s}_{m}" for s in ("val", "test") if s in self.trainer.eval_loaders for m in ("loss", "acc")]
        cols += ["params", "flops_per_image", "train_flops", "growth_flops", "epoch_seconds", "growth_seconds",
                 "total_seconds"]
        return cols + [f"width:{name}" for name in self.site_names]

    def train(self) -> dict:
        cfg, tr = self.cfg, self.trainer
        log.info("run dir %s | %s on %s | %d train / %d test images | %d params", self.run_dir,
                 cfg.model.name, self.device, len(self.data.train.labels), len(self.data.test.labels),
                 count_params(self.model))
        with self.signals:
            while tr.epoch < cfg.trainer.epochs:
                self._agree_stop()  # a signal during the last epoch's evaluation: every rank stops
                self._stop_if_asked()
                self._epoch()
        summary = {"status": "completed", "run_dir": str(self.run_dir), **self.progress_summary()}
        log.info("done: test acc %.2f%% (best %.2f%% at epoch %d), %.0f s",
                 100 * self.last.get("test_acc", float("nan")), 100 * self.best[0], self.best[1],
                 self.total_seconds)
        return summary

    def _epoch(self) -> None:
        """Train (the rest of) one epoch, evaluate, log its row, checkpoint."""
        cfg, tr = self.cfg, self.trainer
        self.epoch_t0 = time.time() - tr.partial.seconds
        row = tr.train_epoch(self._after_step)
        tr.epoch += 1
        last_epoch = tr.epoch == cfg.trainer.epochs
        if tr.epoch % cfg.trainer.eval_every == 0 or last_epoch:
            for split in tr.eval_loaders:
                row[f"{split}_loss"], row[f"{split}_acc"] = tr.evaluate(split)
        if tr.growth is not None:  # the loss growth.when=plateau monitors (in the checkpoint below)
            tr.growth.record_loss(row, "val" in tr.eval_loaders)
        seconds = time.time() - self.epoch_t0
        self.total_seconds += seconds
        self.growth_seconds += row["growth_seconds"]
        row.update(epoch=tr.epoch, step=tr.step, lr=tr.current_lr(), params=count_params(self.model),
                   flops_per_image=tr.flops_per_image, train_flops=tr.train_flops,
                   growth_flops=self._growth_flops(), epoch_seconds=seconds, total_seconds=self.total_seconds)
        row.update({f"width:{n}": s.width for n, s in self.model.sites().items()})
        if "test_acc" in row and not row["test_acc"] <= self.best[0]:
            self.best = (row["test_acc"], tr.epoch)
        self.last = row
        if self.dist.is_main:
            self.metrics.append([row])
        if cfg.trainer.checkpoint:
            self._save()
        log.info("epoch %d/%d  train %.4f / %.2f%%  %s  %.1fs", tr.epoch, cfg.trainer.epochs,
                 row["train_loss"], 100 * row["train_acc"], _eval_text(row), seconds)

    def _after_step(self) -> None:
        """After every optimizer step: checkpoint when due, stop when a signal asked to. The
        step count's checkpoints are known to every rank; a timed checkpoint (rank 0's clock)
        and a stop (any rank's signal) are agreed on every dist.agree_every steps (every step
        in one process), so that several ranks sync the host once per that many steps."""
        t, tr = self.cfg.trainer, self.trainer
        due = bool(t.checkpoint_every and tr.step % t.checkpoint_every == 0)
        if tr.step % self.dist.agree_every == 0:
            due = self._agree_stop(bool(t.checkpoint_minutes and time.time() - self.saved_at >= 60 * t.checkpoint_minutes)) or due
        if t.checkpoint and (due or self.stopping is not None):
            tr.partial.seconds = time.time() - self.epoch_t0
            self._save()
        self._stop_if_asked()

    def _agree_stop(self, timed_due: bool = False) -> bool:
        """One decision of all ranks: whether a timed checkpoint is due (rank 0's clock, returned)
        and whether to stop (any rank's signal: `stopping` is set on every rank)."""
        due, stop = self.dist.agree(timed_due, self.signals.received is not None)
        if stop and self.stopping is None:
            self.stopping = self.signals.received or signal.SIGTERM  # another rank's signal
        return due

    def _stop_if_asked(self) -> None:
        if self.stopping is not None:
            log.warning("stopped at epoch %d, step %d%s; continue with: growrun resume %s (a submitit job "
                        "preempted by SIGUSR2 is requeued and continues by itself)", self.trainer.epoch,
                        self.trainer.step, " (checkpoint written)" if self.cfg.trainer.checkpoint else "", self.run_dir)
            raise Interrupted(self.stopping)

    def _save(self) -> None:
        """Checkpoint the run, unless it has diverged (then the last good checkpoint stays)."""
        self.trainer.check_finite()
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):  # one sync
            raise Diverged(f"training diverged: non-finite weights at step {self.trainer.step} (epoch "
                           f"{self.trainer.epoch + 1}); the last checkpoint before it is kept; lower optim.lr")
        self.saved_at = time.time()
        trainer_state = self.trainer.state_dict()  # on every rank: growth's state gathers every rank's share
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir / CHECKPOINT, {
            "arch": self.model.arch(), "model": self.model.state_dict(), "trainer": trainer_state,
            "rng": runtime.rng_state(self.device), "total_seconds": self.total_seconds,
            "growth_seconds": self.growth_seconds, "best": list(self.best), "last": self.last,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        })
        if self.loggers is not None:
            self.loggers.checkpointed(self.trainer.step)

    def _growth_flops(self) -> int:
        growth = self.trainer.growth
        return 0 if growth is None else growth.flops

    def progress_summary(self) -> dict:
        last = self.last
        return {
            "epochs_done": self.trainer.epoch, "epochs": self.cfg.trainer.epochs, "step": self.trainer.step,
            "final": {k: last[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
                      if k in last},
            "best_test_acc": self.best[0], "best_epoch": self.best[1],
            "params": count_params(self.model),
            "flops_per_image": count_flops(self.model, self.data.input_shape),
            "train_flops": self.trainer.train_flops, "growth_flops": self._growth_flops(),
            "total_seconds": self.total_seconds, "growth_seconds": self.growth_seconds,
            "widths": {n: s.width for n, s in self.model.sites().items()},
            "arch": self.model.arch(),
        }


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    if n_train < batch_size:
        raise GrowrunError(f"trainer.batch_size={batch_size}: larger than the {n_train} training images; "
                           f"use at most {n_train}")
    return n_train // batch_size


def _eval_text(row: dict) -> str:
    parts = [f"{s} {row[s + '_loss']:.4f} / {100 * row[s + '_acc']:.2f}%" for s in ("val", "test") if s + "_acc" in row]
    return "  ".join(parts)


def _plan_epochs(cfg: DictConfig, data, steps_per_epoch: int) -> None:
    """growth.extra_epochs: set trainer.epochs to the epoch of the last planned growth event
    (from the initial architecture, so a resumed run plans the same) plus extra_epochs.
    validate() has already refused extra_epochs without a to_target growth method."""
    g = cfg.growth
    if g.extra_epochs is None:
        return
    from growrun.growth import policy

    start, targets = planned_widths(cfg, data.num_classes, data.input_shape)
    cfg.trainer.epochs = policy.planned_epochs(g, policy.planned_events(g, start, targets), steps_per_epoch)
    log.info("growth.extra_epochs=%d: training for %d epochs", g.extra_epochs, cfg.trainer.epochs)


def planned_widths(cfg: DictConfig, num_classes: int, input_shape) -> tuple[dict[str, int], dict[str, int]]:
    """({site: start width}, {site: target width}) of the configured model and growth."""
    from growrun.growth import policy

    arch = initial_arch(cfg.model, num_classes, input_shape)
    start = {n: s.width for n, s in build_model(arch).sites().items()}
    targets = policy.target_widths(cfg.growth, list(start), full_site_widths(arch, cfg.model), list(start.values()))
    return start, targets


def _make_growth(cfg: DictConfig, run_dir: Path, model, steps_per_epoch: int, data, dist):
    if cfg.growth.method == "none":
        return None
    from growrun.train.events import GrowthController

    return GrowthController(cfg, run_dir, model, steps_per_epoch, len(data.train.labels), dist)
