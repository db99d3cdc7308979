#!/usr/bin/env python3
"""Time growrun's training epoch against a minimal hand-written PyTorch loop.

Both loops train the same model (same init, channels-last memory format), with the same
optimizer settings, batch size and preloaded uint8 tensors, on the same device. The plain loop indexes, normalises, (optionally)
crops/flips, then forward / cross-entropy / backward / SGD step, and nothing else. growrun's
epoch is Trainer.train_epoch (scheduler, on-device metrics, progress hooks, growth checks).
Epochs alternate (plain, growrun, plain, ...) and the median of each is compared.

    python scripts/bench_train.py --root ~/.cache/growrun-data --width 0.25 --images 10000

Writes bench/train_loop.json (ratio growrun / plain; goal <= 1.05). Without CIFAR-10 at --root
it uses synthetic data of the same shape.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from growrun.config import store  # noqa: F401
from growrun.data import load_data
from growrun.data.loader import crop_flip, draw_epoch
from growrun.errors import GrowrunError
from growrun.models import build_model, initial_arch
from growrun.train.optim import build_optimizer, build_scheduler
from growrun.train.trainer import Trainer
from machine_info import machine_info


def config(args, augment: bool):
    overrides = [f"model.width={args.width}", f"trainer.batch_size={args.batch}", "trainer.progress=off",
                 f"dataset.train_subset={args.images}", "dataset.verify=false", "dataset.download=false",
                 f"dataset.augment={str(augment).lower()}", "trainer.epochs=100"]
    if args.root:
        overrides.append(f"dataset.root={args.root}")
    with initialize_config_module("growrun.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    try:
        data = load_data(cfg.dataset, torch.device(args.device), cfg.seed)
    except GrowrunError:
        with initialize_config_module("growrun.configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides + ["dataset=synthetic", f"dataset.train_size={args.images}",
                                                          "dataset.test_size=100"])
        data = load_data(cfg.dataset, torch.device(args.device), cfg.seed)
    return cfg, data


def plain_epoch(model, opt, data, batch: int, augment: bool, epoch: int) -> None:
    images, labels = data.train.images, data.train.labels
    dev = images.device
    mean = torch.tensor(data.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=dev).view(1, -1, 1, 1)
    n = len(labels)
    draws = draw_epoch(n, 0, epoch, shuffle=True)
    order, offsets, flips = draws.order.to(dev), draws.offsets.to(dev), draws.flips.to(dev)
    model.train()
    for i in range(n // batch):
        sl = slice(i * batch, (i + 1) * batch)
        x = images[order[sl]]
        if augment:
            x = crop_flip(x, offsets[sl], flips[sl])
        x = ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels[order[sl]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def measure(args, augment: bool) -> dict:
    cfg, data = config(args, augment)
    device = torch.device(args.device)
    arch = initial_arch(cfg.model, data.num_classes, data.input_shape)
    torch.manual_seed(0)
    ours = build_model(arch).to(device)
    torch.manual_seed(0)
    plain = build_model(arch).to(device, memory_format=torch.channels_last)
    opt_ours = build_optimizer(ours, cfg.optim)
    trainer = Trainer(cfg, ours, data, device, opt_ours, build_scheduler(opt_ours, cfg.optim, 1, 10**6))
    opt_plain = torch.optim.SGD(plain.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
    times = {"plain": [], "growrun": []}
    for r in range(args.repeats + 1):  # the first round warms up and is not counted
        for name in ("plain", "growrun"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "plain":
                plain_epoch(plain, opt_plain, data, args.batch, augment, r)
            else:
                trainer.train_epoch()
                trainer.epoch += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"augment": augment, "images": len(data.train.labels), "dataset": data.name,
            "seconds_per_epoch": med, "all": times, "ratio_growrun_over_plain": med["growrun"] / med["plain"],
            "images_per_second": {k: len(data.train.labels) / v for k, v in med.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="CIFAR root (default: growrun's)")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--images", type=int, default=10000, help="training images per timed epoch")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/train_loop.json")
    args = p.parse_args()
    results = {"model": f"resnet18 width {args.width}", "batch": args.batch, "device": args.device,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine_info(),
               "runs": [measure(args, augment) for augment in (False, True)]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for r in results["runs"]:
        s = r["seconds_per_epoch"]
        print(f"augment={r['augment']!s:5}  plain {s['plain']:.2f} s  growrun {s['growrun']:.2f} s  "
              f"ratio {r['ratio_growrun_over_plain']:.3f}  ({r['images']} {r['dataset']} images/epoch)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
