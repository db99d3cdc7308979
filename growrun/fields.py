"""Declared config fields: a default with its allowed values or range, for the structured-config
dataclasses (growrun.config.schema, and each growth method's Options). OmegaConf checks the
types; growrun.config.validate checks this metadata before a run starts."""
from __future__ import annotations

from dataclasses import field


def choices(default, *allowed, help: str = ""):
    return field(default=default, metadata={"choices": allowed, "help": help})


def bounded(default, lo=None, hi=None, *, lo_open=False, hi_open=False, help: str = ""):
    """A number in [lo, hi] (open ends where asked); None means unbounded on that side."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open), "help": help})
