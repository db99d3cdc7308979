"""Reported numbers of the TINY paper (Verbockhaven et al., TMLR 2024, arXiv 2405.19816),
Table 1 protocol, and the rule deciding when a group of runs is comparable to them.

The values were taken from secondary sources, not re-derived here: they are a target to
compare against, not ground truth (REFERENCE_NOTE is printed with them).

Protocol (ResNet18 on CIFAR-100, accuracy after extra training):
    TINY      69.0 +- 0.1 %   (best TINY variant reported: 71.0 +- 0.2 %)
    GradMax   57.0 +- 0.3 %
    ResNet18  72.9 %          (trained from scratch at full size, no growth)

Matching rule (every run of a group must satisfy it; values from the composed config):
    common       dataset.name = cifar100, dataset.train_subset = 0, dataset.test_subset = 0,
                 model.name = resnet18, model.width = 1.0 (the full residual stream),
                 model.site_widths = null
    TINY/GradMax growth.method = tiny | gradmax, model.start_fraction = 1/64 (0.015625),
                 growth.dt = 0.25, growth.target_fraction = 1.0, growth.target_widths = null
    from scratch growth.method = none, model.start_fraction = null or 1.0 (full hidden widths)
Anything else (another dataset, width, start, schedule or method) gets no paper value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_NOTE = "reported (secondary sources), a target not truth"
SOURCE = "TINY paper (Verbockhaven et al. 2024), Table 1: ResNet18, CIFAR-100, after extra training"


@dataclass(frozen=True)
class Reference:
    label: str
    acc: float  # percent
    std: float | None = None  # percent
    best_variant: float | None = None  # percent, best TINY variant
    best_variant_std: float | None = None

    def text(self) -> str:
        return f"{self.acc:.1f}" + (f" ± {self.std:.1f}" if self.std is not None else "")


REFERENCES = {
    "tiny": Reference("TINY", 69.0, 0.1, best_variant=71.0, best_variant_std=0.2),
    "gradmax": Reference("GradMax", 57.0, 0.3),
    "none": Reference("ResNet18 from scratch", 72.9),
}

COMMON = {
    "dataset.name": ("cifar100",),
    "dataset.train_subset": (0,),
    "dataset.test_subset": (0,),
    "model.name": ("resnet18",),
    "model.width": (1.0,),
    "model.site_widths": (None,),
}
GROWN = {
    "growth.method": ("tiny", "gradmax"),
    "model.start_fraction": (1 / 64,),
    "growth.dt": (0.25,),
    "growth.target_fraction": (1.0,),
    "growth.target_widths": (None,),
}
FROM_SCRATCH = {
    "growth.method": ("none",),
    "model.start_fraction": (None, 1.0),
}


def rule_text() -> str:
    def fmt(rule: dict) -> str:
        return ", ".join(f"{k} = {' or '.join('null' if v is None else str(v) for v in allowed)}"
                         for k, allowed in rule.items())
    return (f"every run of the group has {fmt(COMMON)}; and either {fmt(GROWN)} (TINY / GradMax rows), "
            f"or {fmt(FROM_SCRATCH)} (ResNet18 from scratch)")


def _get(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def _same(value, allowed) -> bool:
    if value is _ABSENT:
        return False
    if allowed is None or value is None:
        return value is None and allowed is None
    if isinstance(allowed, (int, float)) and not isinstance(allowed, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isclose(float(value), float(allowed), rel_tol=1e-9, abs_tol=1e-12)
    return value == allowed


def _satisfies(config: dict, rule: dict) -> bool:
    return all(any(_same(_get(config, k), a) for a in allowed) for k, allowed in rule.items())


def match_one(config: dict) -> Reference | None:
    if not _satisfies(config, COMMON):
        return None
    if _satisfies(config, GROWN) or _satisfies(config, FROM_SCRATCH):
        return REFERENCES.get(str(_get(config, "growth.method")))
    return None


def match_reference(configs: list[dict]) -> Reference | None:
    """The paper value the group is comparable to, when every run matches the same one."""
    found = {match_one(c) for c in configs}
    return found.pop() if len(found) == 1 else None
