"""Growth during training: the trainer asks `due(step)` after every optimizer step, and
`grow(trainer)` runs one growth event (tiny_math.md section 7):

    1. draw the statistics samples and a disjoint line-search batch from the training set
       (seeded by (seed, event): a resumed run redraws the same ones), no augmentation; on a
       training set too small for both, both draws shrink (policy.draw_sizes);
    2. one statistics pass over the sites that may grow (below their target, and at least one
       neuron within growth.param_budget);
    3. per chosen site: propose neurons (growrun.growth.neurons), cap them by the budget left,
       measure the new channels' moments for BatchNorm, line-search gamma
       (growrun.growth.linesearch), insert them (growrun.growth.surgery) with the optimizer
       state extended; with growth.apply_dw also L2 += gamma^2 dW2* on the existing columns,
       exactly what the line search evaluated;
    4. append one row per site to growth.csv, also when it gets no neuron.

A site may get fewer neurons than the schedule requested, 0 included; the row's `reason` names
the first stage that cut the count: "adaptive" (the adaptive rule kept fewer), "rank" (fewer
directions above the solver's threshold), "budget" (growth.param_budget), "no_gain" (the line
search found no gamma that lowers the loss), "nonfinite" / "degenerate" (the site's statistics
hold NaN or inf / a zero gradient: that site is not grown at this event, training goes on);
"" when all requested neurons were added.

With several ranks (trainer.dist, growrun.train.distributed) each rank takes its share of the
statistics batches and of the line-search batch, the statistics (sums) are summed across ranks
and every line-search loss is the global batch's mean, so all ranks take the same decisions;
only rank 0 writes growth.csv.

Compute (`flops`, cumulative, in the state): per event, at the width before it, with F the
forward FLOPs per image: 3 F per statistics sample (forward and backward), F per sample of each
BatchNorm moments pass, F per line-search image per loss evaluated (the search's evaluations
and the loss after insertion).

Function-preserving methods (gradmax, zero) skip the line search: gamma = 1, their fan-out
scale is their own. Statistics and line search run in training mode (the mode training
continues in) without touching BatchNorm running statistics.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growrun import faults
from growrun.data.loader import derive_seed
from growrun.growth import policy
from growrun.growth.adaptive import adaptive_count
from growrun.growth.linesearch import SearchResult, line_search
from growrun.growth.neurons import Proposal, propose
from growrun.growth.scale import existing_norms, neuron_norms, rebalance, rebalance_factors
from growrun.growth.site import frozen_bn_stats
from growrun.growth.stats import collect_statistics
from growrun.growth.surgery import apply_weight_update, fit_to_site, insert_neurons, new_channel_moments
from growrun.models import count_params, full_site_widths
from growrun.train.distributed import Single
from growrun.train.outputs import CsvLog

log = logging.getLogger("growrun")
_GROWTH_STREAM = 0x67726F77
FUNCTION_PRESERVING = ("gradmax", "zero")
COLUMNS = [
    "event", "epoch", "step", "site", "method", "requested", "added", "reason", "width_after", "params_after",
    "psi", "d_w", "lambdas_top", "bottleneck_gain", "first_order", "gamma", "predicted_gain",
    "loss_before", "loss_candidate", "loss_after", "measured_gain",
    "fanin_norm", "fanin_ref", "fanout_norm", "fanout_ref",
    "stats_seconds", "solve_seconds", "search_seconds",
]


def draw_samples(split, normalize, n_stats: int, n_search: int, batch_size: int, gen: torch.Generator,
                 memory_format: torch.memory_format):
    """Statistics batches (of batch_size; a last batch of one image joins the one before) and
    the held line-search batch: disjoint, drawn by gen from the split, normalised, not
    augmented; both shrunk by policy.draw_sizes when the split cannot hold them."""
    n_stats, n_search = policy.draw_sizes(len(split), n_stats, n_search)
    order = torch.randperm(len(split), generator=gen)[: n_stats + n_search].to(split.images.device)

    def batch(idx):
        x = normalize(split.images.index_select(0, idx))
        return x.contiguous(memory_format=memory_format), split.labels.index_select(0, idx)

    return [batch(idx) for idx in _chunks(order[:n_stats], batch_size)], batch(order[n_stats:])


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """idx in chunks of `size`; a last chunk of a single entry is merged into the one before
    (BatchNorm in training mode needs 2 values per channel)."""
    chunks = list(idx.split(size))
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


class GrowthController:
    def __init__(self, cfg, run_dir: Path, model, steps_per_epoch: int, n_train: int):
        self.cfg, self.g, self.steps_per_epoch = cfg, cfg.growth, steps_per_epoch
        self.schedule = set(policy.growth_steps(self.g, steps_per_epoch, cfg.trainer.epochs))
        sites = model.sites()
        self.names = list(sites)
        current = [s.width for s in sites.values()]
        self.targets = policy.target_widths(self.g, self.names, full_site_widths(model.arch(), cfg.model), current)
        self.start = dict(zip(self.names, current))
        self.event, self.turn = 0, 0
        self.flops = 0  # growth compute so far (see the module doc)
        self.model = model  # grown in place: the same object for the whole run
        self.log = CsvLog(run_dir / "growth.csv", COLUMNS)
        self.writes = True  # start_log(write=False) on ranks other than 0
        _log_draw_sizes(self.g, n_train)

    # --- the trainer's interface -------------------------------------------------------------
    def start_log(self, keep_until_step: int | None, write: bool = True) -> None:
        self.writes = write  # False on ranks other than 0
        if not write:
            return
        self.log.start(keep=(lambda row: int(row["step"]) <= keep_until_step) if keep_until_step is not None else None)

    def due(self, step: int) -> bool:
        return step in self.schedule and bool(self._growable_names())

    def state_dict(self) -> dict:
        return {"event": self.event, "turn": self.turn, "start": dict(self.start), "flops": self.flops}

    def load_state_dict(self, state: dict) -> None:
        self.event, self.turn, self.start = state["event"], state["turn"], dict(state["start"])
        self.flops = state.get("flops", 0)  # absent in older checkpoints

    def grow(self, trainer) -> float:
        started = time.time()
        model = trainer.model
        gen = torch.Generator().manual_seed(derive_seed(_GROWTH_STREAM, self.cfg.seed, self.event))
        stats_batches, search_batch = draw_samples(trainer.data.train, trainer.train_loader.normalize, self.g.samples,
                                                   self.g.line_search.batch_size, self.g.stats_batch_size, gen,
                                                   trainer.memory_format)
        dist = getattr(trainer, "dist", None) or Single()
        forward = trainer.flops_per_image  # at the width before the event (the trainer keeps it current)
        n_stats, n_search = sum(len(y) for _, y in stats_batches), len(search_batch[1])
        stats_batches, search_batch = [dist.shard(b) for b in stats_batches], dist.shard(search_batch)
        self._mean_loss = self._loss_fn("mean") if not dist.active else _global_mean_loss(self._loss_fn("sum"), dist)
        sites = model.sites()
        pending = self._growable_names()
        grow_now = policy.pick_sites(self.g.sites, pending, self.names, self.turn) if self.g.sites != "best_gain" else pending
        t0 = time.time()
        stats = collect_statistics(model, [sites[n] for n in grow_now], stats_batches, self._loss_fn("sum"),
                                   conv_fanout=self.g.conv_fanout)
        for site_stats in stats.values():
            dist.sum_(site_stats.tensors())
        stats_seconds = (time.time() - t0) / max(1, len(grow_now))
        faults.reach("stats")
        proposals, trails, solve_seconds = {}, {}, {}
        for name in grow_now:
            t0 = time.time()
            proposals[name], trails[name] = self._propose(sites[name], stats[name], gen)
            solve_seconds[name] = time.time() - t0
        if self.g.sites == "best_gain":
            scores = {n: _score(p, sites[n]) for n, p in proposals.items()}
            grow_now = policy.pick_sites("best_gain", pending, self.names, self.turn, scores)
        rows = [self._grow_site(model, sites[n], proposals[n], trails[n], stats_batches, search_batch, trainer)
                for n in grow_now]
        for row, name in zip(rows, grow_now):
            row.update(stats_seconds=stats_seconds, solve_seconds=solve_seconds[name])
        passes = 3 * n_stats + sum(n_stats * r.pop("_moments") + n_search * (r.pop("_evaluations") + 1) for r in rows)
        self.flops += forward * passes
        if self.writes:
            self.log.append(rows)
        if self.g.sites == "round_robin" and grow_now:
            self.turn = (self.names.index(grow_now[0]) + 1) % len(self.names)
        self.event += 1
        trainer.prepare_model()
        added = ", ".join(f"{r['site']}+{r['added']}" + (f" ({r['reason']})" if r["reason"] else "") for r in rows)
        log.info("growth %d at step %d: %s (%.1fs)", self.event, trainer.step, added or "nothing", time.time() - started)
        return time.time() - started

    # --- one event -----------------------------------------------------------------------------
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
        unusable = _unusable(stats, g.method)
        if unusable:
            log.warning("growth %d: site %s not grown, its statistics are %s", self.event + 1, site.name,
                        "not finite" if unusable == "nonfinite" else "degenerate (zero gradient)")
            stats, k = _zeroed(stats), 0
            trail.append((unusable, 0))
        if g.neurons == "adaptive" and k:
            k = adaptive_count(stats, projection=g.method != "tiny_noproj", noise_sigmas=g.noise_sigmas,
                               max_count=k, rel_eps=g.rel_eps)
            trail.append(("adaptive", k))
        proposal = propose(site, stats, g.method, k, conv_fanout=g.conv_fanout, gradmax_scale=g.gradmax_scale,
                           rel_eps=g.rel_eps, generator=gen)
        trail.append(("rank", proposal.count))
        return proposal, trail

    def _grow_site(self, model, site, proposal: Proposal, trail: list, stats_batches, search_batch, trainer) -> dict:
        """Cap by the budget left, search gamma, insert; the site's growth.csv row."""
        t0 = time.time()
        cap = policy.affordable(self.g, count_params(model), site.params_per_neuron())
        if cap is not None and cap < proposal.count:
            proposal = proposal.take(cap)
        trail = [*trail, ("budget", proposal.count)]
        neurons = fit_to_site(site, proposal.neurons)
        moments = new_channel_moments(model, site, neurons, [x for x, _ in stats_batches]) \
            if site.bn is not None and neurons.count else None
        found = self._search(model, site, proposal, neurons, moments, search_batch)
        faults.reach("search")
        added = neurons.count if found.gamma > 0 else 0
        trail.append(("no_gain", added))
        width, (fanin_ref, fanout_ref) = site.width, existing_norms(site)
        if added:
            self._insert(site, proposal, neurons, moments, found.gamma, trainer.optimizer)
        fanin, fanout = neuron_norms(site.l1.weight[width:], site.l2.weight[:, width:])
        search_seconds = time.time() - t0
        loss_after = _measure(model, search_batch, self._mean_loss)
        return {
            "event": self.event + 1, "epoch": round(trainer.step / self.steps_per_epoch, 4), "step": trainer.step,
            "site": site.name, "method": self.g.method, "requested": trail[0][1], "added": added,
            "reason": _cut_reason(trail), "width_after": site.width, "params_after": count_params(model),
            "psi": proposal.psi, "d_w": proposal.d_w,
            "lambdas_top": ";".join(f"{v:.4g}" for v in proposal.lambdas[:5].tolist()),
            "bottleneck_gain": proposal.bottleneck_gain, "first_order": self._slope(proposal), "gamma": found.gamma,
            "predicted_gain": -found.predicted, "loss_before": found.loss_before,
            "loss_candidate": found.loss_at_gamma, "loss_after": loss_after,
            "measured_gain": found.loss_before - loss_after, "fanin_norm": fanin, "fanin_ref": fanin_ref,
            "fanout_norm": fanout, "fanout_ref": fanout_ref, "search_seconds": search_seconds,
            "_moments": int(moments is not None), "_evaluations": found.evaluations,  # compute, not logged
        }

    def _slope(self, proposal: Proposal) -> float:
        """Predicted mean-loss change per gamma^2 of what is inserted (with dW2* if applied)."""
        return proposal.first_order - (proposal.d_w if self.g.apply_dw else 0.0)

    def _search(self, model, site, proposal: Proposal, neurons, moments, search_batch) -> SearchResult:
        """gamma by line search; function-preserving methods: gamma = 1 (no search)."""
        g, loss_mean = self.g, self._mean_loss
        if g.method in FUNCTION_PRESERVING:  # the function does not change
            before = _measure(model, search_batch, loss_mean)
            return SearchResult(1.0 if neurons.count else 0.0, before, before, 0.0, 1)
        update = self._update_fn(site, proposal) if g.apply_dw else None
        return line_search(model, site, neurons, moments, self._slope(proposal), search_batch, loss_mean,
                           g.line_search, update, g.bn_init)

    def _insert(self, site, proposal: Proposal, neurons, moments, gamma: float, optimizer) -> None:
        """What the line search evaluated at gamma: L2 += gamma^2 dW2* on the existing columns
        (growth.apply_dw), then the neurons at amplitude gamma (moments gamma m, gamma^2 v);
        growth.normalize=fan_in rebalances them first (fan-in c_k times, fan-out 1 / c_k, moments
        c_k m, c_k^2 v: the same function, growrun.growth.scale)."""
        if self.g.apply_dw:
            apply_weight_update(site, proposal.dw2, proposal.db2, gamma * gamma)
        neurons = neurons.scaled(gamma)
        c = rebalance_factors(site, neurons.w1) if self.g.normalize == "fan_in" else None
        if c is not None:
            neurons = rebalance(neurons, c)
        mean, var = moments if moments is not None else (None, None)
        if mean is not None:
            scale = gamma if c is None else gamma * c.to(mean)
            mean, var = scale * mean, scale * scale * var
        insert_neurons(site, neurons, mean, var, optimizer, self.g.bn_init)

    @staticmethod
    def _update_fn(site, proposal: Proposal):
        w0 = site.l2.weight.detach().clone()
        b0 = None if site.l2.bias is None else site.l2.bias.detach().clone()

        @torch.no_grad()
        def update(scale: float) -> None:
            site.l2.weight.copy_(w0)
            if b0 is not None:
                site.l2.bias.copy_(b0)
            if scale:
                apply_weight_update(site, proposal.dw2, proposal.db2, scale)

        return update


