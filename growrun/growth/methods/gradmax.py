"""GradMax (Evci, van Merrienboer, Unterthiner, Vladymyrov, Pedregosa, ICLR 2022): new neurons with
zero fan-in (the function is preserved) whose fan-outs maximise the gradient norm of the new
weights: omega_k = the top-K right singular vectors of M1 (growrun.growth.solve.gradmax_directions),
each scaled to growth.gradmax_scale x the mean norm of the existing fan-outs W2[:, j] (conv: the
whole kernel slice; a width-0 site: the norm of an L2 column under He init at its new width K,
sqrt(2 m / K)). Inserted at gamma = 1, no line search.
"""
from __future__ import annotations

from .base import EventContext, GrowthMethod


class GradMax(GrowthMethod):
    name = "gradmax"
    amplitude = "preserving"
    fits_gradient = True
    normalize = ("fan_in", "none", "mean_norm")
    normalize_why = "whose fan-outs are set by growth.gradmax_scale (its zero fan-ins leave nothing to rebalance)"

    def propose(self, site, stats, count: int, ctx: EventContext):
        import torch

        from growrun.growth.neurons import fit_site, reference_norm
        from growrun.growth.solve import gradmax_directions

        g = self.g
        fit = fit_site(site, stats, self.name, conv_fanout=g.conv_fanout, solve_device=ctx.solve_device,
                       rel_eps=g.rel_eps)
        dirs, _ = gradmax_directions(fit.ns.M1, max(int(count), 0), g.rel_eps)
        omega = dirs * (g.gradmax_scale * reference_norm(site, dirs.shape[0]))
        alpha = torch.zeros(dirs.shape[0], stats.dims[0], dtype=torch.float64, device=fit.device)
        return fit.proposal(self.name, alpha, omega)
