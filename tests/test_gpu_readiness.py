"""CUDA / NCCL faults reproduced without a GPU (issue: GPU readiness): CUDA calls replaced by
fakes that behave as torch.cuda does on a machine with GPUs, and the checks that run the same on
a CPU (TF32 flags, memory layouts of optimizer state, collectives' inputs, host syncs per step).
What needs a real GPU is checked by `make gpu-check` (scripts/gpu_check.py)."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
from helpers_training import compose_cfg

from growrun import devices
from growrun.errors import GrowrunError
from growrun.train.events import controller as controller_module
from growrun.train.events import event as event_module
from growrun.growth import stats_training
from growrun.growth.neurons import Neurons
from growrun.growth.surgery import insert_neurons
from growrun.models import build_model
from growrun.train import distributed, runtime
from growrun.train import run as run_module
from growrun.train.outputs import load_checkpoint, save_checkpoint
from growrun.train.safety import config_differences
from growrun.train.trainer import match_state_strides


class FakeCuda:
    """torch.cuda's RNG calls on a machine with `count` GPUs, each with its own generator state."""

    def __init__(self, count: int):
        self.count = count
        self.states = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(count)}
        self.current = 0

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.states[i] for i in range(self.count)])

        def set_all(states):
            if len(states) > self.count:  # as torch.cuda does: there is no such device
                raise RuntimeError("CUDA error: invalid device ordinal")
            for i, s in enumerate(states):
                self.set_rng_state(s, i)

        monkeypatch.setattr(cuda, "set_rng_state_all", set_all)

    def get_rng_state(self, device=0) -> torch.Tensor:
        return self.states[torch.device("cuda", device).index if isinstance(device, int) else device.index].clone()

    def set_rng_state(self, state: torch.Tensor, device=0) -> None:
        index = device if isinstance(device, int) else torch.device(device).index
        assert state.device.type == "cpu" and state.dtype == torch.uint8, "torch.cuda.set_rng_state needs a CPU ByteTensor"
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.states[index] = state.clone()


def test_rng_state_of_a_cuda_run_resumes_with_fewer_gpus(tmp_path, monkeypatch):
    """A job that ran on cuda:1 of 2 GPUs (its checkpoint loaded on the CPU, as every checkpoint
    is) resumes on a node with one GPU: its generator state goes to the device it runs on."""
    two = FakeCuda(2)
    two.install(monkeypatch)
    state = runtime.rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], two.states[1])  # the run's own GPU only, not every visible one
    save_checkpoint(tmp_path / "last.pt", {"rng": state})
    loaded, _ = load_checkpoint(tmp_path / "last.pt")
    assert all(t.device.type == "cpu" for t in (loaded["rng"]["torch"], loaded["rng"]["cuda"]))
    one = FakeCuda(1)
    one.install(monkeypatch)
    runtime.set_rng_state(loaded["rng"], torch.device("cuda", 0))
    assert torch.equal(one.states[0], two.states[1])


def test_an_older_checkpoints_per_gpu_rng_list_restores_the_runs_device_only(monkeypatch):
    """Checkpoints before this fix hold every visible GPU's state; with fewer GPUs now,
    torch.cuda.set_rng_state_all raised. The entry of the run's device is restored, or none."""
    one = FakeCuda(1)
    one.install(monkeypatch)
    old = runtime.rng_state(torch.device("cpu"))
    old["cuda"] = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]
    runtime.set_rng_state(old, torch.device("cuda", 0))
    assert one.states[0].tolist() == [7] * 16
    one.current = 0
    runtime.set_rng_state({**old, "cuda": old["cuda"][:0]}, torch.device("cuda"))  # no entry: left as it is
    assert one.states[0].tolist() == [7] * 16


def test_checkpoints_are_read_on_the_cpu(tmp_path, monkeypatch):
    """The resume path never asks torch.load for another device (it put the RNG states on
    the GPU, where torch.set_rng_state and .numpy() refuse them)."""
    save_checkpoint(tmp_path / "last.pt", {"rng": runtime.rng_state(torch.device("cpu")), "w": torch.ones(2)})
    seen, real = [], torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state, _ = load_checkpoint(tmp_path / "last.pt")
    assert seen and set(seen) == {"cpu"}
    runtime.set_rng_state(state["rng"], torch.device("cpu"))


class _Recorder:
    def __init__(self):
        self.calls: list = []


