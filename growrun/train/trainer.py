"""The training loop: epochs of SGD over device-resident batches, evaluation, growth events.

The hot path (one batch) does forward, loss, backward, optimizer and scheduler steps, and adds
the batch loss and correct count to on-device accumulators: no host synchronisation per batch
(the progress bar's loss is read every `_POSTFIX_EVERY` batches only). Growth, when configured,
runs between batches at the steps the growth controller asks for (fractional dt included).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from growrun.data import BatchLoader, DataBundle
from growrun.train import runtime

log = logging.getLogger("growrun")
_POSTFIX_EVERY = 25


class GrowthHook(Protocol):
    """What the trainer needs from a growth controller (growrun.growth.controller)."""

    def due(self, step: int) -> bool: ...
    def grow(self, trainer: "Trainer") -> float: ...  # returns seconds spent
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Trainer:
    def __init__(self, cfg, model: nn.Module, data: DataBundle, device: torch.device,
                 optimizer: torch.optim.Optimizer, scheduler, growth: GrowthHook | None = None):
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.optimizer, self.scheduler, self.growth = optimizer, scheduler, growth
        t = cfg.trainer
        norm = dict(mean=data.mean, std=data.std)
        self.train_loader = BatchLoader(data.train, t.batch_size, shuffle=True, augment=cfg.dataset.augment,
                                        drop_last=True, seed=cfg.seed, **norm)
        self.eval_loaders = {name: BatchLoader(split, t.eval_batch_size, shuffle=False, augment=False,
                                               drop_last=False, seed=cfg.seed, **norm)
                             for name, split in (("val", data.val), ("test", data.test)) if split is not None}
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if t.precision == "bf16" and device.type == "cuda" else contextlib.nullcontext())
        self.memory_format = runtime.memory_format(t.channels_last, device)
        self.prepare_model()
        progress = t.progress
        self.show_progress = progress == "on" or (progress == "auto" and sys.stderr.isatty())

    def prepare_model(self) -> None:
        """Put the parameters in the configured memory format (again after growth)."""
        self.model.to(memory_format=self.memory_format)

    def _batches(self, loader: BatchLoader, epoch: int):
        for x, y in loader.epoch(epoch):
            yield x.contiguous(memory_format=self.memory_format), y

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_epoch(self) -> dict[str, Any]:
        """One epoch over the training set; returns the epoch's train metrics and growth time."""
        model, opt, sched = self.model, self.optimizer, self.scheduler
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, growth_seconds = 0, 0.0
        bar = tqdm(self._batches(self.train_loader, self.epoch), total=self.steps_per_epoch, leave=False,
                   desc=f"epoch {self.epoch + 1}/{self.cfg.trainer.epochs}", disable=not self.show_progress,
                   dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            with self.autocast:
                out = model(x)
                loss = self.criterion(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            self.step += 1
            loss_sum += loss.detach() * y.shape[0]
            correct += (out.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if self.show_progress and i % _POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.growth is not None and self.growth.due(self.step):
                growth_seconds += self.growth.grow(self)
                model.train()
        bar.close()
        return {"train_loss": (loss_sum / max(seen, 1)).item(), "train_acc": (correct.double() / max(seen, 1)).item(),
                "growth_seconds": growth_seconds}

    @torch.no_grad()
    def evaluate(self, name: str) -> tuple[float, float]:
        """Mean cross-entropy (no label smoothing) and accuracy on a held-out split."""
        model = self.model
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
        return (loss_sum / max(seen, 1)).item(), (correct.double() / max(seen, 1)).item()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "growth": None if self.growth is None else self.growth.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.growth is not None and state.get("growth") is not None:
            self.growth.load_state_dict(state["growth"])

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
