"""What every growable model provides, and the helpers they share.

A model's architecture description (`arch()`) is a JSON-able dict that `build_model` turns back
into a model of identical shapes; checkpoints store it so that grown widths can be rebuilt
before the weights are loaded. Growth sites are exposed by stable names in a fixed order.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from growrun.errors import GrowrunError
from growrun.models.site import Site


class GrowableModel(nn.Module):
    """Base class: subclasses set self._site_names and implement _site(name) and arch()."""

    def sites(self) -> "OrderedDict[str, Site]":
        """Name -> Site over the live modules (widths reflect every growth so far)."""
        return OrderedDict((name, self._site(name)) for name in self.site_names())

    def site_names(self) -> list[str]:
        raise NotImplementedError

    def _site(self, name: str) -> Site:
        raise NotImplementedError

    def arch(self) -> dict:
        raise NotImplementedError

    # The network cut before a site, so that growth can evaluate many candidates of one site
    # without recomputing what comes before it: forward(x) == forward_from(s, forward_to(s, x))
    # with the same operations (bit-identical). Default: no cut (the whole network follows).
    def forward_to(self, site: str, x):
        """The input of the part of the network that holds `site`'s layers."""
        return x

    def forward_from(self, site: str, z):
        """The logits from forward_to(site, x)."""
        return self.forward(z)

    def forward_between(self, start: str, stop: str, z):
        """forward_to(stop, x) from z = forward_to(start, x), `start` not after `stop` in
        site_names() order: only the part between the two (bit-identical to forward_to)."""
        return z


def scaled(width: float, full: int) -> int:
    """ceil(width * full), the width of a layer at a fraction of the full architecture."""
    return int(math.ceil(width * full - 1e-9))


def site_widths_from_config(cfg, full: list[int], names: list[str]) -> list[int]:
    """Starting site widths: cfg.site_widths, else ceil(f * full) with f = start_fraction or width."""
    if cfg.site_widths is not None:
        widths = [int(w) for w in cfg.site_widths]
        if len(widths) != len(full) or min(widths, default=0) < 0:
            raise GrowrunError(f"model.site_widths={widths}: needs {len(full)} widths >= 0, one per site "
                               f"({', '.join(names)})")
        return widths
    frac = cfg.start_fraction if cfg.start_fraction is not None else cfg.width
    return [scaled(frac, f) for f in full]
