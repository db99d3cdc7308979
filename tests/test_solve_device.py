"""growrun.growth.solve_device: where the float64 solves run (growth.solve_device), with a fake
timer (no GPU needed), and identical proposals for every choice on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from growrun.config.schema import GrowthConfig
from helpers_proposing import propose
from growrun.growth.solve_device import CHOICES, faster, moved, solve_device
from growrun.growth.stats import SiteStats
from helpers_sitenet import SiteNet, data, stats_of

pytestmark = pytest.mark.usefixtures("one_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")


def fake_timer(gpu_s: float, cpu_s: float):
    calls = []

    def timer(device):
        calls.append(device)
        return gpu_s, cpu_s
    return timer, calls


def test_faster_is_pure():
    assert faster(0.1, 1.0) == "device" and faster(1.0, 0.1) == "cpu" and faster(0.5, 0.5) == "device"


@pytest.mark.parametrize("gpu_s,cpu_s,want", [(0.01, 0.2, CUDA), (3.0, 0.2, CPU)])
def test_auto_on_cuda_times_once_and_picks_the_faster(gpu_s, cpu_s, want):
    timer, calls = fake_timer(gpu_s, cpu_s)
    assert solve_device(CUDA, "auto", timer=timer) == want
    assert solve_device("cuda:0", "auto", timer=timer) == want  # cached: timed once per process
    assert len(calls) == 1 and calls[0] == CUDA


def test_fixed_choices_never_time():
    timer, calls = fake_timer(1.0, 1.0)
    assert solve_device(CPU, "auto", timer=timer) == CPU
    assert solve_device(CPU, "model", timer=timer) == CPU
    assert solve_device(CUDA, "cpu", timer=timer) == CPU
    assert solve_device(CUDA, "model", timer=timer) == CUDA
    for choice in CHOICES:  # MPS has no float64
        assert solve_device(torch.device("mps"), choice, timer=timer) == CPU
    assert calls == []
    with pytest.raises(ValueError, match="solve_device"):
        solve_device(CPU, "gpu")


def test_moved_moves_every_tensor_field():
    st = SiteStats.zeros(3, 2, 4)
    assert moved(st, CPU) is st  # already there: no copy
    meta = moved(st, torch.device("meta"))
    assert all(t.device.type == "meta" for t in meta.tensors()) and meta.conv_fanout == st.conv_fanout
    assert st.S1.device == CPU


@pytest.mark.parametrize("method", ["tiny", "tiny_noproj", "gradmax", "random"])
def test_every_choice_gives_the_same_proposal_on_cpu(method):
    net = SiteNet(True, width=2, m=5)
    st = stats_of(net, [data(True, 8, seed=s) for s in (1, 2)])
    props = [propose(net.site(), st, method, 2, generator=torch.Generator().manual_seed(0), solve_device=c)
             for c in CHOICES]
    for p in props[1:]:
        for a, b in [(p.neurons.w1, props[0].neurons.w1), (p.neurons.w2, props[0].neurons.w2), (p.dw2, props[0].dw2),
                     (p.lambdas, props[0].lambdas), (p.per_neuron, props[0].per_neuron)]:
            assert torch.equal(a, b)
        assert (p.psi, p.d_w, p.first_order, p.bottleneck_gain) == \
            (props[0].psi, props[0].d_w, props[0].first_order, props[0].bottleneck_gain)


def test_config_key():
    assert GrowthConfig().solve_device == "auto"
    tiny = Path(__file__).resolve().parents[1] / "configs" / "growth" / "tiny.yaml"
    assert "\nsolve_device: auto" in tiny.read_text()
