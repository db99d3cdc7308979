"""The growth methods: one module per method, each a GrowthMethod subclass (base.py documents the
interface), and the registry that maps growth.method's values to them.

Everything that lists or checks methods derives from REGISTRY: growth.method's allowed values
and the options' refusals (growrun.config.validate), the method option nodes growth.<name>
(growrun.config.schema), `make methods` (`python -m growrun.growth.methods`: the presets), and
the option-matrix test (tests/test_growth_matrix.py). A method outside this package is named
by its import path, growth.method=my_pkg.my_module:MyMethod (`load`); its options are the
node growth.options (+growth.options.KEY=VALUE: new keys for Hydra), checked against its Options
dataclass, types included. docs/methods.md: writing one.

The method modules import torch and the mathematics inside their functions, so that reading
the registry (the config schema does, for `growrun train --help` too) does not import torch.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from growrun.errors import GrowrunError

from .base import AMPLITUDES, EventContext, GrowthMethod
from .firefly import Firefly
from .gradmax import GradMax
from .net2net import Net2Net
from .random import Random
from .splitting import Splitting
from .tiny import Tiny, TinyNoProj
from .zero import Zero

BUILTIN: tuple[type[GrowthMethod], ...] = (Tiny, TinyNoProj, GradMax, Random, Zero, Net2Net, Firefly, Splitting)
REGISTRY: dict[str, type[GrowthMethod]] = {m.name: m for m in BUILTIN}
NONE = "none"  # growth.method=none: a fixed network


def names() -> list[str]:
    """growth.method's registered values (without "none")."""
    return list(REGISTRY)


def presets() -> list[str]:
    """Every method's files in configs/growth/ (growth=NAME), in registry order."""
    return [p for m in BUILTIN for p in (m.presets or (m.name,))]


def is_external(name: str) -> bool:
    return ":" in str(name)


def load(name: str) -> type[GrowthMethod]:
    """The method class of growth.method=`name`: a registered name, or module:Class (imported).
    GrowrunError (one line) when it names neither."""
    if name in REGISTRY:
        return REGISTRY[name]
    allowed = f"choose one of {', '.join([NONE, *REGISTRY])}, or module:Class for your own method"
    if not is_external(name):
        raise GrowrunError(f"growth.method={name}: not a growth method; {allowed}")
    module_name, _, attr = str(name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as ex:
        raise GrowrunError(f"growth.method={name}: cannot import {module_name} ({ex}); put it on PYTHONPATH or "
                           f"install it") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, GrowthMethod)):
        raise GrowrunError(f"growth.method={name}: {module_name} has no GrowthMethod subclass {attr!r}; {allowed}")
    if cls.amplitude not in AMPLITUDES or cls.measures not in ("sums", "batches"):
        raise GrowrunError(f"growth.method={name}: amplitude={cls.amplitude!r}, measures={cls.measures!r}; allowed: "
                           f"amplitude {'|'.join(AMPLITUDES)}, measures sums|batches")
    return cls


def options_of(cls: type[GrowthMethod], g: Any) -> Any:
    """The method's options from the growth config: the node growth.<name> of a registered
    method, growth.options (a dict, merged onto its Options' defaults) of an external one."""
    if cls.Options is None:
        return None
    if cls in BUILTIN:
        return getattr(g, cls.name)
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    given = dict(getattr(g, "options", None) or {})
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise GrowrunError(f"growth.options.{unknown[0]}: not an option of growth.method={g.method}; its options: "
                           f"{', '.join(sorted(known)) or 'none'}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Options), given))
    except OmegaConfBaseException as ex:
        key = getattr(ex, "full_key", "") or "?"
        raise GrowrunError(f"growth.options.{key}={given.get(key)}: not a value of its type in {cls.__name__}.Options "
                           f"({str(ex).splitlines()[0]})") from None


def create(g: Any) -> GrowthMethod:
    """The method of a growth config (g.method), with its options."""
    cls = load(g.method)
    return cls(g, options_of(cls, g))


__all__ = ["AMPLITUDES", "BUILTIN", "NONE", "REGISTRY", "EventContext", "GrowthMethod", "create", "load", "names",
           "options_of", "presets"]
