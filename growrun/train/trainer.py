"""The training loop: epochs of SGD over device-resident batches, evaluation, growth events.

The hot path (one batch) does forward, loss, backward, optimizer and scheduler steps, and adds
the batch loss and correct count to on-device accumulators: no host synchronisation per batch
(the progress bar's loss is read every `_POSTFIX_EVERY` batches only). Growth, when configured,
runs between batches at the steps the growth controller asks for (fractional dt included).

An epoch can stop and continue between any two steps: `partial` holds the batches done and the
epoch's running sums, and is part of state_dict(), so a checkpoint written mid-epoch resumes
exactly (the loader's batches depend on (seed, epoch) alone). A non-finite loss is recorded on
the device (the first step it happened at) and raised as Diverged by check_finite(), which runs
every `_POSTFIX_EVERY` steps, before growth, before checkpoints and at the end of the epoch.

With several ranks (growrun.train.distributed) each trains on its share of every batch through
the DDP wrapper `net` (rebuilt by prepare_model after growth); the epoch's sums, evaluation and
the non-finite check are combined across ranks.

Compute: `train_flops` counts the training FLOPs of every image seen at the width it was seen
at, TRAIN_FLOPS_PER_FORWARD x the model's forward FLOPs per image (growrun.models.count_flops:
2 per multiply-add of conv and linear layers) per image: the forward, and a backward of about
twice its cost (gradients of the inputs and of the weights). Evaluation is not counted.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from growrun import faults
from growrun.data import BatchLoader, DataBundle
from growrun.errors import Diverged
from growrun.models import count_flops
from growrun.train import runtime
from growrun.train.distributed import Single

log = logging.getLogger("growrun")
_POSTFIX_EVERY = 25
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (input and weight gradients) per image


class GrowthHook(Protocol):
    """What the trainer needs from a growth controller (growrun.train.events)."""

    flops: int  # growth compute so far
    def watch(self, step: int) -> None: ...  # before step `step`'s forward (statistics from training)
    def due(self, step: int) -> bool: ...
    def grow(self, trainer: "Trainer") -> float: ...  # returns seconds spent
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def record_loss(self, row: dict, has_val: bool) -> None: ...  # the run loop, after an epoch's evaluation


@dataclass
class EpochProgress:
    """The part of the current epoch already trained (all zero at an epoch boundary)."""
    batches: int = 0
    loss_sum: torch.Tensor | None = None  # sum of per-image losses (device scalar)
    correct: torch.Tensor | None = None  # correct predictions (device scalar, int64)
    seen: int = 0
    growth_seconds: float = 0.0
    seconds: float = 0.0  # wall time of the epoch before the last checkpoint (for resumed epochs)

    def state_dict(self) -> dict:
        return dict(vars(self))


class Trainer:
    def __init__(self, cfg, model: nn.Module, data: DataBundle, device: torch.device,
                 optimizer: torch.optim.Optimizer, scheduler, growth: GrowthHook | None = None,
                 dist: Single | None = None):
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.dist = dist or Single(device)
        shard = (self.dist.rank, self.dist.world)
        self.optimizer, self.scheduler, self.growth = optimizer, scheduler, growth
        t = cfg.trainer
        norm = dict(mean=data.mean, std=data.std)
        self.train_loader = BatchLoader(data.train, t.batch_size, shuffle=True, augment=cfg.dataset.augment,
                                        drop_last=True, seed=cfg.seed, shard=shard, **norm)
        self.eval_loaders = {name: BatchLoader(split, t.eval_batch_size, shuffle=False, augment=False,
                                               drop_last=False, seed=cfg.seed, shard=shard, **norm)
                             for name, split in (("val", data.val), ("test", data.test)) if split is not None}
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.train_flops = 0  # training compute so far (see the module doc)
        self.partial = EpochProgress()
        self.max_steps: int | None = None  # trainer.budget_flops: the run ends after this step (growrun.train.budget)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite loss step
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if t.precision == "bf16" and device.type == "cuda" else contextlib.nullcontext())
        self.memory_format = runtime.memory_format(t.channels_last, device)
        self.prepare_model()
        progress = t.progress
        self.show_progress = progress == "on" or (progress == "auto" and sys.stderr.isatty())

    def prepare_model(self) -> None:
        """Put the parameters in the configured memory format and (re)build the DDP wrapper
        (again after growth: the parameters changed; rank 0's are broadcast)."""
        self.model.to(memory_format=self.memory_format)
        match_state_strides(self.optimizer)
        self.net = self.dist.wrap(self.model)
        self.flops_per_image = count_flops(self.model, self.data.input_shape)

    def _batches(self, loader: BatchLoader, epoch: int, start: int = 0):
        for x, y in loader.epoch(epoch, start):
            yield x.contiguous(memory_format=self.memory_format), y

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_epoch(self, after_step: Callable[[], None] | None = None) -> dict[str, Any]:
        """The rest of the current epoch (all of it, or from where `partial` stopped); returns
        the epoch's train metrics and growth time. `after_step` runs after every step (and its
        growth event): the run's checkpoint and stop requests."""
        model, opt, sched, p = self.model, self.optimizer, self.scheduler, self.partial
        model.train()
        if p.loss_sum is None:
            p.loss_sum = torch.zeros((), device=self.device)
            p.correct = torch.zeros((), device=self.device, dtype=torch.long)
        bar = tqdm(self._batches(self.train_loader, self.epoch, p.batches), total=self.steps_per_epoch,
                   initial=p.batches, leave=False, desc=f"epoch {self.epoch + 1}/{self.cfg.trainer.epochs}",
                   disable=not self.show_progress, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar, p.batches):
            if self.max_steps is not None and self.step >= self.max_steps:  # the budget's last, partial epoch
                break
            if self.growth is not None:
                self.growth.watch(self.step + 1)
            with self.autocast:
                out = self.net(x)
                loss = self.criterion(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            self.step += 1
            self.train_flops += TRAIN_FLOPS_PER_FORWARD * self.flops_per_image * y.shape[0] * self.dist.world
            loss = loss.detach()
            self._note_finite(loss)
            p.loss_sum += loss * y.shape[0]
            p.correct += (out.detach().argmax(1) == y).sum()
            p.seen += y.shape[0]
            p.batches = i + 1
            if i % _POSTFIX_EVERY == 0:
                self.check_finite()
                if self.show_progress:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.growth is not None and self.growth.due(self.step):
                self.check_finite()
                p.growth_seconds += self.growth.grow(self)
                model.train()
            faults.reach("step")
            if after_step is not None:
                after_step()
        bar.close()
        self.check_finite()
        sums = [p.loss_sum.clone(), p.correct.clone(), torch.tensor(p.seen, device=self.device)]
        self.dist.sum_(sums)
        loss_sum, correct, seen = sums[0], sums[1], max(int(sums[2]), 1)
        row = {"train_loss": (loss_sum / seen).item(), "train_acc": (correct.double() / seen).item(),
               "growth_seconds": p.growth_seconds}
        self.partial = EpochProgress()
        return row

    def _note_finite(self, loss: torch.Tensor) -> None:
        """Record (on the device, no synchronisation) the first step with a non-finite loss."""
        fresh = (self._first_bad < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(fresh, self.step, self._first_bad)

    def check_finite(self) -> None:
        """Raise Diverged if a loss since the run (re)started was NaN or infinite."""
        bad = self.dist.max_int(self._first_bad)  # any rank's
        if bad >= 0:
            spe = self.steps_per_epoch
            raise Diverged(f"training diverged: non-finite loss at step {bad} (epoch {(bad - 1) // spe + 1}, "
                           f"batch {(bad - 1) % spe + 1}); the last checkpoint before it is kept; "
                           "lower optim.lr or check the data")

    @torch.no_grad()
    def evaluate(self, name: str) -> tuple[float, float]:
        """Mean cross-entropy (no label smoothing) and accuracy on a held-out split."""
        model = self.model
        self.dist.sync_buffers(model)  # every rank evaluates rank 0's model
        model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        for x, y in self._batches(self.eval_loaders[name], 0):
            with self.autocast:
                out = model(x)
            loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            seen += y.shape[0]
        model.train()
        sums = [loss_sum, correct, torch.tensor(seen, device=self.device)]
        self.dist.sum_(sums)
        seen = max(int(sums[2]), 1)
        return (sums[0] / seen).item(), (sums[1].double() / seen).item()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "train_flops": self.train_flops,
                "partial": self.partial.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "growth": None if self.growth is None else self.growth.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.train_flops = state.get("train_flops", 0)  # absent in older checkpoints
        self.partial = EpochProgress(**state.get("partial", {}))  # absent in older checkpoints: at an epoch end
        for key in ("loss_sum", "correct"):  # the checkpoint was loaded on the CPU
            value = getattr(self.partial, key)
            if value is not None:
                setattr(self.partial, key, value.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.growth is not None and state.get("growth") is not None:
            self.growth.load_state_dict(state["growth"])

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


@torch.no_grad()
def match_state_strides(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-entry optimizer state tensor (momentum, Adam's moments) its parameter's
    memory layout. Growth rebuilds a grown parameter's state by concatenation, which comes back
    contiguous, while the parameter is then put in channels_last: the optimizer's fused
    (foreach) kernels need matching layouts and otherwise fall back to a slow per-tensor path."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
