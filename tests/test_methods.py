"""The growth-method registry (growrun/growth/methods/) is the one place that knows the methods:
the options each method refuses follow its declared attributes, no module outside the registry
compares method names, the README's method table lists the registry's presets, and the method
options that moved into their method's node name their new keys (old checkpoints still resume)."""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from growrun.config import store  # noqa: F401 (registers the schema)
from growrun.config.validate import RENAMED, upgrade_config, validate
from growrun.errors import GrowrunError
from growrun.growth import methods
from growrun.train.safety import config_differences

ROOT = Path(__file__).resolve().parents[1]
BASE = ["dataset=synthetic", "model.start_fraction=0.0625"]


def _compose(*overrides: str):
    with initialize_config_module("growrun.configs", version_base="1.3"):
        return compose("train", overrides=[*BASE, *overrides])


@functools.lru_cache(maxsize=None)
def _composed(*overrides: str):
    """_compose, once per override list (162 option tests share 18 compositions); copy it to change it."""
    return _compose(*overrides)


def _expected_refusal(cls, option: str, value, conv_model: bool) -> bool:
    """Whether `cls`'s declared attributes refuse growth.<option>=<value>."""
    if option == "apply_dw":
        return value and not cls.honours_apply_dw()
    if option == "normalize":
        return value not in cls.normalize
    if option == "stats":
        return value == "training" and cls.measures == "batches"
    if option == "conv_fanout":
        return value == "full" and conv_model and not cls.full_fanout
    raise AssertionError(option)


OPTIONS = [("apply_dw", True), ("apply_dw", False), ("stats", "training"), ("stats", "pass"),
           ("conv_fanout", "full"), *(("normalize", v) for v in ("fan_in", "none", "fan_out", "mean_norm"))]


@pytest.mark.parametrize("model", ["mlp", "resnet18"])
@pytest.mark.parametrize("option,value", OPTIONS)
@pytest.mark.parametrize("preset", methods.presets())
def test_every_method_refuses_exactly_what_it_declares(preset, option, value, model):
    """The option matrix, generated from the registry: each preset x option is refused up front
    (one line naming the option) exactly when the method's attributes say it cannot honour it."""
    cfg = copy.deepcopy(_composed(f"growth={preset}", f"model={model}"))
    OmegaConf.update(cfg, f"growth.{option}", value)  # as the override growth.<option>=<value>, type-checked
    assert cfg.growth[option] == value
    cls = methods.load(cfg.growth.method)
    conv = model != "mlp"
    # tiny's own refusals with conv_fanout=full (the preset tiny_full) on conv models
    own = cfg.growth.conv_fanout == "full" and conv and option == "stats" and value == "training"
    expected = _expected_refusal(cls, option, value, conv) or own
    if expected:
        with pytest.raises(GrowrunError) as err:
            validate(cfg)
        message = str(err.value)
        assert "\n" not in message and message.startswith("growth.") and f"growth.method={cls.name}" in message \
            or own, message
        assert f"growth.{option}=" in message or own, message
    else:
        validate(cfg)


@pytest.mark.slow
def test_the_registry_knows_every_preset_and_config_file():
    """configs/growth/ holds exactly the registry's presets (plus none), each selecting its method."""
    files = {p.stem for p in (ROOT / "configs" / "growth").glob("*.yaml")}
    assert files == {*methods.presets(), "none"}
    for preset in methods.presets():
        assert _compose(f"growth={preset}").growth.method in methods.REGISTRY


def test_no_module_outside_the_registry_compares_method_names():
    """Adding a method touches its module (and YAML) only: no other module of the package tests
    growth.method against a method's name (report/reference.py maps the paper's table rows to
    methods: data, not dispatch)."""
    names = "|".join(re.escape(n) for n in methods.names())
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=|\bin\b)""")
    allowed = {ROOT / "growrun" / "report" / "reference.py"}
    hits = []
    for path in sorted((ROOT / "growrun").rglob("*.py")):
        if path in allowed or (ROOT / "growrun" / "growth" / "methods") in path.parents:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_readme_method_table_lists_the_registry():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| method | reference |"):].split("\n\n")[0].splitlines()[2:]
    listed = [re.match(r"\| `([^`]+)` \|", row).group(1) for row in table]
    assert sorted(listed) == sorted(methods.presets())


@pytest.mark.parametrize("old,new", sorted(RENAMED.items()))
def test_old_method_keys_name_their_new_key(tmp_path, run_cli, old, new):
    proc = run_cli("train", "growth=firefly", *BASE, f"{old}=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{old}: renamed to {new}" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_the_old_method_keys_resumes():
    """A checkpoint's config from before the method nodes (flat growth.firefly_lr, ...) compares
    equal to today's config of the same run, and a changed value is still a difference."""
    current = OmegaConf.to_container(_compose("growth=firefly", "growth.firefly.lr=0.5"), resolve=True)
    old = {**current, "growth": {k: v for k, v in current["growth"].items() if k not in ("firefly", "net2net",
                                                                                       "splitting", "options")}}
    for key, new in RENAMED.items():
        method, field = new.split(".")[1:]
        old["growth"][key.split(".", 1)[1]] = current["growth"][method][field]
    assert config_differences(old, current) == []
    old["growth"]["firefly_lr"] = 0.25
    assert config_differences(old, current) == ["growth.firefly.lr: 0.25 -> 0.5"]
    assert upgrade_config({"seed": 1}) == {"seed": 1}
