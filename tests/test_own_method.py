"""A growth method written outside growrun (docs/methods.md), run end to end through the CLI: the
template for the tests of your own method.

FixedDirection (SOURCE, written into a package `mygrowth` on sys.path, as a user's own module
would be) gives each new neuron a random fan-in and fan-out direction drawn from the event's
random stream, at the layer's own scale times its one option `scale`, with the sign that
decreases the loss to first order; its amplitude is line-searched. The tests check what every
method must keep (a proposal that fits its site, the same function at amplitude 0, insertion of
exactly what the line search evaluated) and that growrun runs it like a built-in method: named in
growth.csv, its option growth.options.scale reaching it, bad names and options refused in one
line before anything runs, and an interrupted run resuming to the uninterrupted run's end, bit
for bit. docs/methods.md shows SOURCE verbatim (test_the_docs_show_this_method).
"""
from __future__ import annotations

import copy
import csv
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers_interrupt import interrupted_at
from growrun.growth.methods import EventContext, GrowthMethod, load
from growrun.growth.surgery import candidate, fit_to_site, new_channel_moments
from growrun.train.outputs import load_checkpoint
from helpers_proposing import growth_settings
from helpers_neurons import outputs, setup

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

ROOT = Path(__file__).resolve().parents[1]
METHOD = "mygrowth.fixed_direction:FixedDirection"

SOURCE = '''\
"""FixedDirection: each new neuron gets a random fan-in and a random fan-out direction, drawn
from the event's random stream (a resumed run draws the same ones), at the layer's own scale: the
fan-in at the mean norm of the site's existing fan-ins, the fan-out at the mean norm of its
existing fan-outs, both times the option `scale`. Each fan-out takes the sign whose first-order
change of the loss is <= 0. The amplitude gamma is line-searched."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from growrun.fields import bounded
from growrun.growth.methods import EventContext, GrowthMethod
from growrun.growth.neurons import fit_site, reference_norm


def unit_rows(count: int, dim: int, generator) -> torch.Tensor:
    """(count, dim) random directions of norm 1 (float64, on the CPU)."""
    v = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


class FixedDirection(GrowthMethod):
    name = "fixed_direction"  # shown in growrun's messages about this method

    @dataclass
    class Options:  # growth.options.scale=...
        scale: float = bounded(1.0, 0.0, lo_open=True, help="multiplies both directions")

    def propose(self, site, stats, count: int, ctx: EventContext):
        g, scale = self.g, self.options.scale
        fit = fit_site(site, stats, self.name, conv_fanout=g.conv_fanout, solve_device=ctx.solve_device,
                       rel_eps=g.rel_eps)
        d1, _, m = stats.dims  # fan-in (L1's bias entry last, if any), L2's input, L2's output
        bias = site.l1.bias is not None
        count = max(int(count), 0)
        # fan-in: a direction over L1's weights (the bias entry stays 0), at the existing mean norm
        W1 = site.l1.weight.detach().to(torch.float64).reshape(site.width, -1)
        r_in = float(W1.norm(dim=1).mean()) if site.width else math.sqrt(2.0)
        alpha = torch.zeros(count, d1, dtype=torch.float64)
        alpha[:, : d1 - bias] = unit_rows(count, d1 - bias, ctx.generator) * (scale * r_in)
        # fan-out: a direction of L2's outputs (conv: the centre tap), at the existing mean norm
        omega = unit_rows(count, m, ctx.generator) * (scale * reference_norm(site, count))
        alpha, omega = alpha.to(fit.device), omega.to(fit.device)
        # the sign whose first-order change of the loss, alpha_k^T M1 omega_k, is <= 0
        per = (alpha @ fit.ns.M1 * omega).sum(1)
        omega = torch.where((per > 0).unsqueeze(1), -omega, omega)
        return fit.proposal(self.name, alpha, omega)
'''

# an MLP on 8x8 synthetic images, 4 steps per epoch, growth events at steps 4 and 6 (growth.dt=0.5)
ARGS = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=8",
        "dataset.augment=true", "model=mlp", "model.hidden=[32,32]", "model.start_fraction=0.125",
        "growth=tiny", f"growth.method={METHOD}", "growth.steps=2", "growth.dt=0.5", "growth.samples=128",
        "growth.stats_batch_size=64", "growth.line_search.batch_size=64", "trainer.batch_size=64",
        "trainer.epochs=2", "trainer.threads=1", "trainer.progress=off", "trainer.checkpoint_every=1"]


