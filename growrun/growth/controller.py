"""Growth during training: the trainer asks `due(step)` after every optimizer step, and
`grow(trainer)` runs one growth event (tiny_math.md section 7):

    1. draw the statistics samples and a disjoint line-search batch from the training set
       (seeded by (seed, event): a resumed run redraws the same ones), no augmentation; on a
       training set too small for both, both draws shrink (policy.draw_sizes);
    2. one statistics pass over the sites that may grow (below their target, and at least one
       neuron within growth.param_budget); with growth.stats=training no pass: the sums were
       recorded on the last training steps (growrun.growth.stats_training, opened by `watch`);
    3. per chosen site: propose neurons (growrun.growth.neurons), cap them by the budget left,
       measure the new channels' moments for BatchNorm, line-search gamma
       (growrun.growth.linesearch), insert them (growrun.growth.surgery) with the optimizer
       state extended; with growth.apply_dw also L2 += gamma^2 dW2* on the existing columns,
       exactly what the line search evaluated;
    4. append one row per site to growth.csv, also when it gets no neuron.

A site may get fewer neurons than the schedule requested, 0 included: the row's `reason` and
`trigger` say why (growrun.growth.growth_log).

With several ranks (trainer.dist, growrun.train.distributed) each rank takes its share of the
statistics batches and of the line-search batch, the statistics (sums) are summed across ranks
and every line-search loss is the global batch's mean, so all ranks take the same decisions;
only rank 0 writes growth.csv.

The line-search batch runs through the network's front (before the first site's block) once
per event and is carried from block to block (draws.advance; a fresh front for a site before
the last one), and each loss the search evaluates runs from the site's block on (models'
forward_to / forward_between / forward_from: the same numbers, less compute); a site's L(0) is
the loss measured after the site before it. The new BatchNorm channels' moments are measured on the
search batch at the site (from its block to L1), so that their BatchNorm is the identity on the
batch the line search measures.

Compute (`flops`, cumulative, in the state), with F the forward FLOPs per image at the width
before the event and F_front / F_rest those of a site's front / the rest when it is grown:
3 F per statistics sample of the pass (none with growth.stats=training, where the training
step is the forward and backward), per line-search image the front's FLOPs it runs through,
F_rest per line-search image per loss evaluated (the search's evaluations and the loss after
insertion); the moments' L1 operation is not counted.

Function-preserving methods (gradmax, zero, net2net) skip the line search: gamma = 1, their fan-out
scale is their own. growth=firefly / splitting use the statistics batches themselves (their
modules' event_hook): firefly inserts its trained candidates at gamma = 1, no search (its compute:
per site F_front per statistics sample and 3 (F_rest + the candidates' FLOPs) per sample of each
training step and of the score pass); splitting line-searches the split itself. Statistics and line search run
in training mode (the mode training continues in) without touching BatchNorm running statistics.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growrun import devices, faults
from growrun.data.loader import derive_seed
from growrun.growth import methods, policy
from growrun.growth.adaptive import adaptive_count
from growrun.growth.growth_log import COLUMNS, cut_reason, score, skipped_rows, unusable_stats, zeroed
from growrun.growth.draws import advance, draw_samples, global_mean_loss, log_draw_sizes, measure, split_at
from growrun.growth.linesearch import SearchResult, at_gamma, line_search
from growrun.growth.methods import EventContext
from growrun.growth.neurons import Proposal
from growrun.growth.scale import existing_norms, neuron_norms, normalized
from growrun.growth.site import frozen_bn_stats
from growrun.growth.solve_device import solve_device as pick_solve_device
from growrun.growth import stats_training
from growrun.growth.stats import collect_statistics
from growrun.growth.surgery import fit_to_site, new_channel_moments, weight_update_fn
from growrun.models import count_flops, count_params, full_site_widths
from growrun.train.distributed import Single
from growrun.train.outputs import CsvLog

log = logging.getLogger("growrun")
_GROWTH_STREAM = 0x67726F77


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
        self.flops = 0  # growth compute so far (see the module doc)
        self.model = model  # grown in place: the same object for the whole run
        self._event: EventContext | None = None  # what the methods get at the current event
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
        return step in self.schedule and bool(self._growable_names())

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
            pending = self._growable_names()
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
                "window": window, "losses": list(self.losses),
                "plateau_used": self.plateau_used}

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
        """One growth event (module doc); returns its seconds. TF32 is off throughout
        (growrun.devices: the statistics and the line search assume float32 rounding), and so
        is cuDNN's autotuner (the event's shapes occur once)."""
        with devices.exact_fp32(), devices.no_autotune():
            return self._grow(trainer)

    def _clock(self) -> float:
        """Wall-clock seconds once the model's device has finished its queued work (CUDA)."""
        devices.synchronize(next(self.model.parameters()).device)
        return time.time()

    def _grow(self, trainer) -> float:
        started = self._clock()
        if self.g.when == "plateau" and not self._plateau_fires():
            return self._skip_event(trainer, started)
        model = trainer.model
        gen = torch.Generator().manual_seed(derive_seed(_GROWTH_STREAM, self.cfg.seed, self.event))
        recording, self.recording = self.recording, None
        if self.training_stats and recording is None:
            log.info("growth %d: no statistics were recorded during training (resumed from an older checkpoint?); "
                     "a statistics pass replaces them", self.event + 1)
        stats_batches, search_batch = draw_samples(trainer.data.train, trainer.train_loader.normalize,
                                                   0 if recording else self.g.samples, self.g.line_search.batch_size,
                                                   self.g.stats_batch_size, gen, trainer.memory_format)
        dist = self.dist
        forward = trainer.flops_per_image  # at the width before the event (the trainer keeps it current)
        n_stats, n_search = sum(len(y) for _, y in stats_batches), len(search_batch[1])
        stats_batches, search_batch = [dist.shard(b) for b in stats_batches], dist.shard(search_batch)
        self._mean_loss = self._loss_fn("mean") if not dist.active else global_mean_loss(self._loss_fn("sum"), dist)
        sites = model.sites()
        pending = self._growable_names()
        grow_now = policy.pick_sites(self.g.sites, pending, self.names, self.turn) if self.g.sites != "best_gain" else pending
        t0 = self._clock()
        if recording is not None:  # growth.stats=training: the window's sums
            window_seconds = recording.seconds
            stats = recording.finish()
            grow_now = [n for n in stats if n in pending]
            started -= window_seconds  # the products added during the window are growth time too
        else:
            window_seconds = 0.0
            stats = collect_statistics(model, [sites[n] for n in grow_now], stats_batches, self._loss_fn("sum"),
                                       conv_fanout=self.g.conv_fanout)
        for site_stats in stats.values():
            dist.sum_(site_stats.tensors())
        stats_seconds = (self._clock() - t0 + window_seconds) / max(1, len(grow_now))
        faults.reach("stats")
        self._event = EventContext(model=model, batches=stats_batches, loss_fn=self._loss_fn("sum"),
                                   reduce=dist.sum_ if dist.active else None, input_shape=trainer.data.input_shape,
                                   n_stats=n_stats, add_flops=self._add_flops)
        proposals, trails, solve_seconds = {}, {}, {}
        for name in grow_now:
            t0 = self._clock()
            proposals[name], trails[name] = self._propose(sites[name], stats[name], gen)
            solve_seconds[name] = self._clock() - t0
        self._event = None
        if self.g.sites == "best_gain":
            scores = {n: score(p, sites[n]) for n, p in proposals.items()}
            grow_now = policy.pick_sites("best_gain", pending, self.names, self.turn, scores)
        rows, base, z = [], None, None  # L(0): the loss after the site before (same batch and model);
        front_flops, f_done = 0, 0       # z: the search batch at the site's block, carried along
        for i, n in enumerate(grow_now):  # (f_done: the front FLOPs a carried z has already run)
            rows.append(self._grow_site(model, sites[n], proposals[n], trails[n], search_batch, trainer, base, z))
            f_front = rows[-1].pop("_f_front")
            front_flops += f_front - f_done
            base, z = rows[-1]["loss_after"], rows[-1].pop("_front")
            z = advance(model, n, grow_now[i + 1], z) if i + 1 < len(grow_now) else None
            f_done = f_front if z is not None else 0
        for row, name in zip(rows, grow_now):
            row.update(stats_seconds=stats_seconds, solve_seconds=solve_seconds[name], samples=stats[name].n)
        for row, name in zip(rows, grow_now):  # growth.when: the trigger that fired ("" if it did not)
            row["trigger"] = "" if any(stage == "trigger" for stage, _ in trails[name]) else self.g.when
        self.flops += 3 * forward * n_stats + n_search * (front_flops + sum(r.pop("_search_flops") for r in rows))
        if self.writes:
            self.log.append(rows)
        if self.g.sites == "round_robin" and grow_now:
            self.turn = (self.names.index(grow_now[0]) + 1) % len(self.names)
        self.event += 1
        trainer.prepare_model()
        added = ", ".join(f"{r['site']}+{r['added']}" + (f" ({r['reason']})" if r["reason"] else "") for r in rows)
        seconds = self._clock() - started
        log.info("growth %d at step %d: %s (%.1fs)", self.event, trainer.step, added or "nothing", seconds)
        return seconds

    # --- one event -----------------------------------------------------------------------------
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
        pending = self._growable_names()
        names = policy.pick_sites(self.g.sites, pending, self.names, self.turn) if self.g.sites != "best_gain" \
            else pending
        sites = self.model.sites()
        requested = {n: policy.requested_count(self.g, sites[n].width, self.start[n], self.targets[n]) for n in names}
        rows = skipped_rows(self.event + 1, trainer.step, self.steps_per_epoch, self.g.method, sites, requested,
                            count_params(self.model))
        if self.writes:
            self.log.append(rows)
        self.event += 1
        seconds = self._clock() - started
        log.info("growth %d at step %d: not grown, growth.when=plateau did not fire (%.1fs)", self.event, trainer.step,
                 seconds)
        return seconds

    def _growable_names(self) -> list[str]:
        """Sites below their target width for which growth.param_budget leaves one neuron."""
        params = count_params(self.model)
        return [n for n, s in self.model.sites().items()
                if s.width < self.targets[n] and policy.affordable(self.g, params, s.params_per_neuron()) != 0]

    def _loss_fn(self, reduction: str):
        smoothing = self.cfg.trainer.label_smoothing
        return lambda logits, y: F.cross_entropy(logits.float(), y, reduction=reduction, label_smoothing=smoothing)

    def _propose(self, site, stats, gen) -> tuple[Proposal, list[tuple[str, int]]]:
        """The site's proposal and its trail: the neuron count after each stage that may cut it
        (requested by the schedule, then the adaptive rule, then the solver's rank threshold)."""
        g = self.g
        k = policy.requested_count(g, site.width, self.start[site.name], self.targets[site.name])
        trail = [("", k)]
        unusable = unusable_stats(stats, self.method.fits_gradient)
        if unusable:
            log.warning("growth %d: site %s not grown, its statistics are %s", self.event + 1, site.name,
                        "not finite" if unusable == "nonfinite" else "degenerate (zero gradient)")
            stats, k = zeroed(stats), 0
            trail.append((unusable, 0))
        solve_on = self._solve_device(stats.S1.device)
        if g.neurons == "adaptive" and k:
            k = adaptive_count(stats, projection=self.method.projection, noise_sigmas=g.noise_sigmas,
                               max_count=k, rel_eps=g.rel_eps, device=pick_solve_device(stats.S1.device, solve_on))
            trail.append(("adaptive", k))
        ctx = dataclasses.replace(self._event, generator=gen, solve_device=solve_on)
        proposal = self.method.propose(site, stats, k, ctx)
        trail.append(("rank", proposal.count))
        if g.when == "bottleneck" and not unusable and \
                not policy.bottleneck_fires(proposal.psi, float(stats.g2) / max(stats.n, 1), g.when_threshold):
            proposal = proposal.take(0)  # the trigger comes first: every later stage has 0
            trail = [trail[0], ("trigger", 0), *((stage, 0) for stage, _ in trail[1:])]
        return proposal, trail

    def _solve_device(self, device: torch.device) -> str:
        """growth.solve_device as "cpu" or "model", chosen once, on rank 0 (auto times the devices:
        ranks timing on their own could choose differently) and shared with every rank."""
        if self._solve_on is None:
            chosen = pick_solve_device(device, self.g.solve_device) if self.dist.is_main else None
            self._solve_on = self.dist.share(None if chosen is None else "cpu" if chosen.type == "cpu" else "model")
        return self._solve_on

    def _add_flops(self, flops: int) -> None:
        """Growth compute a method spends itself (EventContext.add_flops)."""
        self.flops += flops

    def _grow_site(self, model, site, proposal: Proposal, trail: list, search_batch, trainer,
                   base: float | None = None, z: torch.Tensor | None = None) -> dict:
        """Cap by the budget left, search gamma, insert; the site's growth.csv row. z: the search
        batch's inputs at the site's block (None: computed here, model.forward_to); every loss
        runs from the block on (model.forward_from). BatchNorm moments of the new channels: on
        the search batch. base: the search batch's loss now, if known."""
        t0 = self._clock()
        cap = policy.affordable(self.g, count_params(model), site.params_per_neuron())
        if cap is not None and cap < proposal.count:
            proposal = proposal.take(cap)
        trail = [*trail, ("budget", proposal.count)]
        neurons = fit_to_site(site, proposal.neurons)
        front, rest = split_at(model, site.name)
        if z is None:
            with torch.no_grad(), frozen_bn_stats(model):
                z = front(search_batch[0])
        search = (z, search_batch[1])
        moments = None
        if site.bn is not None and neurons.count and proposal.copy_of is None:  # net2net copies its BN channels
            moments = new_channel_moments(model, site, neurons, [z], forward=rest,
                                          reduce=self.dist.sum_ if self.dist.active else None)
        found = self._search(model, site, proposal, neurons, moments, search, rest, base)
        faults.reach("search")
        added = neurons.count if found.gamma > 0 else 0
        trail.append(("no_gain", added))
        width, (fanin_ref, fanout_ref) = site.width, existing_norms(site)
        shape = trainer.data.input_shape
        f_front, f_all = count_flops(model, shape, forward=front), count_flops(model, shape)
        if added:
            self._insert(site, proposal, neurons, moments, found.gamma, trainer.optimizer)
        fanin, fanout = neuron_norms(site.l1.weight[width:], site.l2.weight[:, width:])
        search_seconds = self._clock() - t0
        loss_after = measure(model, search, self._mean_loss, rest)
        return {
            "event": self.event + 1, "epoch": round(trainer.step / self.steps_per_epoch, 4), "step": trainer.step,
            "site": site.name, "method": self.g.method, "requested": trail[0][1], "added": added,
            "reason": cut_reason(trail), "width_after": site.width, "params_after": count_params(model),
            "psi": proposal.psi, "d_w": proposal.d_w,
            "lambdas_top": ";".join(f"{v:.4g}" for v in proposal.lambdas[:5].tolist()),
            "bottleneck_gain": proposal.bottleneck_gain, "first_order": self._slope(proposal), "gamma": found.gamma,
            "predicted_gain": -found.predicted, "loss_before": found.loss_before,
            "loss_candidate": found.loss_at_gamma, "loss_after": loss_after,
            "measured_gain": found.loss_before - loss_after, "fanin_norm": fanin, "fanin_ref": fanin_ref,
            "fanout_norm": fanout, "fanout_ref": fanout_ref, "search_seconds": search_seconds,
            # compute (see the module doc), not logged
            "_search_flops": (f_all - f_front) * (found.evaluations + 1), "_front": z, "_f_front": f_front,
        }

    def _slope(self, proposal: Proposal) -> float:
        """Predicted mean-loss change per gamma^2 of what is inserted (with dW2* if applied)."""
        return proposal.first_order - (proposal.d_w if self.g.apply_dw else 0.0)

    def _search(self, model, site, proposal: Proposal, neurons, moments, search_batch, forward,
                base: float | None) -> SearchResult:
        """gamma by line search; methods of amplitude "preserving" / "trained" and growth.normalize=mean_norm:
        gamma = 1 (no search)."""
        g, loss_mean = self.g, self._mean_loss
        if self.method.amplitude == "preserving":  # the function does not change
            before = base if base is not None else measure(model, search_batch, loss_mean, forward)
            return SearchResult(1.0 if neurons.count else 0.0, before, before, 0.0, int(base is None))
        if g.normalize == "mean_norm":  # the layers' scale is the amplitude: L(gamma = 1) measured, no search
            out = normalized(site, neurons, *(moments or (None, None)), "mean_norm", g.bn_init, g.gradmax_scale)
            slope = float((proposal.per_neuron.to(out.gain) * out.gain).sum())
            return at_gamma(model, site, out.neurons, None if out.mean is None else (out.mean, out.var), slope, 1.0,
                            search_batch, loss_mean, g.bn_init, forward=forward, base=base)
        if self.method.amplitude == "trained":  # inserted as trained: L(gamma = 1) measured, no search
            return at_gamma(model, site, neurons, moments, self._slope(proposal), 1.0, search_batch, loss_mean,
                            g.bn_init, forward=forward, base=base)
        update = weight_update_fn(site, proposal.dw2, proposal.db2) if g.apply_dw else None
        return line_search(model, site, neurons, moments, self._slope(proposal), search_batch, loss_mean,
                           g.line_search, update, g.bn_init, forward=forward, base=base,
                           attach=self.method.attach(site, proposal, neurons))

    def _insert(self, site, proposal: Proposal, neurons, moments, gamma: float, optimizer) -> None:
        """The method's insertion at gamma (GrowthMethod.insert: what the line search evaluated)."""
        self.method.insert(site, proposal, neurons, moments, gamma, optimizer)
