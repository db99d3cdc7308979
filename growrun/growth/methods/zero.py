"""Zero fan-out neurons (function preserving): fan-ins drawn as random's (He, bias 0), fan-outs 0,
so the network is unchanged and the first-order change is 0; inserted at gamma = 1, no search.
Training then moves the fan-outs from 0 (their gradient h_k g is not 0).
"""
from __future__ import annotations

from .base import EventContext, GrowthMethod
from .random import he_fan_ins


class Zero(GrowthMethod):
    name = "zero"
    amplitude = "preserving"
    normalize = ("fan_in", "none")
    normalize_why = "whose new fan-outs are 0 (nothing to scale)"

    def propose(self, site, stats, count: int, ctx: EventContext):
        import torch

        from growrun.growth.neurons import fit_site

        g = self.g
        fit = fit_site(site, stats, self.name, conv_fanout=g.conv_fanout, solve_device=ctx.solve_device,
                       rel_eps=g.rel_eps)
        count = max(int(count), 0)
        alpha = he_fan_ins(site, stats.dims[0], count, ctx.generator).to(fit.device)
        omega = torch.zeros(count, stats.dims[2], dtype=torch.float64, device=fit.device)
        return fit.proposal(self.name, alpha, omega)
