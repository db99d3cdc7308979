"""The growth option matrix of tests/test_growth_matrix.py: the tiny model of each kind
(ModelSpec, MODELS), the option factors and their pairwise selection (COMBOS), one combination's
command line (overrides) and the check of its growth.csv rows (check_growth_rows); also used by
test_fullconv.py."""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from helpers_allpairs import all_pairs
from growrun.growth import methods
from growrun.models import build_model, count_params, initial_arch

# the methods that grow from TINY's statistics alone (firefly and splitting measure on batches, net2net
# copies neurons, which the ResNet's width-0 site has none of: their own tests), from the registry
MATRIX_METHODS = [m.name for m in methods.BUILTIN if m.measures == "sums" and not m.splits]
FUNCTION_PRESERVING = tuple(n for n in MATRIX_METHODS if methods.REGISTRY[n].amplitude == "preserving")
REASONS = ("", "rank", "adaptive", "budget", "no_gain")
TRAIN_SIZE, BATCH = 64, 32


@dataclass(frozen=True)
class ModelSpec:
    """A tiny model of each kind: its overrides, start and target site widths, image size."""

    overrides: tuple[str, ...]
    start: tuple[int, ...]
    target: tuple[int, ...]
    image_size: int

    def build(self, widths):
        """This model with the given site widths."""
        values = dict(o.split("=", 1) for o in self.overrides)
        cfg = SimpleNamespace(name=values["model"], width=float(values.get("model.width", 1.0)),
                              start_fraction=None, site_widths=list(widths), batchnorm=True,
                              hidden=json.loads(values.get("model.hidden", "[512, 512]")))
        return build_model(initial_arch(cfg, 10, (3, self.image_size, self.image_size)))

    def params(self, widths) -> int:
        return count_params(self.build(widths))

    def start_widths(self) -> dict[str, int]:
        """{site name: start width}."""
        return dict(zip(self.build(self.start).sites(), self.start))


MODELS = {
    "mlp": ModelSpec(("model=mlp", "model.hidden=[16,16]"), (2, 3), (5, 6), 8),
    "vgg": ModelSpec(("model=vgg", "model.width=0.0625"), (1, 2, 2, 2), (3, 2, 4, 2), 16),
    # layer1.0 starts at width 0 (the block is its shortcut) and grows
    "resnet18": ModelSpec(("model=resnet18", "model.width=0.0625"), (0, 1, 1, 1, 1, 1, 1, 2),
                          (2, 1, 1, 2, 1, 1, 1, 4), 8),
}
FACTORS = {
    "model": list(MODELS),
    "growth": MATRIX_METHODS,
    "growth.neurons": ["to_target", "fixed", "adaptive"],
    "growth.sites": ["all", "round_robin", "best_gain"],
    "growth.apply_dw": [False, True],
    "growth.bn_init": ["unit", "identity"],
    "growth.normalize": ["none", "fan_in"],
    "growth.dt": [1.0, 0.5],
    "growth.param_budget": ["none", "half"],
    "growth.extra_epochs": [None, 1],
    "growth.rel_eps": [1e-7, 0.5],  # 0.5: the solvers keep only the strongest directions, often none
}
# Pairs of values that cannot work together: refused up front (test_incompatible_options_fail_up_front).
INCOMPATIBLE = [
    *({"growth": n, "growth.apply_dw": True} for n in MATRIX_METHODS if not methods.REGISTRY[n].honours_apply_dw()),
    {"growth.neurons": "fixed", "growth.extra_epochs": 1},
    {"growth.neurons": "adaptive", "growth.extra_epochs": 1},
]


def compatible(combo: dict) -> bool:
    return not any(all(combo[k] == v for k, v in bad.items()) for bad in INCOMPATIBLE)


COMBOS = all_pairs(FACTORS, compatible)


def overrides(combo: dict) -> list[str]:
    """The command line of one combination."""
    spec = MODELS[combo["model"]]
    out = [*spec.overrides, f"model.site_widths=[{','.join(map(str, spec.start))}]",
           "dataset=synthetic", f"dataset.train_size={TRAIN_SIZE}", "dataset.test_size=32",
           f"dataset.image_size={spec.image_size}", f"trainer.batch_size={BATCH}", "trainer.eval_batch_size=64",
           "trainer.epochs=3", "trainer.threads=1", "trainer.progress=off", "optim.lr=0.05",
           f"growth={combo['growth']}", "growth.first_epoch=1", "growth.steps=2", "growth.count=2",
           "growth.noise_sigmas=0",  # adaptive: keep every neuron with a positive held-out gain
           f"growth.target_widths=[{','.join(map(str, spec.target))}]"]
    for key in ("growth.neurons", "growth.sites", "growth.bn_init", "growth.normalize", "growth.dt", "growth.rel_eps"):
        out.append(f"{key}={combo[key]}")
    out.append(f"growth.apply_dw={str(combo['growth.apply_dw']).lower()}")
    if combo["growth.param_budget"] == "half":
        out.append(f"growth.param_budget={budget(spec)}")
    if combo["growth.extra_epochs"] is not None:
        out.append(f"growth.extra_epochs={combo['growth.extra_epochs']}")
    return out


def budget(spec: ModelSpec) -> int:
    """Half way between the start and the target parameter counts."""
    lo, hi = spec.params(spec.start), spec.params(spec.target)
    return lo + (hi - lo) // 2


def check_growth_rows(rows: list[dict], method: str, widths: dict) -> None:
    """Per row: 0 <= added <= requested with a reason exactly when fewer were added, widths
    that add up, and insertion equal to what was promised (same function, or the searched loss)."""
    for r in rows:
        added, requested, reason = int(r["added"]), int(r["requested"]), r["reason"]
        assert 0 <= added <= requested and reason in REASONS, r
        assert (reason == "") == (added == requested), r
        widths[r["site"]] += added
        assert int(r["width_after"]) == widths[r["site"]], r
        promised = r["loss_before"] if method in FUNCTION_PRESERVING else r["loss_candidate"]
        assert float(r["loss_after"]) == pytest.approx(float(promised), rel=1e-4, abs=1e-6), r
        if added == 0:
            assert float(r["loss_after"]) == pytest.approx(float(r["loss_before"]), rel=1e-5), r
