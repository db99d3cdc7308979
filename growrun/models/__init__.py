"""Growable models: MLP, VGG-style CNN and CIFAR ResNet18, with growth sites by stable names.

    arch = initial_arch(cfg.model, num_classes, input_shape)   # JSON-able description
    model = build_model(arch)                                   # any width combination
    model.sites()                                               # OrderedDict name -> Site
    build_model(model.arch())                                   # same shapes after growth
"""
from __future__ import annotations

import math

from growrun.errors import GrowrunError
from growrun.models import mlp, resnet, vgg
from growrun.models.base import GrowableModel, scaled, site_widths_from_config
from growrun.models.flops import count_flops, count_params

__all__ = ["GrowableModel", "build_model", "count_flops", "count_params", "full_site_widths", "initial_arch"]
NAMES = ("mlp", "vgg", "resnet18")


def build_model(arch: dict) -> GrowableModel:
    name = arch.get("name")
    if name == "resnet18":
        return resnet.ResNet18(arch["stream"], arch["hidden"], arch["num_classes"], arch["in_channels"])
    if name == "vgg":
        return vgg.VGG(arch["stream"], arch["hidden"], arch["num_classes"], arch["in_channels"], arch["batchnorm"])
    if name == "mlp":
        return mlp.MLP(arch["in_features"], arch["hidden"], arch["num_classes"], arch["batchnorm"])
    raise GrowrunError(f"model.name={name}: unknown model; allowed: {', '.join(NAMES)}")


def initial_arch(cfg, num_classes: int, input_shape: tuple[int, int, int]) -> dict:
    """The starting architecture: non-site widths ceil(width * full); sites as configured."""
    name = cfg.name
    if name in ("resnet18", "vgg"):
        module = resnet if name == "resnet18" else vgg
        arch = {"name": name, "in_channels": int(input_shape[0]), "num_classes": int(num_classes),
                "stream": [scaled(cfg.width, f) for f in module.FULL_STREAM],
                "hidden": site_widths_from_config(cfg, module.FULL_HIDDEN, module.SITE_NAMES)}
        if name == "vgg":
            arch["batchnorm"] = bool(cfg.batchnorm)
        return arch
    if name == "mlp":
        full = [int(h) for h in cfg.hidden]
        return {"name": "mlp", "in_features": int(math.prod(input_shape)), "num_classes": int(num_classes),
                "hidden": site_widths_from_config(cfg, full, [f"fc{i + 1}" for i in range(len(full))]),
                "batchnorm": bool(cfg.batchnorm)}
    raise GrowrunError(f"model.name={name}: unknown model; allowed: {', '.join(NAMES)}")


def full_site_widths(arch: dict, model_cfg=None) -> list[int]:
    """Site widths of the full (width 1) architecture, in site order; for the MLP they are
    model.hidden of the config (the arch only knows the current widths)."""
    if arch["name"] == "resnet18":
        return list(resnet.FULL_HIDDEN)
    if arch["name"] == "vgg":
        return list(vgg.FULL_HIDDEN)
    if model_cfg is None:
        raise ValueError("full_site_widths of an MLP needs the model config (model.hidden)")
    return [int(h) for h in model_cfg.hidden]
