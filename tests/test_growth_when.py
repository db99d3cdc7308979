"""growth.when: the triggers checked at each scheduled growth event (policy.bottleneck_fires,
policy.plateau_fires, policy.plateau_loss) as pure functions, and end to end: a bottleneck
threshold above 1 grows nothing (rows with reason `trigger`), threshold 0 grows exactly like the
schedule, the plateau trigger fires as its loss history says and resumes exactly."""
from __future__ import annotations

import csv

import pytest

from growrun.config import store  # noqa: F401  (registers the schema for compose)
from growrun.errors import GrowrunError
from growrun.growth import policy
from growrun.train import run as run_module
from growrun.train.outputs import load_checkpoint
from growrun.train.trainer import Trainer
from helpers_training import compose_with

pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("restore_torch_threads")]


# --- pure functions -----------------------------------------------------------------------------

def test_bottleneck_trigger():
    assert policy.bottleneck_fires(0.96, 1.0, 0.95) and policy.bottleneck_fires(0.95, 1.0, 0.95)  # at least
    assert not policy.bottleneck_fires(0.9, 1.0, 0.95)
    assert policy.bottleneck_fires(2e-3, 4e-3, 0.5) and not policy.bottleneck_fires(1e-3, 4e-3, 0.5)  # relative
    assert policy.bottleneck_fires(0.0, 1.0, 0.0)  # threshold 0: always, like the schedule
    assert not policy.bottleneck_fires(1.0, 1.0, 1.01)  # Psi <= g2: above 1 never
    assert policy.bottleneck_fires(0.0, 0.0, 0.0) and not policy.bottleneck_fires(0.0, 0.0, 0.5)  # no gradient


def test_plateau_trigger():
    fires = policy.plateau_fires
    assert not fires([], 1, 0.0) and not fires([1.0], 1, 0.0)  # no verdict before patience + 1 losses
    assert not fires([1.0, 1.2], 2, 0.0)
    assert not fires([3.0, 2.0, 1.0], 2, 0.0)  # improving
    assert fires([1.0, 1.2, 1.1], 2, 0.0)  # the last 2 did not beat the best before them
    assert not fires([1.0, 1.2, 0.9], 2, 0.0)  # one of them did
    assert fires([1.0, 0.995, 0.999], 2, 0.01) and not fires([1.0, 0.995, 0.999], 2, 0.001)  # min_delta
    assert fires([1.0, 1.0], 1, 0.0)  # no improvement at all counts as a plateau
    # once fired, the next verdict needs a new loss (dt < 1: several checks between evaluations)
    assert not fires([1.0, 1.2, 1.1], 2, 0.0, used=3)
    assert fires([1.0, 1.2, 1.1, 1.3], 2, 0.0, used=3)


def test_plateau_monitors_validation_else_training_loss():
    row = {"train_loss": 1.5, "val_loss": 1.7, "test_loss": 1.6}
    assert policy.plateau_loss(row, has_val=True) == 1.7
    assert policy.plateau_loss({"train_loss": 1.5}, has_val=True) is None  # an epoch without evaluation
    assert policy.plateau_loss(row, has_val=False) == 1.5  # never the test loss


# --- end to end ---------------------------------------------------------------------------------

RUN = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32", "dataset.image_size=8",
       "model=mlp", "model.hidden=[16,16]", "model.site_widths=[2,3]", "growth=tiny",
       "growth.target_widths=[6,7]", "growth.first_epoch=1", "growth.dt=0.5", "growth.steps=2",
       "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.epochs=3", "trainer.threads=1",
       "trainer.progress=off", "optim.lr=0.05"]


def compose_cfg(*overrides):
    return compose_with(RUN, *overrides)


def read(path, drop=("seconds",)):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_bottleneck_threshold_above_one_grows_nothing(tmp_path):
    summary = run_module.run(compose_cfg("growth.when=bottleneck", "growth.when_threshold=1.5"), tmp_path)
    rows = read(tmp_path / "growth.csv")
    assert rows and summary["status"] == "completed"
    for r in rows:
        assert r["added"] == "0" and r["reason"] == "trigger" and r["trigger"] == "", r
        assert int(r["requested"]) > 0 and float(r["psi"]) > 0  # the statistics were computed
    assert summary["widths"] == {"fc1": 2, "fc2": 3}


