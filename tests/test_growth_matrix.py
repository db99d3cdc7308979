"""Every growth option end to end: a pairwise (all-pairs) selection of model kind x growth
method x growth.neurons x growth.sites x apply_dw x bn_init x normalize x dt x param_budget x extra_epochs
x rel_eps, each run through the CLI entry point (growrun.cli.main, in process) on tiny
synthetic data (64 images: the default growth draws of 1024 + 512 images shrink to fit) for a
few growth events. Every run must complete and log consistent rows: widths that add up in
growth.csv and match metrics.csv, a reason for every site that got fewer neurons than
requested, and insertions that keep what the method promises (the same loss for gradmax and
zero, the line search's loss for the others)."""
from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from allpairs import all_pairs, covered_pairs
from growrun.cli import main
from growrun.growth import methods
from growrun.models import build_model, count_params, initial_arch

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

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


def combo_id(combo: dict) -> str:
    return "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in combo.items())


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


def cli(*args: str) -> int:
    """growrun's exit status for this command line (run in process)."""
    try:
        return main(list(args))
    except SystemExit as ex:  # a run's own failure exits from inside Hydra's task
        return ex.code


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def restore_torch_threads(monkeypatch):
    """The runs set torch's thread count and determinism for this process; put them back."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # a failing run raises its own exception
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_pairwise_selection_covers_every_compatible_pair():
    product = [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]
    assert covered_pairs(COMBOS) == covered_pairs([c for c in product if compatible(c)])
    assert all(compatible(c) for c in COMBOS) and all_pairs(FACTORS, compatible) == COMBOS  # deterministic
    for model in MODELS:  # every option value runs at least once on every model kind
        for key, values in list(FACTORS.items())[1:]:
            assert {c[key] for c in COMBOS if c["model"] == model} == set(values), (model, key)
    assert len(COMBOS) < 0.01 * len(product)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_option_matrix_runs_end_to_end(tmp_path, combo):
    run_dir = tmp_path / "run"
    assert cli("train", *overrides(combo), f"hydra.run.dir={run_dir}") == 0
    spec = MODELS[combo["model"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics, rows = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "growth.csv")
    assert summary["status"] == "completed" and len(metrics) == summary["epochs"]
    assert rows, "no growth event ran"
    check_growth_rows(rows, combo["growth"], spec.start_widths())
    check_metric_widths(metrics, rows, spec.start_widths())
    if combo["growth.param_budget"] == "half":
        assert int(metrics[-1]["params"]) <= budget(spec)
    uncut = combo["growth.neurons"] != "adaptive" and combo["growth.param_budget"] == "none" \
        and combo["growth.rel_eps"] == 1e-7
    if combo["growth"] in FUNCTION_PRESERVING and uncut:  # no line search, no cut: neurons must come
        assert sum(int(r["added"]) for r in rows) > 0, "a function-preserving method added nothing"


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


def check_metric_widths(metrics: list[dict], rows: list[dict], start: dict) -> None:
    """The widths in metrics.csv after every epoch are the widths after the last growth event
    before that epoch's end; the final parameter count is the last event's."""
    for m in metrics:
        widths = dict(start)
        for r in rows:
            if int(r["step"]) <= int(m["step"]):
                widths[r["site"]] = int(r["width_after"])
        assert {n: int(m[f"width:{n}"]) for n in start} == widths, m["epoch"]
    assert int(metrics[-1]["params"]) == int(rows[-1]["params_after"])


@pytest.mark.parametrize("bad", INCOMPATIBLE, ids=combo_id)
def test_incompatible_options_fail_up_front(tmp_path, capsys, bad):
    combo = dict(COMBOS[0])
    combo.update(bad)
    assert cli("train", *overrides(combo), f"hydra.run.dir={tmp_path / 'run'}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("growrun: error:"), lines
    assert all(("growth.method" if key == "growth" else key) in lines[0] for key in bad), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["resnet18", "vgg"])
@pytest.mark.parametrize("method", ["tiny", "tiny_noproj"])
def test_apply_dw_inserts_what_the_line_search_evaluated(tmp_path, model, method):
    """growth.apply_dw=true on the conv models: neurons are inserted, and the loss after
    insertion (neurons + gamma^2 dW2* on the existing columns) is the line search's."""
    combo = {**COMBOS[0], "model": model, "growth": method, "growth.neurons": "fixed", "growth.sites": "all",
             "growth.apply_dw": True, "growth.param_budget": "none", "growth.extra_epochs": None,
             "growth.rel_eps": 1e-7}
    assert cli("train", *overrides(combo), f"hydra.run.dir={tmp_path}") == 0
    rows = read_csv(tmp_path / "growth.csv")
    check_growth_rows(rows, method, MODELS[model].start_widths())
    grown = [r for r in rows if int(r["added"])]
    assert grown and all(float(r["loss_candidate"]) < float(r["loss_before"]) for r in grown)


def test_too_small_training_set_fails_up_front(tmp_path, capsys):
    """3 training images cannot hold a statistics draw and a line-search batch of 2 each."""
    args = [*overrides(COMBOS[0]), "dataset.train_size=3", "trainer.batch_size=3", f"hydra.run.dir={tmp_path}"]
    assert cli("train", *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "growth needs at least 4 training images" in lines[0], lines
    assert not (tmp_path / "growth.csv").exists() and not (tmp_path / "metrics.csv").exists()
