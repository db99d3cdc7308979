"""One growth event (tiny_math.md section 7), as named steps over a GrowthEvent:

    draw        the statistics samples and a disjoint line-search batch from the training set
                (seeded by (seed, event): a resumed run redraws the same ones), not augmented; on
                a training set too small for both, both draws shrink (policy.draw_sizes)
    measure     the statistics of the sites that may grow (below their target, and one neuron
                within growth.param_budget): one pass over the samples, or with
                growth.stats=training the sums recorded on the last training steps
                (growrun.growth.stats_training); summed across ranks
    propose     per site: the neuron count the schedule asks for, cut by unusable statistics and
                the adaptive rule, then the method's proposal (growrun.growth.methods) and the
                growth.when=bottleneck trigger
    choose      growth.sites=best_gain: the sites in order of expected gain per parameter
    grow        per chosen site: cap by the budget left, the new BatchNorm channels' moments,
                gamma (the line search, or 1 for methods that preserve the function or insert as
                trained), the method's insertion with the optimizer state extended
    finish      one growth.csv row per site (also when it got no neuron; its `reason` and
                `trigger` say why: growrun.growth.growth_log), the compute (compute.py), the
                trainer's model prepared again (memory format, DDP wrapper)

With several ranks (growrun.train.distributed) each rank takes its share of the statistics
batches and of the line-search batch, the statistics (sums) and the new channels' moments are
summed across ranks and every line-search loss is the global batch's mean, so all ranks take the
same decisions; only rank 0 writes growth.csv.

The line-search batch runs through the network's front (before the first site's block) once
per event and is carried from block to block (draws.advance; a fresh front for a site before
the last one), and each loss the search evaluates runs from the site's block on (models'
forward_to / forward_between / forward_from: the same numbers, less compute); a site's L(0) is
the loss measured after the site before it. The new BatchNorm channels' moments are measured on
the search batch at the site (from its block to L1), so that their BatchNorm is the identity on
the batch the line search measures. Statistics and line search run in training mode (the mode
training continues in) without touching BatchNorm running statistics.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from growrun import faults
from growrun.data.loader import derive_seed
from growrun.growth import policy
from growrun.growth.adaptive import adaptive_count
from growrun.growth.draws import advance, draw_samples, global_mean_loss, measure, split_at
from growrun.growth.growth_log import cut_reason, score, unusable_stats, zeroed
from growrun.growth.linesearch import SearchResult, at_gamma, line_search
from growrun.growth.methods import EventContext
from growrun.growth.neurons import Proposal
from growrun.growth.scale import existing_norms, neuron_norms, normalized
from growrun.models.site import frozen_bn_stats
from growrun.growth.solve_device import solve_device as pick_solve_device
from growrun.growth.stats import collect_statistics
from growrun.growth.surgery import fit_to_site, new_channel_moments, weight_update_fn
from growrun.models import count_flops, count_params
from growrun.train.events.compute import EventCompute

log = logging.getLogger("growrun")
_GROWTH_STREAM = 0x67726F77


@dataclass
class SiteGrowth:
    """What the event decided for one site so far."""
    proposal: Proposal
    trail: list  # (stage, neuron count after it): the count after each stage that may cut it
    solve_seconds: float = 0.0
    row: dict = field(default_factory=dict)  # its growth.csv row, once grown


class GrowthEvent:
    """One event of the controller `ctl` (growrun.train.events.controller) on `trainer`."""

    def __init__(self, ctl, trainer, recording=None):
        self.ctl, self.trainer, self.g, self.method = ctl, trainer, ctl.g, ctl.method
        self.model, self.dist = trainer.model, ctl.dist
        self.recording = recording  # growth.stats=training: the window's sums (None: a pass)
        self.generator = torch.Generator().manual_seed(derive_seed(_GROWTH_STREAM, ctl.cfg.seed, ctl.event))
        self.sites = self.model.sites()
        self.pending = ctl.growable_names()  # may grow now
        self.names = self._in_turn(self.pending)  # to measure and grow, in order
        self.stats: dict = {}
        self.stats_seconds = 0.0
        self.grown: dict[str, SiteGrowth] = {}
        self.compute: EventCompute | None = None

    # --- the steps --------------------------------------------------------------------------------
    def draw(self) -> None:
        g, tr = self.g, self.trainer
        stats_batches, search_batch = draw_samples(tr.data.train, tr.train_loader.normalize,
                                                   0 if self.recording else g.samples, g.line_search.batch_size,
                                                   g.stats_batch_size, self.generator, tr.memory_format)
        n_stats, n_search = sum(len(y) for _, y in stats_batches), len(search_batch[1])
        self.compute = EventCompute(tr.flops_per_image, n_stats, n_search)  # F at the width before the event
        self.stats_batches = [self.dist.shard(b) for b in stats_batches]
        self.search_batch = self.dist.shard(search_batch)
        self.mean_loss = self.ctl.loss_fn("mean") if not self.dist.active else \
            global_mean_loss(self.ctl.loss_fn("sum"), self.dist)

    def measure(self) -> float:
        """The statistics of the sites to grow; returns the seconds recording them took during
        training (growth.stats=training), which count as growth time too."""
        t0, window_seconds = self.ctl.clock(), 0.0
        if self.recording is not None:
            window_seconds = self.recording.seconds
            self.stats = self.recording.finish()
            self.names = [n for n in self.stats if n in self.pending]
        else:
            self.stats = collect_statistics(self.model, [self.sites[n] for n in self.names], self.stats_batches,
                                            self.ctl.loss_fn("sum"), conv_fanout=self.g.conv_fanout)
        for site_stats in self.stats.values():
            self.dist.sum_(site_stats.tensors())
        self.stats_seconds = (self.ctl.clock() - t0 + window_seconds) / max(1, len(self.names))
        faults.reach("stats")
        return window_seconds

    def propose(self) -> None:
        context = EventContext(generator=self.generator, model=self.model, batches=self.stats_batches,
                               loss_fn=self.ctl.loss_fn("sum"), reduce=self.dist.sum_ if self.dist.active else None,
                               input_shape=self.trainer.data.input_shape, n_stats=self.compute.n_stats,
                               add_flops=self.compute.add)
        for name in self.names:
            t0 = self.ctl.clock()
            proposal, trail = self._propose_site(self.sites[name], self.stats[name], context)
            self.grown[name] = SiteGrowth(proposal, trail, self.ctl.clock() - t0)

    def choose(self) -> None:
        if self.g.sites == "best_gain":
            scores = {n: score(s.proposal, self.sites[n]) for n, s in self.grown.items()}
            self.names = policy.pick_sites("best_gain", self.pending, self.ctl.names, self.ctl.turn, scores)

    def grow(self) -> None:
        """Each chosen site in turn; the search batch carried from one site's block to the next."""
        base, z = None, None  # L(0): the loss after the site before (same batch and model)
        for i, name in enumerate(self.names):
            z, flops = self._grow_site(self.sites[name], self.grown[name], base, z)
            base = self.grown[name].row["loss_after"]
            z = advance(self.model, name, self.names[i + 1], z) if i + 1 < len(self.names) else None
            self.compute.site(*flops, carried=z is not None)

    def finish(self) -> list[dict]:
        rows = []
        for name in self.names:
            s = self.grown[name]
            fired = not any(stage == "trigger" for stage, _ in s.trail)
            rows.append({**s.row, "stats_seconds": self.stats_seconds, "solve_seconds": s.solve_seconds,
                         "samples": self.stats[name].n, "trigger": self.g.when if fired else ""})
        return rows

    # --- one site ---------------------------------------------------------------------------------
    def _in_turn(self, pending: list[str]) -> list[str]:
        g = self.g
        return policy.pick_sites(g.sites, pending, self.ctl.names, self.ctl.turn) if g.sites != "best_gain" else pending

    def _propose_site(self, site, stats, context: EventContext) -> tuple[Proposal, list[tuple[str, int]]]:
        """The site's proposal and its trail (requested by the schedule, unusable statistics, the
        adaptive rule, the solver's rank threshold, the bottleneck trigger)."""
        g, ctl = self.g, self.ctl
        k = policy.requested_count(g, site.width, ctl.start[site.name], ctl.targets[site.name])
        trail = [("", k)]
        unusable = unusable_stats(stats, self.method.fits_gradient)
        if unusable:
            log.warning("growth %d: site %s not grown, its statistics are %s", ctl.event + 1, site.name,
                        "not finite" if unusable == "nonfinite" else "degenerate (zero gradient)")
            stats, k = zeroed(stats), 0
            trail.append((unusable, 0))
        solve_on = ctl.solve_device(stats.S1.device)
        if g.neurons == "adaptive" and k:
            k = adaptive_count(stats, projection=self.method.projection, noise_sigmas=g.noise_sigmas,
                               max_count=k, rel_eps=g.rel_eps, device=pick_solve_device(stats.S1.device, solve_on))
            trail.append(("adaptive", k))
        proposal = self.method.propose(site, stats, k, dataclasses.replace(context, solve_device=solve_on))
        trail.append(("rank", proposal.count))
        if g.when == "bottleneck" and not unusable and \
                not policy.bottleneck_fires(proposal.psi, float(stats.g2) / max(stats.n, 1), g.when_threshold):
            proposal = proposal.take(0)  # the trigger comes first: every later stage has 0
            trail = [trail[0], ("trigger", 0), *((stage, 0) for stage, _ in trail[1:])]
        return proposal, trail

    def _grow_site(self, site, s: SiteGrowth, base: float | None, z: torch.Tensor | None) -> tuple:
        """Cap by the budget left, search gamma, insert; fills s.row (growth.csv). Returns the
        search batch's inputs at the site's block (z: given when carried, else computed here) and
        the site's compute (F_front, F_rest, losses evaluated) for EventCompute.site."""
        g, model, trainer = self.g, self.model, self.trainer
        t0 = self.ctl.clock()
        proposal = s.proposal
        cap = policy.affordable(g, count_params(model), site.params_per_neuron())
        if cap is not None and cap < proposal.count:
            proposal = proposal.take(cap)
        trail = [*s.trail, ("budget", proposal.count)]
        neurons = fit_to_site(site, proposal.neurons)
        front, rest = split_at(model, site.name)
        if z is None:
            with torch.no_grad(), frozen_bn_stats(model):
                z = front(self.search_batch[0])
        search = (z, self.search_batch[1])
        moments = None
        if site.bn is not None and neurons.count and proposal.copy_of is None:  # copies take their BN channels
            moments = new_channel_moments(model, site, neurons, [z], forward=rest,
                                          reduce=self.dist.sum_ if self.dist.active else None)
        found = self._search(site, proposal, neurons, moments, search, rest, base)
        faults.reach("search")
        added = neurons.count if found.gamma > 0 else 0
        trail.append(("no_gain", added))
        width, (fanin_ref, fanout_ref) = site.width, existing_norms(site)
        shape = trainer.data.input_shape
        f_front, f_all = count_flops(model, shape, forward=front), count_flops(model, shape)
        if added:
            self.method.insert(site, proposal, neurons, moments, found.gamma, trainer.optimizer)
        fanin, fanout = neuron_norms(site.l1.weight[width:], site.l2.weight[:, width:])
        search_seconds = self.ctl.clock() - t0
        loss_after = measure(model, search, self.mean_loss, rest)
        s.row = {
            "event": self.ctl.event + 1, "epoch": round(trainer.step / self.ctl.steps_per_epoch, 4),
            "step": trainer.step, "site": site.name, "method": g.method, "requested": trail[0][1], "added": added,
            "reason": cut_reason(trail), "width_after": site.width, "params_after": count_params(model),
            "psi": proposal.psi, "d_w": proposal.d_w,
            "lambdas_top": ";".join(f"{v:.4g}" for v in proposal.lambdas[:5].tolist()),
            "bottleneck_gain": proposal.bottleneck_gain, "first_order": self._slope(proposal), "gamma": found.gamma,
            "predicted_gain": -found.predicted, "loss_before": found.loss_before,
            "loss_candidate": found.loss_at_gamma, "loss_after": loss_after,
            "measured_gain": found.loss_before - loss_after, "fanin_norm": fanin, "fanin_ref": fanin_ref,
            "fanout_norm": fanout, "fanout_ref": fanout_ref, "search_seconds": search_seconds,
        }
        return z, (f_front, f_all - f_front, found.evaluations + 1)

    def _slope(self, proposal: Proposal) -> float:
        """Predicted mean-loss change per gamma^2 of what is inserted (with dW2* if applied)."""
        return proposal.first_order - (proposal.d_w if self.g.apply_dw else 0.0)

    def _search(self, site, proposal: Proposal, neurons, moments, search_batch, forward,
                base: float | None) -> SearchResult:
        """gamma by line search; methods of amplitude "preserving" / "trained" and
        growth.normalize=mean_norm: gamma = 1 (no search)."""
        g, model, loss_mean = self.g, self.model, self.mean_loss
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
