"""Growth during training: the trainer asks `due(step)` after every optimizer step and `grow`
runs one growth event (event.py: draw, measure, propose, choose, grow, finish); `watch` opens a
growth.stats=training window before the steps it records. The controller keeps what lasts from
event to event: the schedule (growrun.growth.policy), the start and target widths, the event
count, the round-robin turn, the monitored losses of growth.when=plateau, an open statistics
window, the growth compute so far (`flops`, compute.py) and growth.csv. The method is the
registry's (growrun.growth.methods.create(growth config)).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growrun import devices
from growrun.growth import methods, policy, stats_training
from growrun.growth.draws import log_draw_sizes
from growrun.growth.growth_log import COLUMNS, skipped_rows
from growrun.growth.solve_device import solve_device as pick_solve_device
from growrun.models import count_params, full_site_widths
from growrun.train.distributed import Single
from growrun.train.events.event import GrowthEvent
from growrun.train.outputs import CsvLog

log = logging.getLogger("growrun")


class GrowthController:
    def __init__(self, cfg, run_dir: Path, model, steps_per_epoch: int, n_train: int, dist: Single | None = None):
        self.cfg, self.g, self.steps_per_epoch = cfg, cfg.growth, steps_per_epoch
        self.dist = dist or Single()
        self.method = methods.create(self.g)  # growrun/growth/methods/: which neurons, how they go in
        self._solve_on: str | None = None  # growth.solve_device resolved on rank 0 ("cpu" | "model")
        self.schedule = set(policy.growth_steps(self.g, steps_per_epoch, cfg.trainer.epochs))
        sites = model.sites()
        self.names = list(sites)
        current = [s.width for s in sites.values()]
        self.targets = policy.target_widths(self.g, self.names, full_site_widths(model.arch(), cfg.model), current)
        self.start = dict(zip(self.names, current))
        self.event, self.turn = 0, 0
        self.flops = 0  # growth compute so far (compute.py)
        self.model = model  # grown in place: the same object for the whole run
        self.log = CsvLog(run_dir / "growth.csv", COLUMNS)
        self.writes = True  # start_log(write=False) on ranks other than 0
        self.training_stats = self.g.stats == "training"
        self.windows = stats_training.window_starts(self.schedule, self.g.samples, cfg.trainer.batch_size) \
            if self.training_stats else {}
        self.recording: stats_training.TrainingStats | None = None  # the open window's statistics
        self._window_state: dict | None = None  # a resumed window's partial sums (attached by watch)
        log_draw_sizes(self.g, n_train)
        self.losses: list[float] = []  # growth.when=plateau: the monitored loss of every evaluated epoch
        self.plateau_used = 0  # len(self.losses) when the plateau trigger last fired

    # --- the trainer's interface -------------------------------------------------------------
    def start_log(self, keep_until_step: int | None, write: bool = True) -> None:
        self.writes = write  # False on ranks other than 0
        if not write:
            return
        self.log.start(keep=(lambda row: int(row["step"]) <= keep_until_step) if keep_until_step is not None else None)

    def due(self, step: int) -> bool:
        return step in self.schedule and bool(self.growable_names())

    def watch(self, step: int) -> None:
        """Before the forward of optimizer step `step` (growth.stats=training): open the next
        event's statistics window when `step` starts it (stats_training.window_starts)."""
        if self.recording is not None and step - 1 in self.schedule:  # its event did not take it: nothing to grow
            self.recording.detach()
            self.recording = None
        if self.recording is None and self._window_state is not None:  # resumed inside a window
            state = stats_training.rank_window(self._window_state, self.dist.rank, self.dist.world)
            self._window_state = None
            sites = self.model.sites()
            self.recording = stats_training.TrainingStats([sites[n] for n in state], state=state)
        elif self.recording is None and step in self.windows:
            pending = self.growable_names()
            if pending:
                names = policy.pick_sites(self.g.sites, pending, self.names, self.turn) \
                    if self.g.sites != "best_gain" else pending
                sites = self.model.sites()
                self.recording = stats_training.TrainingStats([sites[n] for n in names])
        if self.recording is not None:
            self.recording.attach()

    def state_dict(self) -> dict:
        """Called on every rank (an open statistics window's partial sums are gathered from
        each: stats_training.gather_window); only rank 0's result is saved."""
        if self.recording is not None:
            window = stats_training.gather_window(self.recording.state_dict(), self.dist)
        else:
            window = self._window_state
        return {"event": self.event, "turn": self.turn, "start": dict(self.start), "flops": self.flops,
                "window": window, "losses": list(self.losses), "plateau_used": self.plateau_used}

    def load_state_dict(self, state: dict) -> None:
        self.event, self.turn, self.start = state["event"], state["turn"], dict(state["start"])
        self.flops = state.get("flops", 0)  # absent in older checkpoints
        if self.recording is not None:
            self.recording.detach()
        self.recording, self._window_state = None, state.get("window")
        self.losses, self.plateau_used = list(state.get("losses", [])), state.get("plateau_used", 0)  # absent: older

    def record_loss(self, row: dict, has_val: bool) -> None:
        """After an epoch's evaluation (the run loop): the loss growth.when=plateau monitors
        (policy.plateau_loss: validation, else training)."""
        loss = policy.plateau_loss(row, has_val)
        if loss is not None and math.isfinite(loss):
            self.losses.append(float(loss))

    def grow(self, trainer) -> float:
        """One growth event (event.py); returns its seconds. TF32 is off throughout
        (growrun.devices: the statistics and the line search assume float32 rounding), and so
        is cuDNN's autotuner (the event's shapes occur once)."""
        with devices.exact_fp32(), devices.no_autotune():
            return self._grow(trainer)

    # --- around the event ----------------------------------------------------------------------
    def _grow(self, trainer) -> float:
        started = self.clock()
        if self.g.when == "plateau" and not self._plateau_fires():
            return self._skip_event(trainer, started)
        recording, self.recording = self.recording, None
        if self.training_stats and recording is None:
            log.info("growth %d: no statistics were recorded during training (resumed from an older checkpoint?); "
                     "a statistics pass replaces them", self.event + 1)
        event = GrowthEvent(self, trainer, recording)
        event.draw()
        started -= event.measure()  # the products added during a statistics window are growth time too
        event.propose()
        event.choose()
        event.grow()
        rows = event.finish()
        self.flops += event.compute.total
        if self.writes:
            self.log.append(rows)
        if self.g.sites == "round_robin" and event.names:
            self.turn = (self.names.index(event.names[0]) + 1) % len(self.names)
        self.event += 1
        trainer.prepare_model()
        seconds = self.clock() - started
        added = ", ".join(f"{r['site']}+{r['added']}" + (f" ({r['reason']})" if r["reason"] else "") for r in rows)
        log.info("growth %d at step %d: %s (%.1fs)", self.event, trainer.step, added or "nothing", seconds)
        return seconds

    def _plateau_fires(self) -> bool:
        """growth.when=plateau at this check (policy.plateau_fires); remembers when it fired."""
        fired = policy.plateau_fires(self.losses, self.g.plateau_patience, self.g.plateau_min_delta, self.plateau_used)
        if fired:
            self.plateau_used = len(self.losses)
        return fired

    def _skip_event(self, trainer, started: float) -> float:
        """A scheduled event whose trigger (growth.when=plateau) did not fire: no statistics, no
        neuron; one growth.csv row (added 0, reason "trigger") per site it would have considered."""
        if self.recording is not None:  # growth.stats=training: the window's sums are not used
            self.recording.detach()
            self.recording = None
        pending = self.growable_names()
        names = policy.pick_sites(self.g.sites, pending, self.names, self.turn) if self.g.sites != "best_gain" \
            else pending
        sites = self.model.sites()
        requested = {n: policy.requested_count(self.g, sites[n].width, self.start[n], self.targets[n]) for n in names}
        rows = skipped_rows(self.event + 1, trainer.step, self.steps_per_epoch, self.g.method, sites, requested,
                            count_params(self.model))
        if self.writes:
            self.log.append(rows)
        self.event += 1
        seconds = self.clock() - started
        log.info("growth %d at step %d: not grown, growth.when=plateau did not fire (%.1fs)", self.event, trainer.step,
                 seconds)
        return seconds

    # --- what the event asks of the run --------------------------------------------------------
    def growable_names(self) -> list[str]:
        """Sites below their target width for which growth.param_budget leaves one neuron."""
        params = count_params(self.model)
        return [n for n, s in self.model.sites().items()
                if s.width < self.targets[n] and policy.affordable(self.g, params, s.params_per_neuron()) != 0]

    def clock(self) -> float:
        """Wall-clock seconds once the model's device has finished its queued work (CUDA)."""
        devices.synchronize(next(self.model.parameters()).device)
        return time.time()

    def loss_fn(self, reduction: str):
        smoothing = self.cfg.trainer.label_smoothing
        return lambda logits, y: F.cross_entropy(logits.float(), y, reduction=reduction, label_smoothing=smoothing)

    def solve_device(self, device: torch.device) -> str:
        """growth.solve_device as "cpu" or "model", chosen once, on rank 0 (auto times the devices:
        ranks timing on their own could choose differently) and shared with every rank."""
        if self._solve_on is None:
            chosen = pick_solve_device(device, self.g.solve_device) if self.dist.is_main else None
            self._solve_on = self.dist.share(None if chosen is None else "cpu" if chosen.type == "cpu" else "model")
        return self._solve_on
