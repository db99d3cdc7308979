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
from growrun.growth import methods
from growrun.growth.methods import NONE
from growrun.loggers import check_backends

# growrun's flat method keys before each method's options moved into its node growth.<method>
# (growrun/growth/methods/): an override of an old key is told the new one, and a checkpoint's
# config with old keys is read with the new ones (upgrade_config)
RENAMED = {f"growth.{m.name}_{f}": f"growth.{m.name}.{f}" for m in methods.BUILTIN if m.Options is not None
           for f in m.Options.__dataclass_fields__}


def upgrade_config(config: dict) -> dict:
    """A run's stored config (a plain dict) with RENAMED keys under their new names."""
    growth = config.get("growth")
    if not isinstance(growth, dict) or not any(old.split(".", 1)[1] in growth for old in RENAMED):
        return config
    growth = dict(growth)
    for old, new in RENAMED.items():
        key = old.split(".", 1)[1]
        if key in growth:
            method, field_name = new.split(".")[1:]
            growth[method] = {**growth.get(method, {}), field_name: growth.pop(key)}
    return {**config, "growth": growth}


def validate(cfg: DictConfig) -> None:
    """Raise GrowrunError for the first key the schema does not declare, then for the first
    value outside its declared choices or range."""
    _check_keys(TrainConfig, cfg, "")
    _check(TrainConfig, cfg, "")
    g = cfg.growth
    if g.extra_epochs is not None and (g.method == NONE or g.neurons != "to_target"):
        raise GrowrunError(f"growth.extra_epochs={g.extra_epochs}: needs a growth method with growth.neurons=to_target "
                           f"(here method={g.method}, neurons={g.neurons}); otherwise set trainer.epochs")
    if g.extra_epochs is not None and g.when != "schedule":
        raise GrowrunError(f"growth.extra_epochs={g.extra_epochs}: plans the run length from the growth schedule, "
                           f"which growth.when={g.when} may skip; use growth.when=schedule or set trainer.epochs")
    if cfg.trainer.budget_flops is not None and g.method != NONE:
        raise GrowrunError(f"trainer.budget_flops={cfg.trainer.budget_flops:g}: only for a fixed network (growth=none; "
                           f"here growth.method={g.method}, whose compute depends on its growth); set trainer.epochs")
    if cfg.trainer.budget_from is not None and g.method != NONE:
        raise GrowrunError(f"trainer.budget_from={cfg.trainer.budget_from}: only for a fixed network (growth=none; "
                           f"here growth.method={g.method}); the growing runs are the budget's source")
    if cfg.trainer.budget_from is not None and cfg.trainer.budget_flops is not None:
        raise GrowrunError(f"trainer.budget_from={cfg.trainer.budget_from}: not with trainer.budget_flops="
                           f"{cfg.trainer.budget_flops:g}; give one of them")
    if cfg.optim.schedule_over == "compute" and g.method != NONE and (g.sites == "best_gain" or g.when != "schedule"):
        raise GrowrunError(f"optim.schedule_over=compute: needs the growth plan, which growth.sites={g.sites} / "
                           f"growth.when={g.when} leave to training; use growth.sites=all|round_robin with "
                           "growth.when=schedule, or optim.schedule_over=steps")
    if cfg.optim.rewarm_epochs > 0 and g.method != NONE and (g.sites == "best_gain" or g.when != "schedule"):
        raise GrowrunError(f"optim.rewarm_epochs={cfg.optim.rewarm_epochs:g}: re-warms after the planned growth events, "
                           f"which growth.sites={g.sites} / growth.when={g.when} leave to training; use "
                           "growth.sites=all|round_robin with growth.when=schedule, or optim.rewarm_epochs=0")
    if g.method != NONE:
        _check_method(cfg)
    check_backends(cfg.logger)
    if (cfg.optimized_metric or "").startswith("final.val") and cfg.dataset.val_size == 0:
        raise GrowrunError(f"optimized_metric={cfg.optimized_metric}: needs a validation split held out of training; "
                           "set dataset.val_size (e.g. 1000), so that the search does not tune on the test set")
    if g.normalize == "mean_norm" and g.apply_dw:
        raise GrowrunError("growth.apply_dw=true: not with growth.normalize=mean_norm, which inserts without a line "
                           "search (the layers' scale is the amplitude), so dW2* would get no amplitude; use "
                           "growth.apply_dw=false or growth.normalize=fan_in|fan_out|none")


def _check_method(cfg: DictConfig) -> None:
    """growth.method names a registered method or module:Class, and the method can honour the
    other options (its `refuse`, from the registry: growrun/growth/methods/)."""
    g = cfg.growth
    cls = methods.load(g.method)
    if g.options and not methods.is_external(g.method):
        raise GrowrunError(f"growth.options: only for growth.method=module:Class; the options of growth.method="
                           f"{g.method} are growth.{g.method}.*")
    options = methods.options_of(cls, g)
    if methods.is_external(g.method) and options is not None:
        _check(cls.Options, options, "growth.options.")
    conv_model = cfg.model.name != "mlp"
    message = cls(g, options).refuse(g, conv_model)
    if message:
        raise GrowrunError(message)
    if g.conv_fanout == "full" and conv_model and not cls.full_fanout:
        full = "|".join(m.name for m in methods.BUILTIN if m.full_fanout)
        raise GrowrunError(f"growth.conv_fanout=full: not with growth.method={g.method} (it uses the centre tap); "
                           f"use growth.method={full} or growth.conv_fanout=center")


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
    if key in RENAMED:
        return f"{key}: renamed to {RENAMED[key]} (each method's options are in its node growth.<method>)"
    if key.startswith("growth.options."):
        return f"{key}: an option of your own method is a new key for Hydra; write +{key}=VALUE"
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