def _global_mean_loss(loss_sum, dist):
    """The mean loss over every rank's share of a batch: sum of the shares' sums / their count."""
    def loss(logits, y):
        totals = [loss_sum(logits, y).detach().double(), torch.tensor(float(y.shape[0]), dtype=torch.float64,
                                                                        device=logits.device)]
        dist.sum_(totals)
        return totals[0] / totals[1]

    return loss


def _unusable(stats, method: str) -> str:
    """Why a site's statistics cannot be used: "nonfinite" (NaN / inf anywhere), "degenerate"
    (zero gradient energy g2: nothing for tiny / tiny_noproj / gradmax to fit), or "" if fine."""
    if not all(bool(torch.isfinite(t).all()) for t in stats.tensors()):
        return "nonfinite"
    fitted = method in ("tiny", "tiny_noproj", "gradmax")
    return "degenerate" if fitted and float(stats.g2) <= 0 else ""


def _zeroed(stats):
    """The same statistics with every sum zeroed (a proposal of 0 neurons from them is empty)."""
    return dataclasses.replace(stats, **{f: torch.zeros_like(getattr(stats, f))
                                         for f in ("S1", "S2", "M1_folds", "M2_folds", "P_folds", "g2")})


def _cut_reason(trail: list[tuple[str, int]]) -> str:
    """The first stage of the trail that lowered the neuron count ("" if none did)."""
    for (_, before), (stage, after) in zip(trail, trail[1:]):
        if after < before:
            return stage
    return ""


def _log_draw_sizes(g, n_train: int) -> None:
    """Check up front that the training set holds both growth draws; say so when they shrink."""
    n_stats, n_search = policy.draw_sizes(n_train, g.samples, g.line_search.batch_size)
    if (n_stats, n_search) != (g.samples, g.line_search.batch_size):
        log.info("growth draws shrunk to the %d training images: %d statistics samples (growth.samples=%d), "
                 "%d line-search images (growth.line_search.batch_size=%d)", n_train, n_stats, g.samples,
                 n_search, g.line_search.batch_size)


def _score(proposal: Proposal, site) -> float:
    """Expected first-order gain per added parameter (best_gain site choice)."""
    gain = proposal.bottleneck_gain if proposal.bottleneck_gain > 0 else -proposal.first_order
    return gain / max(1, proposal.count * site.params_per_neuron()) if proposal.count else -math.inf


@torch.no_grad()
def _measure(model, batch, loss_fn) -> float:
    with frozen_bn_stats(model):
        return float(loss_fn(model(batch[0]), batch[1]))
