"""Child process of test_cpu_safety.py: trains the smallest models users can configure and runs
growth on 1-4-wide sites, in the memory format training uses by default. A crash of torch's
CPU kernels kills this process (SIGSEGV, abort) or hangs it; the parent reports which.

    python tests/cpu_probe.py THREADS[,THREADS...]

Runs everything at each thread count in turn; prints one line per stage (with the thread count)
so that the parent can say where it stopped.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from growrun.growth.linesearch import line_search
from helpers_proposing import propose
from growrun.growth.stats import collect_statistics
from growrun.growth.surgery import insert_neurons, new_channel_moments
from growrun.models import build_model
from growrun.train.runtime import memory_format

FORMAT = memory_format("auto", torch.device("cpu"))
# ResNet18 residual streams 1/64 ... 1/8 of (64, 128, 256, 512), hidden widths 0 ... 4.
MODELS = [{"name": "resnet18", "in_channels": 3, "num_classes": 10, "stream": [s, 2 * s, 4 * s, 8 * s],
           "hidden": [0, 1, 2, 3, 4, 1, 2, 3]} for s in (1, 2, 4, 8)]
MODELS += [{"name": "vgg", "in_channels": 3, "num_classes": 10, "stream": [1, 2, 4, 8], "hidden": [0, 1, 2, 4],
            "batchnorm": bn} for bn in (True, False)]
MODELS += [{"name": "mlp", "in_features": 3 * 32 * 32, "num_classes": 10, "hidden": [0, 1], "batchnorm": True}]


def batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=FORMAT)
    return x, torch.randint(0, 10, (n,), generator=g)


def train_steps(model, steps: int = 3) -> None:
    model.to(memory_format=FORMAT).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(steps):
        x, y = batch(32, i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def grow_every_site(model) -> None:
    """Statistics pass, TINY proposal, new-channel moments, line search and insertion at every
    site (widths 0-4), then training of the grown model."""
    model.to(memory_format=FORMAT).train()
    sites = model.sites()
    batches = [batch(32, 10 + i) for i in range(2)]
    stats = collect_statistics(model, list(sites.values()), batches, lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    search = SimpleNamespace(max_gamma=100.0, shrink=0.5, max_iter=4)
    for name, site in sites.items():
        proposal = propose(site, stats[name], "tiny", 2)
        neurons = proposal.neurons
        if neurons.count == 0:
            continue
        moments = new_channel_moments(model, site, neurons, [x for x, _ in batches]) if site.bn is not None else None
        found = line_search(model, site, neurons, moments, proposal.first_order, batch(32, 20),
                            lambda out, y: F.cross_entropy(out, y), search)
        gamma = found.gamma or 1.0
        mean, var = moments if moments is not None else (None, None)
        insert_neurons(site, neurons.scaled(gamma), None if mean is None else gamma * mean,
                       None if var is None else gamma * gamma * var)
    train_steps(model, 2)


def main() -> None:
    print(f"memory format {FORMAT}", flush=True)
    for threads in map(int, sys.argv[1].split(",")):
        torch.set_num_threads(threads)
        for arch in MODELS:
            widths = {k: arch[k] for k in ("stream", "hidden") if k in arch}
            print(f"{threads} threads: train {arch['name']} {widths}", flush=True)
            torch.manual_seed(0)
            train_steps(build_model(arch))
        for arch in (MODELS[0], MODELS[2], MODELS[4]):
            print(f"{threads} threads: grow {arch['name']} {arch.get('stream')} {arch['hidden']}", flush=True)
            torch.manual_seed(0)
            grow_every_site(build_model(arch))
    print("ok", flush=True)


if __name__ == "__main__":
    main()
