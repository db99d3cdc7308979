"""Check a composed config against the choices and ranges declared in growrun.config.schema.

OmegaConf already enforces types; this adds what types cannot say (lr > 0, name in a list).
Each failure is a one-line GrowrunError naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from growrun.config.schema import TrainConfig
from growrun.errors import GrowrunError


def validate(cfg: DictConfig) -> None:
    """Raise GrowrunError for the first key the schema does not declare, then for the first
    value outside its declared choices or range."""
    _check_keys(TrainConfig, cfg, "")
    _check(TrainConfig, cfg, "")
    g = cfg.growth
    if g.extra_epochs is not None and (g.method == "none" or g.neurons != "to_target"):
        raise GrowrunError(f"growth.extra_epochs={g.extra_epochs}: needs a growth method with growth.neurons=to_target "
                           f"(here method={g.method}, neurons={g.neurons}); otherwise set trainer.epochs")
    if g.extra_epochs is not None and g.when != "schedule":
        raise GrowrunError(f"growth.extra_epochs={g.extra_epochs}: plans the run length from the growth schedule, "
                           f"which growth.when={g.when} may skip; use growth.when=schedule or set trainer.epochs")
    if g.apply_dw and g.method in ("gradmax", "zero", "net2net", "firefly"):
        raise GrowrunError(f"growth.apply_dw=true: not with growth.method={g.method}, which inserts without a line "
                           f"search ({'as trained' if g.method == 'firefly' else 'function preserving'}), so dW2* "
                           f"would get no amplitude; use growth.apply_dw=false or growth.method=tiny|tiny_noproj|random")
    if (g.normalize in ("fan_out", "mean_norm") and g.method in ("net2net", "zero")) or \
            (g.normalize == "fan_out" and g.method == "gradmax"):
        _refuse_normalize(g)
    if g.normalize == "mean_norm" and g.apply_dw:
        raise GrowrunError("growth.apply_dw=true: not with growth.normalize=mean_norm, which inserts without a line "
                           "search (the layers' scale is the amplitude), so dW2* would get no amplitude; use "
                           "growth.apply_dw=false or growth.normalize=fan_in|fan_out|none")
    if g.method == "splitting" and (g.apply_dw or g.stats == "training" or g.normalize in ("fan_out", "mean_norm")):
        _refuse_splitting(g)
    if g.method == "firefly" and g.stats == "training":
        raise GrowrunError("growth.stats=training: not with growth.method=firefly, which trains its candidates on "
                           "the statistics batches of a pass; use growth.stats=pass")
    if g.conv_fanout == "full" and g.method != "none" and cfg.model.name != "mlp":  # conv sites: fullconv.py
        if g.method not in ("tiny", "tiny_noproj"):
            raise GrowrunError(f"growth.conv_fanout=full: not with growth.method={g.method} (it uses the centre tap); "
                               f"use growth.method=tiny|tiny_noproj or growth.conv_fanout=center")
        if g.stats == "training":
            raise GrowrunError("growth.conv_fanout=full: not with growth.stats=training (the training steps record "
                               "the centre-tap sums only); use growth.stats=pass or growth.conv_fanout=center")
        if g.neurons == "adaptive":
            raise GrowrunError("growth.conv_fanout=full: not with growth.neurons=adaptive (its per-fold noise "
                               "estimate is centre-tap only); use growth.neurons=to_target|fixed or "
                               "growth.conv_fanout=center")


def _refuse_normalize(g: Any) -> None:
    """growth.normalize=fan_out|mean_norm with a method whose new neurons it cannot scale."""
    why = {"net2net": "whose copies are never rebalanced (they keep their originals' fan-ins and BatchNorm channels)",
           "zero": "whose new fan-outs are 0 (nothing to scale)",
           "gradmax": "whose fan-outs are set by growth.gradmax_scale (its zero fan-ins leave nothing to rebalance)"}
    allowed = "fan_in|none" + ("|mean_norm" if g.method == "gradmax" else "")
    raise GrowrunError(f"growth.normalize={g.normalize}: not with growth.method={g.method}, {why[g.method]}; "
                       f"use growth.normalize={allowed}")


def _refuse_splitting(g: Any) -> None:
    """growth.method=splitting with an option it cannot honour (one line naming the value)."""
    if g.apply_dw:
        raise GrowrunError("growth.apply_dw=true: not with growth.method=splitting, whose split already changes the "
                           "existing neurons' fan-outs (dW2* is for the unsplit layer); use growth.apply_dw=false")
    if g.stats == "training":
        raise GrowrunError("growth.stats=training: not with growth.method=splitting, which measures its splitting "
                           "matrices on the statistics batches of a pass; use growth.stats=pass")
    raise GrowrunError(f"growth.normalize={g.normalize}: not with growth.method=splitting, whose split neurons keep "
                       f"their fan-in and BatchNorm channel (never rebalanced); use growth.normalize=fan_in|none")


def _check(schema: type, node: Any, prefix: str) -> None:
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        value = OmegaConf.select(node, f.name) if isinstance(node, DictConfig) else getattr(node, f.name)
        sub = _nested_schema(f)
        if sub is not None:
            _check(sub, value, key + ".")
            continue
        if value is None:
            continue
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            raise GrowrunError(f"{key}={_show(value)}: not an allowed value; choose one of "
                               f"{', '.join(map(_show, allowed))}")
        bounds = f.metadata.get("range")
        if bounds and not _in_range(value, bounds):
            raise GrowrunError(f"{key}={value}: out of range; must be {_describe(bounds)}")


def unknown_key_message(key: str) -> str:
    """The one-line error for a key the schema does not declare, with the closest key of the
    same group when there is one."""
    parent, _, name = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in schema_keys() if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    return f"{key}: no such config key{hint} (see `growrun train --cfg job` for the keys)"


def schema_keys(schema: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every key of the schema, dotted (groups included: growth, growth.line_search, ...)."""
    keys = []
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        sub = _nested_schema(f)
        if sub is not None:
            keys += schema_keys(sub, f"{prefix}{f.name}.")
    return keys


def _check_keys(schema: type, node: Any, prefix: str) -> None:
    """Keys the schema does not declare: `+trainer.epoch=5` adds one (Hydra allows `+` even on
    a typed config) and the run would ignore it silently. The top-level `hydra` node (present
    while growrun.config.precheck composes) is Hydra's own."""
    if not isinstance(node, DictConfig):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            if prefix == "" and key == "hydra":
                continue
            raise GrowrunError(unknown_key_message(f"{prefix}{key}"))
        sub = _nested_schema(fields[key])
        if sub is not None:
            _check_keys(sub, OmegaConf.select(node, key), f"{prefix}{key}.")


def _show(value: Any) -> str:
    """A value as it is written in an override (true / false for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _nested_schema(f: dataclasses.Field) -> type | None:
    """The dataclass a nested config field is built from (annotations are strings here)."""
    factory = f.default_factory
    if factory is not dataclasses.MISSING and isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return factory
    return None


def _in_range(value: float, bounds: tuple) -> bool:
    lo, hi, lo_open, hi_open = bounds
    if lo is not None and (value < lo or (lo_open and value == lo)):
        return False
    if hi is not None and (value > hi or (hi_open and value == hi)):
        return False
    return True


def _describe(bounds: tuple) -> str:
    lo, hi, lo_open, hi_open = bounds
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)