def test_each_rank_binds_its_gpu_before_the_process_group_exists(monkeypatch):
    """NCCL binds a communicator to the current device: cuda:LOCAL_RANK must be current before
    init_process_group and before the first collective (it was made current after both, so every
    rank's first collectives ran on GPU 0)."""
    rec = _Recorder()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: rec.calls.append(("set_device", i)))
    monkeypatch.setattr(tdist, "init_process_group",
                        lambda backend, **kw: rec.calls.append(("init", backend, kw.get("device_id"))))
    dist = distributed.connect(torch.device("cuda"))
    assert rec.calls == [("set_device", 1), ("init", "nccl", torch.device("cuda", 1))]
    assert dist.device == torch.device("cuda", 1) and (dist.rank, dist.world, dist.local_rank) == (1, 2, 1)
    with pytest.raises(GrowrunError, match=r"device=cuda:0: with several ranks each rank uses cuda:LOCAL_RANK"):
        distributed.connect(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GrowrunError, match=r"LOCAL_RANK=1: only 1 CUDA device\(s\) visible"):
        distributed.connect(torch.device("cuda"))


def test_collectives_get_contiguous_tensors(monkeypatch):
    """NCCL reduces dense row-major memory only: a permuted einsum result or a channels_last
    tensor is reduced through a contiguous copy, and the result lands in the original."""
    def fake_all_reduce(t, op=None):  # two ranks holding the same values
        assert t.is_contiguous(), "a non-contiguous tensor was handed to a collective"
        t.mul_(2)

    monkeypatch.setattr(tdist, "all_reduce", fake_all_reduce)
    group = distributed.ProcessGroup.__new__(distributed.ProcessGroup)
    permuted = torch.einsum("ij->ji", torch.arange(6.0).view(2, 3))
    nhwc = torch.arange(24.0).view(1, 2, 3, 4).contiguous(memory_format=torch.channels_last)
    plain = torch.ones(3)
    assert not permuted.is_contiguous() and not nhwc.is_contiguous()
    expected = [2 * t.clone() for t in (permuted, nhwc, plain)]
    group.sum_([permuted, nhwc, plain])
    assert all(torch.equal(a, b) for a, b in zip((permuted, nhwc, plain), expected))


def test_grown_parameters_momentum_takes_the_parameters_memory_layout():
    """After growth the momentum buffer of a grown conv weight is a concatenation (contiguous),
    the parameter channels_last: the optimizer's foreach kernels then take a slow path.
    match_state_strides (Trainer.prepare_model, after every event) gives it the parameter's."""
    torch.manual_seed(0)
    model = build_model({"name": "resnet18", "in_channels": 3, "num_classes": 4, "stream": [4, 4, 4, 4],
                         "hidden": [2] * 8}).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    opt.step()
    site = model.sites()["layer1.0"]
    w1, w2 = site.l1.weight, site.l2.weight
    neurons = Neurons(torch.randn(2, *w1.shape[1:]), None, torch.randn(w2.shape[0], 2, *w2.shape[2:]))
    insert_neurons(site, neurons, torch.zeros(2), torch.ones(2), opt)
    model.to(memory_format=torch.channels_last)
    grown = [p for p in (site.l1.weight, site.l2.weight)]
    assert any(opt.state[p]["momentum_buffer"].stride() != p.stride() for p in grown)  # the fault
    before = {p: opt.state[p]["momentum_buffer"].clone() for p in grown}
    match_state_strides(opt)
    for p in model.parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride()
    assert all(torch.equal(opt.state[p]["momentum_buffer"], before[p]) for p in grown)


