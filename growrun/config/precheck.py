"""Compose and validate a command line's config before Hydra creates any run directory.

Hydra reports composition errors over several lines; growrun promises one line that names the
bad key and what is allowed, with nothing written. `precheck` composes the config the same way
`growrun train` will (same search path, same overrides) and, for a sweep, composes once per
swept value, so a bad value anywhere in `-m seed=0,1 optim.lr=0.1,-1` is caught up front.
Each composed config is also checked for a growth that could never add a neuron
(growrun.config.growable), and the run (sweep) directory for being writable and not another
run's (growrun.config.rundir).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Iterator

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from growrun.config.growable import check_growth
from growrun.config.rundir import check_output_dir
from growrun.config.validate import unknown_key_message, validate
from growrun.errors import GrowrunError
from growrun.launch import check_launcher

CONFIG_MODULE = "pkg://growrun.configs"
CONFIG_NAME = "train"
# the launcher plugins' own configs, which growrun's presets (configs/hydra/launcher/) extend
LAUNCHER_PLUGINS = {"submitit_slurm": "hydra-submitit-launcher", "submitit_local": "hydra-submitit-launcher",
                    "joblib": "hydra-joblib-launcher"}


def make_hydra(config_dir: str | None) -> Hydra:
    """A Hydra instance with growrun's search path (plus --config-dir when given)."""
    search_path = create_automatic_config_search_path(None, None, CONFIG_MODULE)
    if config_dir is not None:
        path = os.path.abspath(config_dir)
        if not os.path.isdir(path):
            raise GrowrunError(f"--config-dir {config_dir}: not a directory")
        search_path.prepend(provider="command-line", path=f"file://{path}")
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name="train", config_search_path=search_path)


def precheck(args: argparse.Namespace) -> DictConfig:
    """Raise GrowrunError (one line) if any run of this command line has a bad config; else the
    config of its first run (a sweep's swept keys at their first values)."""
    first = None
    try:
        hydra = make_hydra(args.config_dir)
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        sweeps = [o for o in parsed if o.is_sweep_override()]
        if sweeps and not args.multirun:
            raise GrowrunError(f"{sweeps[0].input_line}: sweeps several values; add -m (multirun) to run them all")
        for i, overrides in enumerate(_variants(parsed)):
            cfg = hydra.compose_config(args.config_name or CONFIG_NAME, overrides, RunMode.RUN,
                                       validate_sweep_overrides=False)
            validate(cfg)
            check_growth(cfg)
            if i == 0 and not args.cfg:  # --cfg prints the config and writes nothing
                check_output_dir(cfg, bool(args.multirun))
                if args.multirun:
                    check_launcher(cfg)
            first = cfg if i == 0 else first
        return first
    except GrowrunError:
        raise
    except OverrideParseException as ex:
        raise GrowrunError(f"cannot parse override: {_first_line(ex)}") from None
    except MissingConfigException as ex:
        raise GrowrunError(_missing_message(ex)) from None
    except (ConfigCompositionException, HydraException, OmegaConfBaseException) as ex:
        raise GrowrunError(_composition_message(ex)) from None
    finally:
        GlobalHydra.instance().clear()


def _variants(parsed) -> Iterator[list[str]]:
    """The override lists to compose: every sweep at its first value, then each other value of
    each sweep in turn (linear in the number of values, not their product)."""
    base, choices = [], []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # glob or interval sweeps: left to Hydra
                continue
            key = o.get_key_element()
            base.append(f"{key}={values[0]}")
            choices.append((len(base) - 1, key, values[1:]))
        else:
            base.append(o.input_line)
    yield base
    for index, key, values in choices:
        for value in values:
            variant = list(base)
            variant[index] = f"{key}={value}"
            yield variant


def _first_line(ex: BaseException) -> str:
    lines = [ln.strip() for ln in str(ex).splitlines() if ln.strip()]
    return lines[0] if lines else type(ex).__name__


def _missing_message(ex: MissingConfigException) -> str:
    missing = ex.missing_cfg_file or ""
    plugin = LAUNCHER_PLUGINS.get(missing.removeprefix("hydra/launcher/"))
    if missing.startswith("hydra/launcher/") and plugin:
        return f"{missing}: the launcher is not installed; pip install {plugin} (or growrun[launchers])"
    if "/" in missing:
        group, name = missing.rsplit("/", 1)
        allowed = ", ".join(o for o in ex.options or [] if not o.startswith("_")) or "(none)"
        return f"{group}={name}: no such config; available in {group}/: {allowed}"
    return _first_line(ex)


def _composition_message(ex: BaseException) -> str:
    """One line from Hydra/OmegaConf's composition error: the key, the value and the reason."""
    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else ex
    key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None) or _first_line(cause)
    msg = _first_line(Exception(msg))
    override = re.search(r"override '?([^'\s]+)'?", _first_line(ex))
    if "could not be converted to" in msg:
        kind = msg.rsplit(" ", 1)[-1].lower()
        value = re.search(r"Value '([^']*)'", msg)
        shown = f"{key}={value.group(1)}" if key and value else (key or "value")
        article = "an" if kind[:1] in "aeiou" else "a"
        return f"{shown}: must be {article} {kind}"
    if "is not a ListConfig" in msg:
        return f"{key}: must be a list, e.g. {key}=[1,2]"
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return unknown_key_message(override.group(1) if override else key)
    if key:
        return f"{key}: {msg}"
    return msg
