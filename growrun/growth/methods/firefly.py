"""Firefly neural architecture descent (Wu, Liu, Stone, Liu, NeurIPS 2020), new neurons: per site
`candidates` candidates (fan-in N(0, 0.1^2), fan-out U(-eps, eps)) trained for `steps` RMSprop
steps (learning rate `lr`) on the statistics batches with the rest of the network fixed; the
neurons of largest first-order loss decrease d loss / d scale are kept and inserted as trained
(gamma = 1, no line search; not function preserving). Splitting existing neurons (the paper's
other candidates) is not included. Defaults from the authors' code (github.com/klightz/Firefly,
method fireflyn). The formulas, the reference and the deviations: growrun/growth/firefly.py.

Options (growth.firefly): candidates per site (at least the neurons requested), steps (one
statistics batch each, cycled; null: one pass over the statistics batches, as the reference
makes one pass over its growth data), lr, eps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from growrun.fields import bounded

from .base import EventContext, GrowthMethod


@dataclass
class FireflyOptions:
    candidates: int = bounded(70, 1, help="candidate neurons per site (at least the neurons requested)")
    steps: Optional[int] = bounded(None, 0, help="RMSprop steps, one statistics batch each (null: one pass)")
    lr: float = bounded(1e-3, 0.0, lo_open=True, help="the candidates' learning rate (RMSprop)")
    eps: float = bounded(1e-2, 0.0, lo_open=True, help="candidates' fan-out drawn U(-eps, eps)")


class Firefly(GrowthMethod):
    name = "firefly"
    Options = FireflyOptions
    measures = "batches"
    amplitude = "trained"

    def propose(self, site, stats, count: int, ctx: EventContext):
        from growrun.growth.neurons import fit_site

        fit = fit_site(site, stats, self.name, conv_fanout=self.g.conv_fanout, solve_device=ctx.solve_device,
                       rel_eps=self.g.rel_eps)
        neurons, per_neuron = (ctx.hook or self.candidates(ctx))(site, max(int(count), 0))
        return fit.of(self.name, neurons, per_neuron)

    def candidates(self, ctx: EventContext):
        """The hook (site, count) -> (kept neurons, their scores) on this event's statistics
        batches: they run once through the network before the site's block (draws.split_at); the
        candidates train and are scored from the block on. Compute reported to ctx.add_flops:
        F_front per statistics sample, and 3 (F_rest + the candidates' FLOPs) per sample of each
        training step and of the score pass."""
        import torch

        from growrun.growth.draws import split_at
        from growrun.growth.firefly import firefly_candidates
        from growrun.models.site import frozen_bn_stats
        from growrun.models import count_flops

        if ctx.model is None:
            raise ValueError("method 'firefly' trains candidates on the model and the statistics batches: "
                             "EventContext needs model, batches and loss_fn")
        model, o, n = ctx.model, self.options, ctx.n_stats

        def hook(site, count):
            if not count:
                return firefly_candidates(model, site, [], None, 0).chosen()
            front, rest = split_at(model, site.name)
            with torch.no_grad(), frozen_bn_stats(model):
                batches = [(front(x), y) for x, y in ctx.batches]
            found = firefly_candidates(model, site, batches, ctx.loss_fn, count, n_candidates=o.candidates,
                                       steps=o.steps, lr=o.lr, eps=o.eps, generator=ctx.generator, forward=rest,
                                       reduce=ctx.reduce)
            f_front, f_all = count_flops(model, ctx.input_shape, forward=front), count_flops(model, ctx.input_shape)
            per_image = f_all - f_front + found.flops_per_image  # the rest of the network, with the candidates
            ctx.add_flops(int(f_front * n + 3 * per_image * (found.steps * n / max(1, len(batches)) + n)))
            return found.chosen()

        return hook
