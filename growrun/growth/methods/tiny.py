"""TINY (Verbockhaven, Rudkiewicz, Chevallier, Charpiat, TMLR 2024; tiny_math.md sections 3-4):
the neurons that best reduce the site's expressivity bottleneck, from the whitened, projected
least squares + SVD of the backprop statistics (growrun.growth.solve.tiny_solve):

    N = -M1 + P S2^+ M2  (tiny: the part of the gradient the best update dW2* cannot follow)
    N = -M1              (tiny_noproj: the whole gradient, no projection)
    S1^(-1/2) N = sum_k lambda_k u_k w_k^T,  alpha_k = S1^(-1/2) u_k sqrt(lambda_k),
    omega_k = w_k sqrt(lambda_k), amplitude gamma by line search.

growth.conv_fanout=full (the tiny_full preset): a new channel's whole L2 kernel as fan-out,
solved from shifted-patch statistics (growrun.growth.fullconv; approximately optimal, the
centre-tap form is exact); not with growth.stats=training or growth.neurons=adaptive.
"""
from __future__ import annotations

from .base import EventContext, GrowthMethod


class Tiny(GrowthMethod):
    name = "tiny"
    presets = ("tiny", "tiny_full")
    fits_gradient = True
    full_fanout = True
    projection = True

    def refuse(self, g, conv_model: bool) -> str | None:
        if g.conv_fanout == "full" and conv_model:
            if g.stats == "training":
                return ("growth.conv_fanout=full: not with growth.stats=training (the training steps record the "
                        "centre-tap sums only); use growth.stats=pass or growth.conv_fanout=center")
            if g.neurons == "adaptive":
                return ("growth.conv_fanout=full: not with growth.neurons=adaptive (its per-fold noise estimate is "
                        "centre-tap only); use growth.neurons=to_target|fixed or growth.conv_fanout=center")
        return super().refuse(g, conv_model)

    def propose(self, site, stats, count: int, ctx: EventContext):
        from growrun.growth import fullconv
        from growrun.growth.neurons import fit_site
        from growrun.growth.solve import tiny_matrix, tiny_solve

        g = self.g
        fit = fit_site(site, stats, self.name, full_fanout=self.full_fanout, conv_fanout=g.conv_fanout,
                       solve_device=ctx.solve_device, rel_eps=g.rel_eps)
        count, ns = max(int(count), 0), fit.ns
        if g.conv_fanout == "full" and site.is_conv:  # M1full (d1, m * kh2 * kw2), omega whole kernels
            fs = fullconv.normalized(stats.full, ns.n, stats.dims[1], fit.device)
            N = fullconv.full_matrix(fs.M1, fs.P, fit.dW2T) if self.projection else fullconv.full_matrix(fs.M1)
            sol, M1 = fullconv.full_solve(fs, N, count, rel_eps=g.rel_eps, s0=fit.s0, g2=ns.g2), fs.M1
        else:
            N = tiny_matrix(ns.M1, ns.P, fit.dW2T) if self.projection else tiny_matrix(ns.M1)
            sol, M1 = tiny_solve(ns.S1, N, ns.M1, count, rel_eps=g.rel_eps, s0=fit.s0, g2=ns.g2), ns.M1
        return fit.proposal(self.name, sol.alpha, sol.omega, M1, sol.lambdas, sol.gain)


class TinyNoProj(Tiny):
    """TINY without the projection: N = -M1 (an ablation of the paper)."""
    name = "tiny_noproj"
    presets = ("tiny_noproj",)
    projection = False