@pytest.mark.slow
def test_growth_events_run_without_tf32_while_training_may_use_it(tmp_path, monkeypatch):
    """trainer.tf32=true: training steps with TF32 allowed, every growth event (statistics pass,
    line search) and the products recorded during training (stats=training) without it, and
    the flags restored after each event."""
    seen: dict[str, set] = {"stats": set(), "search": set(), "train": set(), "window": set()}
    real_stats, real_search = event_module.collect_statistics, event_module.line_search
    real_accumulate = stats_training._TrainingRecorder.accumulate

    def stats_spy(*a, **k):
        seen["stats"].add(devices.tf32_enabled())
        return real_stats(*a, **k)

    def search_spy(*a, **k):
        seen["search"].add(devices.tf32_enabled())
        return real_search(*a, **k)

    def accumulate_spy(self, *a, **k):
        seen["window"].add(devices.tf32_enabled())
        return real_accumulate(self, *a, **k)

    monkeypatch.setattr(event_module, "collect_statistics", stats_spy)
    monkeypatch.setattr(event_module, "line_search", search_spy)
    monkeypatch.setattr(stats_training._TrainingRecorder, "accumulate", accumulate_spy)
    real_step = torch.optim.SGD.step

    def step_spy(self, *a, **k):
        seen["train"].add(devices.tf32_enabled())
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step_spy)
    saved = devices.tf32_flags()
    try:
        run_module.run(compose_cfg("trainer.tf32=true", "trainer.epochs=2"), tmp_path / "pass")
        assert seen["stats"] == seen["search"] == {(False, False)} and seen["train"] == {(True, True)}
        seen.update(search=set(), train=set())
        run_module.run(compose_cfg("trainer.tf32=true", "trainer.epochs=2", "growth.stats=training"),
                       tmp_path / "training")
        assert seen["window"] == seen["search"] == {(False, False)} and seen["train"] == {(True, True)}
    finally:
        devices.set_tf32_flags(saved)


@pytest.mark.slow
def test_ranks_agree_on_stops_every_few_steps_not_every_step(tmp_path, monkeypatch):
    """With several ranks the stop / timed-checkpoint agreement (an all-reduce and a host sync)
    runs after every agree_every-th step and before each epoch, not after every step; the step
    count's checkpoints (trainer.checkpoint_every) are still written at their steps; a signal
    is acted on at the next agreement."""
    class Ranks(distributed.Single):
        active, agree_every = True, 3

        def __init__(self, device):
            super().__init__(device)
            self.agreed: list[int] = []

        def agree(self, due, stop):
            self.agreed.append(session_step())
            return due, stop

    made: list[Ranks] = []
    monkeypatch.setattr(distributed, "connect", lambda device: made.append(Ranks(device)) or made[-1])
    saved_steps: list[int] = []
    real_save = run_module.save_checkpoint
    monkeypatch.setattr(run_module, "save_checkpoint",
                        lambda path, state: (saved_steps.append(state["trainer"]["step"]), real_save(path, state)))
    session_step = lambda: sessions[-1].trainer.step if sessions else -1  # noqa: E731
    sessions: list = []
    real_init = run_module._Session.__init__

    def init_spy(self, *a, **k):
        real_init(self, *a, **k)
        sessions.append(self)

    monkeypatch.setattr(run_module._Session, "__init__", init_spy)
    run_module.run(compose_cfg("trainer.checkpoint_every=2", "trainer.epochs=2"), tmp_path / "run")
    steps = sessions[-1].trainer.step  # 4 steps per epoch
    assert made[-1].agreed == [0, 3, 4, 6]  # before epoch 1, after step 3, before epoch 2, after step 6
    assert saved_steps == [2, 4, 4, 6, 8, 8] and steps == 8  # every 2 steps, and each epoch's end

    real_after = run_module._Session._after_step

    def after_spy(self):  # a signal reaches this rank during step 5
        if self.trainer.step == 5 and self.signals.received is None:
            self.signals.received = signal.SIGTERM
        real_after(self)

    monkeypatch.setattr(run_module._Session, "_after_step", after_spy)
    saved_steps.clear()
    with pytest.raises(KeyboardInterrupt):
        run_module.run(compose_cfg("trainer.epochs=2"), tmp_path / "stopped")
    assert sessions[-1].trainer.step == 6 and saved_steps == [4, 6]  # epoch 1's end, then the agreed stop


def test_deterministic_auto_is_on_for_cpu_off_for_cuda_and_old_checkpoints_resume():
    assert runtime.deterministic_mode("auto", torch.device("cpu")) is True
    assert runtime.deterministic_mode("auto", torch.device("cuda", 0)) is False
    assert runtime.deterministic_mode(True, torch.device("cuda")) is True
    stored = {"trainer": {"deterministic": True}, "seed": 0}  # a checkpoint from before `auto`
    assert config_differences(stored, {"trainer": {"deterministic": "auto", "tf32": False}, "seed": 0}) == []


