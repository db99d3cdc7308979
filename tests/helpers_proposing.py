"""propose(site, stats, method, count, **settings): one method's Proposal for one site outside a
run, as the tests need it: `settings` are growth options (conv_fanout=, rel_eps=, gradmax_scale=,
...) and the method's own (e.g. pick=, noise= for net2net) on top of the schema's defaults;
hook: a prebuilt proposal hook (firefly, splitting)."""
from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from growrun.config.schema import GrowthConfig
from growrun.growth.methods import EventContext, load


def growth_settings(method: str, **settings):
    """(the growth config, the method's options) of `settings` on top of the defaults."""
    cls = load(method)
    g = OmegaConf.structured(GrowthConfig(method=method))
    own = {f.name for f in dataclasses.fields(cls.Options)} if cls.Options is not None else set()
    for key, value in settings.items():
        if key not in own:
            if key not in g:
                raise TypeError(f"unknown setting {key}=")
            g[key] = value
    options = cls.Options(**{k: v for k, v in settings.items() if k in own}) if cls.Options is not None else None
    return g, options


def propose(site, stats, method: str, count: int, *, generator=None, solve_device: str = "auto", hook=None,
            ctx: EventContext | None = None, **settings):
    cls = load(method)
    g, options = growth_settings(method, **settings)
    ctx = dataclasses.replace(ctx or EventContext(), solve_device=solve_device,
                              generator=generator if generator is not None else (ctx.generator if ctx else None),
                              hook=hook if hook is not None else (ctx.hook if ctx else None))
    return cls(g, options).propose(site, stats, count, ctx)
