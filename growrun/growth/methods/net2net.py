"""Net2Net (Net2WiderNet; Chen, Goodfellow, Shlens, ICLR 2016): each new neuron copies an existing
neuron j of the site (Proposal.copy_of): its L1 row (+ bias) and, at insertion, its BatchNorm
channel (weight, bias, running mean / variance: surgery.insert_copies), so the copy computes
exactly j's activation, in training mode (identical batch statistics) and in eval mode. The
fan-out W2[:, j] (conv: the whole input-channel kernel slice) is split among the r_j = 1 +
(copies of j) replicas: each gets W2[:, j] / r_j, so the function is unchanged (first order 0,
no line search, gamma = 1).

Options (growth.net2net): pick, which neurons are copied: "random" (a random permutation of the
site's neurons, cycled when more neurons are requested than exist: spread without replacement
as far as possible) or "largest" (by decreasing fan-out norm |W2[:, j]|, ties by index, cycled);
noise = s > 0, symmetry-breaking noise: copy k of j gets W2[:, j] / r_j + e_k and j itself
W2[:, j] / r_j - sum_k e_k, e_k ~ N(0, (s rms(W2[:, j] / r_j))^2) per entry: the replicas'
fan-outs differ (so do their gradients) while their sum, hence the function, stays exactly the
same (the paper's noise on the new fan-ins would change the function). Copies are made from the
site's weights at insertion (net2net_copies), so a neighbouring site grown earlier in the same
event is copied as it is then. A site of width 0 has nothing to copy (refused up front).
"""
from __future__ import annotations

from dataclasses import dataclass

from growrun.fields import bounded, choices

from .base import EventContext, GrowthMethod

PICKS = ("random", "largest")


@dataclass
class Net2NetOptions:
    pick: str = choices("random", *PICKS, help="neurons copied: random | largest (fan-out norm)")
    noise: float = bounded(0.0, 0.0, help="fan-out noise, relative (the function is kept)")


class Net2Net(GrowthMethod):
    name = "net2net"
    Options = Net2NetOptions
    amplitude = "preserving"
    splits = "copy"
    normalize = ("fan_in", "none")
    normalize_why = "whose copies are never rebalanced (they keep their originals' fan-ins and BatchNorm channels)"

    def propose(self, site, stats, count: int, ctx: EventContext):
        import torch

        from growrun.growth.neurons import fit_site

        g, o = self.g, self.options
        fit = fit_site(site, stats, self.name, conv_fanout=g.conv_fanout, solve_device=ctx.solve_device,
                       rel_eps=g.rel_eps)
        sources = net2net_sources(site, count, o.pick, ctx.generator)
        K = sources.numel()
        rel = None
        if o.noise > 0 and K:
            gdev = ctx.generator.device if ctx.generator is not None else "cpu"
            shape = (site.out_width, K, *site.l2.weight.shape[2:])
            rel = o.noise * torch.randn(*shape, generator=ctx.generator, dtype=torch.float64, device=gdev)
            rel = rel.to(site.l2.weight)
        neurons, _ = net2net_copies(site, sources, rel)
        per_neuron = torch.zeros(K, dtype=torch.float64)
        return fit.of(self.name, neurons, per_neuron, first_order=0.0, copy_of=sources, copy_noise=rel)

    def insert(self, site, proposal, neurons, moments, gamma: float, optimizer) -> None:
        """The copies as made from the weights now, the originals' fan-outs split, BN channels
        copied; never rebalanced (a copy's fan-in already has its original's norm, and its copied
        BN running statistics would no longer match a rescaled fan-in)."""
        from growrun.growth.surgery import insert_copies

        copies, l2_weight = net2net_copies(site, proposal.copy_of, proposal.copy_noise)
        insert_copies(site, proposal.copy_of, copies, l2_weight, optimizer)


def _fanout_norms(site):
    """|W2[:, j]| per existing neuron j (conv: the whole kernel slice), float64."""
    import torch

    W2 = site.l2.weight.detach().to(torch.float64)
    return W2.transpose(0, 1).reshape(site.width, -1).norm(dim=1)


def net2net_sources(site, count: int, pick: str = "random", generator=None):
    """The existing neuron each of `count` new neurons copies (int64 on L1's device): an order of
    the site's neurons (random: a permutation drawn by `generator`; largest: by decreasing fan-out
    norm, ties by index), cycled when count exceeds the width."""
    import torch

    if pick not in PICKS:
        raise ValueError(f"net2net pick={pick!r}; allowed: {', '.join(PICKS)}")
    dev = site.l1.weight.device
    count = max(int(count), 0)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    if site.width == 0:
        raise ValueError(f"site {site.name}: net2net copies existing neurons; a site of width 0 has none")
    if pick == "largest":
        order = torch.argsort(-_fanout_norms(site), stable=True)
    else:
        gdev = generator.device if generator is not None else "cpu"
        order = torch.randperm(site.width, generator=generator, device=gdev)
    return order.to(dev)[torch.arange(count, device=dev) % site.width]


def net2net_copies(site, sources, noise=None):
    """(the new neurons, the new value of L2's weight) for copies of the site's neurons
    `sources`, from the site's current weights (module doc): fan-in rows and bias entries copied,
    every replica of j (j and its copies) with fan-out W2[:, j] / r_j. `noise` (relative, L2's
    weight shape with len(sources) input units; fewer output rows are zero-padded: outputs added
    since it was drawn) adds e_k = noise_k * rms(W2[:, j] / r_j) to copy k and -e_k to j."""
    import torch

    from growrun.models.site import Neurons

    W1, W2 = site.l1.weight.detach(), site.l2.weight.detach()
    sources = sources.to(W1.device, torch.long)
    K = sources.numel()
    view = (1, -1, *([1] * (W2.dim() - 2)))
    replicas = 1 + torch.bincount(sources, minlength=site.width)[: site.width]
    split = W2 / replicas.to(W2).view(view)
    w2 = split.index_select(1, sources).clone()
    if noise is not None and K:
        noise = noise.to(W2)
        if noise.shape[0] < W2.shape[0]:
            noise = torch.cat([noise, noise.new_zeros(W2.shape[0] - noise.shape[0], *noise.shape[1:])])
        rms = w2.transpose(0, 1).reshape(K, -1).square().mean(1).sqrt()
        e = noise * rms.view(view)
        w2 = w2 + e
        split = split.index_add(1, sources, -e)
    b1 = None if site.l1.bias is None else site.l1.bias.detach().index_select(0, sources).clone()
    return Neurons(W1.index_select(0, sources).clone(), b1, w2), split
