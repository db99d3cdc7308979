"""Splitting steepest descent (Liu, Wang, Wu, Liu, NeurIPS 2019; fast variant: Wang et al. 2019):
existing neurons i are split into two, fan-ins w_i + gamma v_i and w_i - gamma v_i (BatchNorm
channel copied), each with half the fan-out; v_i the eigenvector of the most negative eigenvalue
of i's splitting matrix, measured on the statistics batches (ReLU's sigma'': a Gaussian kernel
of width bandwidth x std(z); at most `patches` patches; Lanczos with `iters` steps per cycle for
fan-ins > 160, else exact eigh). The neurons of most negative eigenvalue are split (at most the
count requested, only negative ones); gamma (relative to the site's mean fan-in norm) by the
line search on the split itself. The same function at gamma = 0; the predicted change is second
order in gamma. The formulas, the reference and the choices: growrun/growth/splitting.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from growrun.fields import bounded

from .base import EventContext, GrowthMethod


@dataclass
class SplittingOptions:
    bandwidth: float = bounded(0.25, 0.0, lo_open=True, help="ReLU's sigma'' kernel width, x the neuron's std of z")
    patches: int = bounded(4096, 1, help="(sample, position) pairs kept (uniform, reweighted)")
    iters: int = bounded(32, 2, help="Lanczos steps per restart cycle (fan-ins above 160)")


class Splitting(GrowthMethod):
    name = "splitting"
    Options = SplittingOptions
    measures = "batches"
    splits = "split"
    normalize = ("fan_in", "none")
    normalize_why = "whose split neurons keep their fan-in and BatchNorm channel (never rebalanced)"
    apply_dw = False
    apply_dw_why = "whose split already changes the existing neurons' fan-outs (dW2* is for the unsplit layer)"

    def propose(self, site, stats, count: int, ctx: EventContext):
        from growrun.growth.neurons import fit_site

        fit = fit_site(site, stats, self.name, conv_fanout=self.g.conv_fanout, solve_device=ctx.solve_device,
                       rel_eps=self.g.rel_eps)
        sources, directions, per_neuron = (ctx.hook or self.splits_of(ctx))(site, max(int(count), 0))
        return fit.of(self.name, directions, per_neuron, copy_of=sources)

    def splits_of(self, ctx: EventContext):
        """The hook (site, count) -> (split neurons, their directions, predicted changes per
        gamma^2) on this event's statistics batches, which run through the network before the
        site's block once. Compute: F_front + 3 F_rest per statistics sample, plus the
        eigen-solve's products (ctx.add_flops)."""
        import torch

        from growrun.growth.draws import split_at
        from growrun.models.site import frozen_bn_stats
        from growrun.growth.splitting import proposer
        from growrun.models import count_flops

        if ctx.model is None:
            raise ValueError("method 'splitting' measures its splitting matrices on the model and the statistics "
                             "batches: EventContext needs model, batches and loss_fn")
        model, o = ctx.model, self.options

        def hook(site, count):
            front, rest = split_at(model, site.name)
            if count and site.width:
                with torch.no_grad(), frozen_bn_stats(model):
                    batches = [(front(x), y) for x, y in ctx.batches]
                f_front, f_all = count_flops(model, ctx.input_shape, forward=front), count_flops(model, ctx.input_shape)
                ctx.add_flops(int(ctx.n_stats * (f_front + 3 * (f_all - f_front))))
            else:
                batches = []
            return proposer(model, batches, ctx.loss_fn, forward=rest, bandwidth=o.bandwidth, patches=o.patches,
                            iters=o.iters, rel_eps=self.g.rel_eps, generator=ctx.generator, reduce=ctx.reduce,
                            add_flops=ctx.add_flops)(site, count)

        return hook

    def attach(self, site, proposal, neurons):
        from growrun.growth.splitting import attach

        return attach(site, proposal.copy_of, neurons)

    def insert(self, site, proposal, neurons, moments, gamma: float, optimizer) -> None:
        """neurons: the split directions; the split at amplitude gamma (splitting.insert_split)."""
        from growrun.growth.splitting import insert_split

        insert_split(site, proposal.copy_of, neurons, gamma, optimizer)
