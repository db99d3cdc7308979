"""growth.stats=training: TINY's statistics recorded on the training steps themselves
(growrun/growth/stats_training.py) equal the separate pass when the weights do not move, the
window arithmetic, and a run that records them resumes exactly from inside a window."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_training import compose_cfg, read

from helpers_interrupt import interrupted_at
from growrun.growth.stats import collect_statistics
from growrun.growth.stats_training import TrainingStats, window_starts
from growrun.models import build_model
from growrun.train import run as run_module
from growrun.train.outputs import load_checkpoint


def test_window_starts_take_the_last_batches_after_the_previous_event():
    # k = ceil(512 / 128) = 4 batches; the window of the event at 12 cannot reach back past 10
    assert window_starts([10, 12, 30], 512, 128) == {7: 10, 11: 12, 27: 30}
    assert window_starts([1, 2], 1000, 10) == {1: 1, 2: 2}
    assert window_starts([5], 100, 128) == {5: 5}


def _train_and_record(model, sites, batches, eval_mode: bool):
    """Training steps with lr = 0 (the weights stay put) while TrainingStats records."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    rec = TrainingStats(sites)
    model.train(not eval_mode)
    for x, y in batches:
        rec.attach()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # forward passes without gradients (evaluation) are not recorded
        model(batches[0][0])
    return rec.finish()


@pytest.mark.parametrize("arch,eval_mode", [
    ({"name": "mlp", "in_features": 3 * 4 * 4, "num_classes": 5, "hidden": [6, 3], "batchnorm": False}, False),
    ({"name": "resnet18", "in_channels": 3, "num_classes": 5, "stream": [4, 4, 6, 6], "hidden": [2, 0, 3, 1, 2, 2, 1, 2]},
     True),
])
def test_training_statistics_equal_the_separate_pass_when_weights_stay(arch, eval_mode):
    """Same batches, weights fixed: the sums recorded from training steps (mean loss, g = B x its
    gradient, inside the backward) equal collect_statistics' (summed loss, probes) to float64
    round-off, every site and every fold (3 batches of different sizes)."""
    torch.manual_seed(0)
    model = build_model(arch).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(b, 3, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 5, (b,), generator=gen))
               for b in (7, 4, 6)]
    sites = [s for s in model.sites().values() if s.width > 0]
    model.train(not eval_mode)
    ref = collect_statistics(model, sites, batches,
                             lambda out, y: F.cross_entropy(out, y, reduction="sum", label_smoothing=0.1))
    got = _train_and_record(model, sites, batches, eval_mode)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].n_folds.tolist() == ref[name].n_folds.tolist() and got[name].n == 17
        for a, b in zip(got[name].tensors(), ref[name].tensors()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-12), name
        assert float(ref[name].g2) > 0


def test_moving_weights_change_the_statistics():
    """With lr > 0 the window's later batches see updated weights: the sums differ from the
    pass (what growth.stats=training trades for skipping the pass)."""
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "in_features": 48, "num_classes": 5, "hidden": [6], "batchnorm": False}).double()
    batches = [(torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (8,))) for _ in range(2)]
    sites = list(model.sites().values())
    ref = collect_statistics(model, sites, batches, lambda o, y: F.cross_entropy(o, y, reduction="sum"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = TrainingStats(sites)
    for x, y in batches:
        rec.attach()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    got = rec.finish()["fc1"]
    assert torch.allclose(got.S1, ref["fc1"].S1)  # the inputs x do not depend on the weights
    assert not torch.allclose(got.M1, ref["fc1"].M1)  # the gradients do


@pytest.mark.slow
def test_run_with_training_statistics_grows_and_resumes_inside_a_window(tmp_path, monkeypatch):
    """4 steps per epoch, an event every 2 steps from step 4, windows of 2 batches (128 samples
    / 64). The run is stopped in the event of step 6 after the checkpoint of step 5, which holds
    the window's first batch; resuming ends identical to the uninterrupted run."""
    args = ("growth.stats=training", "trainer.checkpoint_every=1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_module.run(compose_cfg(*args), full)
    rows = read(full / "growth.csv")
    assert rows and {int(r["samples"]) for r in rows} == {128}
    assert sum(int(r["added"]) for r in rows) > 0
    with interrupted_at(monkeypatch, "stats", 2), pytest.raises(KeyboardInterrupt):
        run_module.run(compose_cfg(*args), cut)
    state, _ = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert state["trainer"]["step"] == 5
    window = state["trainer"]["growth"]["window"]
    assert window and all(w["batches"] == 1 for w in window.values())
    run_module.run(compose_cfg(*args, "resume=true"), cut)
    assert read(cut / "metrics.csv") == read(full / "metrics.csv")
    assert read(cut / "growth.csv") == read(full / "growth.csv")
    a, b = load_checkpoint(full / "checkpoints" / "last.pt")[0], load_checkpoint(cut / "checkpoints" / "last.pt")[0]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