@pytest.mark.slow
def test_bottleneck_threshold_zero_grows_like_the_schedule(tmp_path):
    run_module.run(compose_cfg(), tmp_path / "schedule")
    run_module.run(compose_cfg("growth.when=bottleneck", "growth.when_threshold=0"), tmp_path / "bottleneck")
    scheduled, triggered = read(tmp_path / "schedule" / "growth.csv"), read(tmp_path / "bottleneck" / "growth.csv")
    assert sum(int(r["added"]) for r in scheduled) > 0
    assert {r["trigger"] for r in scheduled} == {"schedule"} and {r["trigger"] for r in triggered} == {"bottleneck"}
    strip = lambda rows: [{k: v for k, v in r.items() if k != "trigger"} for r in rows]  # noqa: E731
    assert strip(triggered) == strip(scheduled)
    assert read(tmp_path / "bottleneck" / "metrics.csv") == read(tmp_path / "schedule" / "metrics.csv")


PLATEAU = ["growth.when=plateau", "growth.plateau_patience=1", "growth.plateau_min_delta=100",  # any loss: no progress
           "dataset.val_size=16", "trainer.epochs=4"]


def expected_plateau_rows(metrics: list[dict], events: list[tuple[int, int]], steps_per_epoch: int) -> list[bool]:
    """Whether each (event, step) fires, from the validation losses of the epochs evaluated
    before it (an event at an epoch's last step comes before that epoch's evaluation)."""
    used, fired = 0, []
    for _, step in events:
        losses = [float(m["val_loss"]) for m in metrics if int(m["epoch"]) * steps_per_epoch < step]
        fire = policy.plateau_fires(losses, 1, 100.0, used)
        used = len(losses) if fire else used
        fired.append(fire)
    return fired


@pytest.mark.slow
def test_plateau_fires_from_the_loss_history_and_resumes_exactly(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_module.run(compose_cfg(*PLATEAU), full)
    rows, metrics = read(full / "growth.csv"), read(full / "metrics.csv")
    events = sorted({(int(r["event"]), int(r["step"])) for r in rows})
    fired = expected_plateau_rows(metrics, events, steps_per_epoch=int(metrics[0]["step"]))
    assert any(fired) and not all(fired)
    for (event, _), fire in zip(events, fired):
        for r in (r for r in rows if int(r["event"]) == event):
            if fire:
                assert r["trigger"] == "plateau" and r["reason"] != "trigger" and r["psi"] != "", r
            else:  # no statistics pass: psi and the rest are empty
                assert r["trigger"] == "" and r["reason"] == "trigger" and r["added"] == "0" and r["psi"] == "", r
    ckpt, _ = load_checkpoint(full / "checkpoints" / "last.pt")
    assert ckpt["trainer"]["growth"]["losses"] == pytest.approx([float(m["val_loss"]) for m in metrics], rel=1e-7)

    original = Trainer.train_epoch

    def stop_in_epoch_3(self, after_step=None):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return original(self, after_step)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_module.run(compose_cfg(*PLATEAU), cut)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    run_module.run(compose_cfg(*PLATEAU, "resume=true"), cut)
    assert read(cut / "growth.csv") == rows and read(cut / "metrics.csv") == metrics


def test_older_checkpoints_without_trigger_state_load():
    from growrun.train.events import GrowthController

    ctl = GrowthController.__new__(GrowthController)
    ctl.recording = None
    ctl.load_state_dict({"event": 3, "turn": 0, "start": {"fc1": 2}, "flops": 5})
    assert ctl.losses == [] and ctl.plateau_used == 0


def test_extra_epochs_needs_the_schedule(tmp_path):
    with pytest.raises(GrowrunError, match="growth.extra_epochs=1: .*growth.when=bottleneck"):
        run_module.run(compose_cfg("growth.when=bottleneck", "growth.extra_epochs=1"), tmp_path)