@pytest.fixture(scope="module", autouse=True)
def user_package(tmp_path_factory):
    """The method as a user's own module: mygrowth/fixed_direction.py in a directory on sys.path."""
    root = tmp_path_factory.mktemp("user")
    (root / "mygrowth").mkdir()
    (root / "mygrowth" / "__init__.py").write_text("")
    (root / "mygrowth" / "fixed_direction.py").write_text(SOURCE)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    yield root
    sys.path.remove(str(root))
    for name in [n for n in sys.modules if n == "mygrowth" or n.startswith("mygrowth.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs tests share, made by the first test that needs each (see `trained`)."""
    return tmp_path_factory.mktemp("runs"), {}


def trained(run_cli, runs, name: str, *extra: str) -> Path:
    """The directory of run `name` (ARGS + extra), run through the CLI once per module."""
    root, done = runs
    if name not in done:
        proc = run_cli("train", *ARGS, *extra, f"hydra.run.dir={root / name}", cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done[name] = root / name
    return done[name]


def read(path: Path) -> list[dict]:
    """A CSV's rows without the timing columns."""
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def final_model(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")[0]["model"]


def make(**settings) -> GrowthMethod:
    """The method with the growth config's defaults and these settings (its own options included)."""
    return load(METHOD)(*growth_settings(METHOD, **settings))


# ---------------------------------------------------------------- the method on one site

@pytest.mark.parametrize("conv", [False, True])
def test_proposal_fits_the_site_and_has_the_layer_scale(conv):
    net, _, st = setup(conv, bias1=not conv, bias2=True, m=5)
    site, K = net.site(), 3
    prop = make(scale=0.5).propose(site, st, K, EventContext(generator=torch.Generator().manual_seed(0)))
    nz = prop.neurons
    assert nz.count == K and nz.w1.shape == (K, *net.l1.weight.shape[1:])
    assert (nz.b1 is None) == (net.l1.bias is None) and (nz.b1 is None or not nz.b1.any())
    assert nz.w2.shape == ((5, K, 3, 3) if conv else (5, K))
    assert nz.w1.dtype == nz.w2.dtype == net.l1.weight.dtype
    if conv:
        off = nz.w2.clone()
        off[:, :, 1, 1] = 0
        assert not off.any()  # the fan-out at the centre tap only
    assert prop.dw2.shape == net.l2.weight.shape and prop.db2.shape == net.l2.bias.shape
    # the option: fan-ins and fan-outs at 0.5 x the existing neurons' mean norms
    r_in = float(net.l1.weight.detach().flatten(1).norm(dim=1).mean())
    r_out = float(net.l2.weight.detach().transpose(0, 1).flatten(1).norm(dim=1).mean())
    fan_in, fan_out = nz.w1.reshape(K, -1).norm(dim=1), nz.w2.transpose(0, 1).reshape(K, -1).norm(dim=1)
    torch.testing.assert_close(fan_in, torch.full_like(fan_in, 0.5 * r_in))
    torch.testing.assert_close(fan_out, torch.full_like(fan_out, 0.5 * r_out))
    # the sign rule: no neuron increases the loss to first order
    assert prop.per_neuron.shape == (K,) and (prop.per_neuron <= 0).all()
    assert prop.first_order == pytest.approx(float(prop.per_neuron.sum())) and prop.first_order < 0
    # the event's generator decides the directions: the same seed, the same neurons
    again = make(scale=0.5).propose(site, st, K, EventContext(generator=torch.Generator().manual_seed(0)))
    other = make(scale=0.5).propose(site, st, K, EventContext(generator=torch.Generator().manual_seed(1)))
    assert torch.equal(again.neurons.w1, nz.w1) and torch.equal(again.neurons.w2, nz.w2)
    assert not torch.equal(other.neurons.w1, nz.w1)
    assert make().propose(site, st, 0, EventContext(generator=torch.Generator())).count == 0


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("normalize", ["fan_in", "none", "fan_out"])
def test_insert_keeps_the_function_at_0_and_is_what_the_search_evaluated(conv, normalize):
    """The method's own `insert`, as a growth event calls it (the neurons fitted to the site, the
    new BatchNorm channels' moments measured on a batch): at gamma = 0 the network's outputs do
    not change; at gamma > 0 they are what the line search's candidate computed at that gamma,
    in training mode (where the search runs) and in eval mode. The moments and the outputs are
    taken on one batch, as in a growth event (the line-search batch): in training mode,
    normalize=fan_in's rebalancing keeps the function exactly on that batch only (BatchNorm's eps)."""
    net, batches, st = setup(conv, bias1=not conv, bias2=True, m=5)
    batches = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    method = make(normalize=normalize)
    site = net.site()
    prop = method.propose(site, st, 2, EventContext(generator=torch.Generator().manual_seed(0)))
    neurons = fit_to_site(site, prop.neurons)
    moments = new_channel_moments(net, site, neurons, [batches[0][0]])
    assert method.attach(site, prop, neurons) is None  # the standard candidate is what the search evaluates

    def widened(gamma):
        grown = copy.deepcopy(net)
        s = grown.site()
        method.insert(s, prop, fit_to_site(s, neurons), moments, gamma, None)
        assert s.width == site.width + 2
        return grown

    for train in (False, True):
        net.train(train)
        before = outputs(net, batches)
        at0 = widened(0.0).train(train)
        torch.testing.assert_close(outputs(at0, batches), before, rtol=1e-12, atol=1e-12)
        with candidate(site, neurons, *moments) as handle:
            handle.gamma = 0.7
            searched = outputs(net, batches)
        inserted = outputs(widened(0.7).train(train), batches)
        assert (inserted - before).abs().max() > 1e-6  # the neurons do change the function
        torch.testing.assert_close(inserted, searched, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- through the CLI

@pytest.mark.slow
def test_a_run_grows_with_it_and_names_it_in_growth_csv(run_cli, runs):
    run_dir = trained(run_cli, runs, "full")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    rows = read(run_dir / "growth.csv")
    assert {r["event"] for r in rows} == {"1", "2"} and {r["site"] for r in rows} == {"fc1", "fc2"}
    assert all(r["method"] == METHOD for r in rows)
    assert all(int(r["added"]) > 0 and float(r["gamma"]) > 0 for r in rows)
    assert all(float(r["first_order"]) < 0 and float(r["loss_after"]) < float(r["loss_before"]) for r in rows)
    last = {r["site"]: int(r["width_after"]) for r in rows}
    assert last == {"fc1": 32, "fc2": 32}  # from 4 (start_fraction 1/8) to the full width in growth.steps=2 events
    model = final_model(run_dir)
    assert model["linears.0.weight"].shape[0] == 32 and model["linears.1.weight"].shape == (32, 32)


@pytest.mark.slow
def test_its_option_reaches_it(run_cli, runs):
    """+growth.options.scale=0.5 halves fan-ins and fan-outs: at the first event (the same network
    and statistics in both runs) the predicted first-order change per gamma^2 is 1/4 of scale 1's."""
    full = read(trained(run_cli, runs, "full") / "growth.csv")
    half = read(trained(run_cli, runs, "half", "+growth.options.scale=0.5") / "growth.csv")
    first = [(a, b) for a, b in zip(full, half) if a["event"] == "1"]
    assert len(first) == 2
    for a, b in first:
        assert (a["site"], a["psi"], a["loss_before"]) == (b["site"], b["psi"], b["loss_before"])
        assert float(b["first_order"]) == pytest.approx(0.25 * float(a["first_order"]), rel=1e-6)


@pytest.mark.parametrize("override,message", [
    ("+growth.options.bogus=1", f"growth.options.bogus: not an option of growth.method={METHOD}; its options: scale"),
    ("+growth.options.scale=-1", "growth.options.scale=-1.0: out of range; must be > 0"),
    ("+growth.options.scale=abc", "growth.options.scale=abc: not a value of its type in FixedDirection.Options"),
    ("growth.options.scale=2", "growth.options.scale: an option of your own method is a new key for Hydra; "
                               "write +growth.options.scale=VALUE"),
    ("growth.method=nosuchmodule:X", "growth.method=nosuchmodule:X: cannot import nosuchmodule"),
    ("growth.method=mygrowth.fixed_direction:unit_rows",
     "growth.method=mygrowth.fixed_direction:unit_rows: mygrowth.fixed_direction has no GrowthMethod subclass"),
])
def test_bad_names_and_options_are_refused_in_one_line(tmp_path, run_cli, override, message):
    proc = run_cli("train", *ARGS, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"growrun: error: {message}"), lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_end(run_cli, runs, monkeypatch):
    """Stopped in the second growth event (step 6), after the checkpoint of step 5, which holds the
    first event's neurons; resumed, it ends exactly as the uninterrupted run."""
    full = trained(run_cli, runs, "full")
    root, _ = runs
    cut = root / "cut"
    with interrupted_at(monkeypatch, "stats", 2):
        proc = run_cli("train", *ARGS, f"hydra.run.dir={cut}", cwd=root)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    state, _ = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert state["trainer"]["step"] == 5
    assert {r["event"] for r in read(cut / "growth.csv")} == {"1"}
    proc = run_cli("train", *ARGS, "resume=true", f"hydra.run.dir={cut}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((cut / "summary.json").read_text())["status"] == "completed"
    assert read(cut / "growth.csv") == read(full / "growth.csv")
    assert read(cut / "metrics.csv") == read(full / "metrics.csv")
    a, b = final_model(full), final_model(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the page that explains it

def test_the_docs_show_this_method():
    """docs/methods.md's complete example is SOURCE, verbatim."""
    text = (ROOT / "docs" / "methods.md").read_text()
    assert f"```python\n{SOURCE}```" in text