def test_solve_device_auto_is_chosen_on_rank_0_and_shared(monkeypatch):
    """growth.solve_device=auto times the GPU against the CPU: ranks timing on their own could
    choose differently (and then differ in the last bits); rank 0's choice is shared."""
    timed = []
    monkeypatch.setattr(controller_module, "pick_solve_device",
                        lambda device, choice: timed.append(choice) or torch.device("cpu"))

    class Rank1(distributed.Single):
        rank, active = 1, True

        def share(self, value):
            assert value is None  # rank 1 did not time anything
            return "model"  # rank 0's choice

    ranks = [SimpleNamespace(g=SimpleNamespace(solve_device="auto"), dist=d, _solve_on=None)
             for d in (distributed.Single(), Rank1())]
    choose = controller_module.GrowthController.solve_device
    assert choose(ranks[0], torch.device("cpu")) == "cpu" and choose(ranks[1], torch.device("cpu")) == "model"
    assert choose(ranks[0], torch.device("cpu")) == "cpu" and timed == ["auto"]  # chosen once per run


def test_a_checkpoint_window_of_two_ranks_restores_each_ranks_share():
    """growth.stats=training under DDP: each rank's partial sums are saved (gather_window) and
    each rank resumes its own; saved by another number of ranks, rank 0 resumes their sum."""
    def window(v):
        return {"fc1": {"S1": torch.full((2, 2), v), "n_folds": torch.tensor([1, 2]), "batches": 1}}

    class Two(distributed.Single):
        active, world = True, 2

        def gather(self, value):
            return [value, window(5.0)]

    saved = stats_training.gather_window(window(1.0), Two())
    assert [r["fc1"]["S1"][0, 0].item() for r in saved["ranks"]] == [1.0, 5.0]
    assert stats_training.rank_window(saved, 1, 2)["fc1"]["S1"][0, 0] == 5.0
    merged = [stats_training.rank_window(saved, r, 3)["fc1"] for r in range(3)]
    assert [m["S1"][0, 0].item() for m in merged] == [6.0, 0.0, 0.0]
    assert merged[0]["n_folds"].tolist() == [2, 4] and all(m["batches"] == 1 for m in merged)
    assert stats_training.rank_window(window(1.0), 0, 1)["fc1"]["S1"][0, 0] == 1.0  # one process, as before


def test_ddp_trains_a_model_with_a_site_at_width_zero(tmp_path):
    """A site at width 0 (model.start_fraction=0) has empty parameters that never reach the
    loss; DDP waited for their gradients and failed at the second step ('Expected to have
    finished reduction'). A one-rank gloo group runs DDP's real reducer."""
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = distributed.ProcessGroup.__new__(distributed.ProcessGroup)
        group.device = torch.device("cpu")
        torch.manual_seed(0)
        model = build_model({"name": "resnet18", "in_channels": 3, "num_classes": 4, "stream": [4, 4, 4, 4],
                             "hidden": [0, 2, 2, 2, 2, 2, 2, 2]})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):  # the wrapper rebuilt as after a growth event
            net = group.wrap(model)
            for _ in range(2):  # the second step waited for the empty parameters' gradients
                loss = net(torch.randn(4, 3, 8, 8)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        assert model.sites()["layer1.0"].width == 0 and torch.isfinite(loss)
    finally:
        tdist.destroy_process_group()


def test_new_batchnorm_moments_are_summed_across_ranks():
    """Under DDP each rank holds a share of the line-search batch: the new channels' moments
    are reduced across ranks, so every rank searches and inserts the BatchNorm of the whole
    batch (before, each its own share's, and rank 0's was broadcast after the search)."""
    from growrun.growth.surgery import new_channel_moments

    torch.manual_seed(0)
    model = build_model({"name": "mlp", "in_features": 48, "num_classes": 5, "hidden": [6, 4], "batchnorm": True})
    site = model.sites()["fc1"]
    neurons = Neurons(torch.randn(3, 48), torch.randn(3), torch.randn(4, 3))
    x = torch.randn(10, 48)
    whole = new_channel_moments(model, site, neurons, [x])
    other: list = []
    new_channel_moments(model, site, neurons, [x[6:]], reduce=lambda acc: other.append(acc[0].clone()))
    shared = new_channel_moments(model, site, neurons, [x[:6]], reduce=lambda acc: acc[0].add_(other[0]))
    alone = new_channel_moments(model, site, neurons, [x[:6]])
    for a, b, c in zip(whole, shared, alone):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
