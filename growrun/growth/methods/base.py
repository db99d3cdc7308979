"""The interface every growth method implements: which neurons a site gets, and how they go in.

A method is a subclass of GrowthMethod. Its class attributes say what it needs and what it
refuses; the event (growrun.train.events) reads them instead of the method's name:

    name            the value of growth.method
    presets         its files in configs/growth/ (default: the name)
    Options         a dataclass of its own options, the config node growth.<name> (None: none)
    measures        "sums": TINY's statistics (stats.SiteStats, from a statistics pass or recorded
                    during training) | "batches": the statistics batches themselves (it trains or
                    measures on them: growth.stats=training is refused)
    amplitude       "search": gamma by line search | "preserving": the function is unchanged,
                    inserted at gamma = 1 without a search | "trained": inserted as proposed at
                    gamma = 1, the loss measured (no search)
    fits_gradient   its neurons are fitted to the gradient: statistics with g2 = 0 are unusable
    splits          a verb ("copy", "split") when its new neurons come from existing ones (every
                    growing site must start at width >= 1), else ""
    full_fanout     supports growth.conv_fanout=full on conv sites
    projection      the adaptive count's fit projects out the best update (tiny_math.md 7)
    normalize       the growth.normalize values it honours; normalize_why: why not the others
    apply_dw        whether it honours growth.apply_dw (default: when its amplitude is searched);
                    apply_dw_why: why not

and its methods do the work:

    propose(site, stats, count, ctx) -> Proposal    the neurons (amplitude 1) for one site
    attach(site, proposal, neurons)                 a hook the line search evaluates gamma with
                                                    (None: the standard candidate insertion)
    insert(site, proposal, neurons, moments, gamma, optimizer)   put them in at amplitude gamma
    refuse(g, conv_model) -> str | None             a one-line message for an option it cannot honour

Every method must keep three properties: at amplitude 0 the network computes the same function
(no output changes when its neurons are inserted with gamma = 0), the proposal's shapes fit the
site, and a run resumes exactly. A method holds no state from one event to the next (the
checkpoint does not save it): everything it draws comes from ctx.generator, seeded per event.
tests/test_growth_neurons.py checks the first two for every registered method, the resume tests
(test_faults, test_net2net, test_firefly, test_splitting, ...) the third; tests/test_own_method.py
is the template for a method of your own, and docs/methods.md walks through writing one.
`attach` is used by the line search only: methods of amplitude "trained", and
growth.normalize=mean_norm, measure L(gamma = 1) with the standard candidate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # the mathematics (and torch) are imported where used: see growrun.growth.methods
    import torch

    from growrun.models.site import Neurons, Site
    from growrun.growth.stats import SiteStats

AMPLITUDES = ("search", "preserving", "trained")
NORMALIZE = ("fan_in", "none", "fan_out", "mean_norm")


@dataclass
class EventContext:
    """What a growth event hands a method (growrun.train.events fills it; tests may leave the
    parts a method does not use at their defaults)."""
    generator: torch.Generator | None = None  # the event's random stream (seeded per event)
    solve_device: str = "auto"  # where float64 solves run: auto | model | cpu (growth/solve_device.py)
    model: torch.nn.Module | None = None  # the network, for methods that measure on batches
    batches: list = field(default_factory=list)  # the statistics batches (inputs, labels): this rank's share
    loss_fn: Callable | None = None  # the summed loss of (logits, labels)
    reduce: Callable[[list], None] | None = None  # in-place sum of tensors across ranks (None: one process)
    input_shape: tuple = ()  # one input's shape (FLOP counts)
    n_stats: int = 0  # statistics samples of the event, all ranks together
    add_flops: Callable[[int], None] = lambda flops: None  # growth compute the method spends itself
    hook: Callable | None = None  # a prebuilt proposal hook (methods that build one per site; tests)


class GrowthMethod:
    """One growth method (module doc). Instances are made per run with the growth config."""

    name: ClassVar[str] = ""
    presets: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type | None] = None
    measures: ClassVar[str] = "sums"
    amplitude: ClassVar[str] = "search"
    fits_gradient: ClassVar[bool] = False
    splits: ClassVar[str] = ""
    full_fanout: ClassVar[bool] = False
    projection: ClassVar[bool] = True
    normalize: ClassVar[tuple[str, ...]] = NORMALIZE
    normalize_why: ClassVar[str] = ""
    apply_dw: ClassVar[bool | None] = None  # None: amplitude == "search"
    apply_dw_why: ClassVar[str] = ""

    def __init__(self, g: Any, options: Any = None):
        """g: the growth config (shared options: rel_eps, normalize, bn_init, ...); options: the
        method's own (an Options instance or config node; None: Options' defaults)."""
        self.g = g
        if options is None and self.Options is not None:
            options = self.Options()
        self.options = options

    # --- what it refuses ------------------------------------------------------------------------
    def refuse(self, g: Any, conv_model: bool) -> str | None:
        """The one-line message for the first option in `g` this method cannot honour (conv_model:
        the model has conv sites), or None. Subclasses add their own and call this one."""
        if g.apply_dw and not self.honours_apply_dw():
            how = "as trained" if self.amplitude == "trained" else "function preserving"
            why = self.apply_dw_why or f"which inserts without a line search ({how}), so dW2* would get no amplitude"
            return f"growth.apply_dw=true: not with growth.method={g.method}, {why}; use growth.apply_dw=false"
        if g.normalize not in self.normalize:
            return (f"growth.normalize={g.normalize}: not with growth.method={g.method}, {self.normalize_why}; "
                    f"use growth.normalize={'|'.join(self.normalize)}")
        if g.stats == "training" and self.measures == "batches":
            return (f"growth.stats=training: not with growth.method={g.method}, which measures on the statistics "
                    f"batches of a pass; use growth.stats=pass")
        if g.conv_fanout == "full" and conv_model and not self.full_fanout:
            return (f"growth.conv_fanout=full: not with growth.method={g.method} (it uses the centre tap); use "
                    f"growth.conv_fanout=center or a method that supports it")
        return None

    @classmethod
    def honours_apply_dw(cls) -> bool:
        return cls.amplitude == "search" if cls.apply_dw is None else cls.apply_dw

    # --- what it does ---------------------------------------------------------------------------
    def propose(self, site: Site, stats: SiteStats, count: int, ctx: EventContext):
        """The Proposal (growrun.growth.neurons) of at most `count` neurons for `site`."""
        raise NotImplementedError(f"{type(self).__name__}.propose")

    def attach(self, site: Site, proposal, neurons: Neurons):
        """How the line search puts the neurons in at a trial gamma: None for the standard
        candidate (growrun.growth.surgery.candidate), else linesearch's `attach` hook."""
        return None

    def insert(self, site: Site, proposal, neurons: Neurons, moments, gamma: float, optimizer) -> None:
        """Insert `neurons` at amplitude gamma, exactly what the line search evaluated (with
        growth.apply_dw: L2 += gamma^2 dW2* on the existing columns first); growth.normalize
        then sets their scale (fan_in / fan_out: the same function, growrun.growth.scale;
        mean_norm: as the event measured them). moments: the new BatchNorm channels' (mean, var)
        at amplitude 1, or None."""
        from growrun.growth.scale import normalized, rebalance, rebalance_factors
        from growrun.growth.surgery import apply_weight_update, insert_neurons

        g = self.g
        if g.apply_dw:
            apply_weight_update(site, proposal.dw2, proposal.db2, gamma * gamma)
        neurons = neurons.scaled(gamma)
        c = rebalance_factors(site, neurons.w1) if g.normalize == "fan_in" else None
        if c is not None:
            neurons = rebalance(neurons, c)
        mean, var = moments if moments is not None else (None, None)
        if mean is not None:
            scale = gamma if c is None else gamma * c.to(mean)
            mean, var = scale * mean, scale * scale * var
        bn_weight = None
        if g.normalize in ("fan_out", "mean_norm"):
            neurons, mean, var, bn_weight, _ = normalized(site, neurons, mean, var, g.normalize, g.bn_init,
                                                          g.gradmax_scale)
        insert_neurons(site, neurons, mean, var, optimizer, g.bn_init, bn_weight=bn_weight)
