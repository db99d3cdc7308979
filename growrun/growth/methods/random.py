"""Random neurons (the paper's baseline): He (kaiming normal, fan_in) draws, fan-in entries
N(0, 2 / fan_in(L1)) with bias 0, fan-out entries N(0, 2 / ((width + K) kh2 kw2)) (L2's fan-in
after growth; for conv at the centre tap). Then omega_k -> -omega_k wherever
alpha_k^T M1 omega_k > 0: the same random direction with the sign whose first-order loss change
is <= 0. Amplitude by line search, as TINY's.
"""
from __future__ import annotations

from .base import EventContext, GrowthMethod


def he_fan_ins(site, d1: int, count: int, generator):
    """(count, d1) fan-ins of He draws, bias entries 0 (random and zero draw the same)."""
    from growrun.growth.neurons import he_normal

    bias1 = site.l1.bias is not None
    alpha = he_normal((count, d1), d1 - bias1, generator)
    if bias1:
        alpha[:, -1] = 0.0
    return alpha


class Random(GrowthMethod):
    name = "random"

    def propose(self, site, stats, count: int, ctx: EventContext):
        import torch

        from growrun.growth.neurons import fit_site, he_normal

        g = self.g
        fit = fit_site(site, stats, self.name, conv_fanout=g.conv_fanout, solve_device=ctx.solve_device,
                       rel_eps=g.rel_eps)
        count, d1, m = max(int(count), 0), stats.dims[0], stats.dims[2]
        alpha = he_fan_ins(site, d1, count, ctx.generator).to(fit.device)
        kk = site.l2.kernel_size[0] * site.l2.kernel_size[1] if site.is_conv else 1
        omega = he_normal((count, m), (site.width + count) * kk, ctx.generator).to(fit.device)
        per = (alpha @ fit.ns.M1 * omega).sum(1)  # alpha_k^T M1 omega_k
        omega = torch.where((per > 0).unsqueeze(1), -omega, omega)
        return fit.proposal(self.name, alpha, omega)
