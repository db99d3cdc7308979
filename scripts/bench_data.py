#!/usr/bin/env python3
"""Time one CIFAR-10 training epoch of input pipeline: growrun's BatchLoader vs torchvision's standard one.

    python scripts/bench_data.py [--root DIR] [--out bench/data_pipeline.json] [--repeats 2]

Both pipelines produce the 50,000 training images per epoch in batches of 128 with random crop
(zero padding 4), random horizontal flip and normalisation, on the CPU; each batch is consumed
trivially (summed). torchvision: datasets.CIFAR10 + transforms.Compose([RandomCrop(32, padding=4),
RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)]) through DataLoader(batch_size=128,
shuffle=True) with num_workers=0 and 2 (worker start-up is part of its epoch, as in a plain
training loop). growrun: the uint8 dataset in memory, BatchLoader(shuffle, augment, drop_last) as
the trainer uses it. Each pipeline runs --repeats epochs; the fastest is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import torch

from growrun.data import BatchLoader, Split
from growrun.data.cifar import SPECS, read_cifar, resolve_root
from machine_info import machine_info

SPEC = SPECS["cifar10"]


def time_epochs(make_batches, repeats: int) -> list[float]:
    """Seconds per epoch; make_batches(epoch) returns an iterable of (images, labels)."""
    times = []
    for e in range(repeats):
        t = time.perf_counter()
        total = 0.0
        for x, _ in make_batches(e):
            total += float(x.sum())
        times.append(time.perf_counter() - t)
    return times


def growrun_pipeline(root: Path, batch_size: int, device: torch.device):
    xtr, ytr, _, _ = read_cifar("cifar10", root, download=False, verify=False)
    split = Split(xtr.to(device), ytr.to(device))
    loader = BatchLoader(split, batch_size, mean=SPEC.mean, std=SPEC.std, shuffle=True, augment=True,
                         drop_last=True, seed=0)
    return loader.epoch


def torchvision_pipeline(root: Path, batch_size: int, workers: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    class LocalCIFAR10(datasets.CIFAR10):
        """Skips the md5 checks, so a re-encoded local copy loads too."""

        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(SPEC.mean, SPEC.std)])
    ds = LocalCIFAR10(str(root), train=True, transform=tf)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    return lambda epoch: loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--root", default=None, help="holds cifar-10-batches-py/ (default: $GROWRUN_DATA, "
                                                "else ~/.cache/growrun-data)")
    p.add_argument("--out", default="bench/data_pipeline.json")
    p.add_argument("--repeats", type=int, default=2, help="epochs per pipeline; the fastest is reported")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="device of growrun's loader (torchvision's runs on CPU)")
    args = p.parse_args(argv)

    root = resolve_root(args.root)
    missing = [f for f in SPEC.files if not (root / SPEC.folder / f).is_file()]
    if missing:
        print(f"no CIFAR-10 at {root / SPEC.folder} (missing {missing[0]}). Create it with\n"
              f"    python ../shared/tools/cifar10_from_jpeg.py {root}\n"
              f"or extract the official {SPEC.archive} there, or pass --root.", file=sys.stderr)
        return 2

    results = {}
    print(f"CIFAR-10 at {root}; one training epoch, batch {args.batch_size}, crop+flip+normalise, "
          f"best of {args.repeats}", flush=True)
    pipelines = [("growrun BatchLoader", lambda: growrun_pipeline(root, args.batch_size, torch.device(args.device)))]
    pipelines += [(f"torchvision DataLoader, num_workers={w}",
                   lambda w=w: torchvision_pipeline(root, args.batch_size, w)) for w in (0, 2)]
    for name, build in pipelines:
        t = time.perf_counter()
        batches = build()
        setup = time.perf_counter() - t
        times = time_epochs(batches, args.repeats)
        results[name] = {"seconds_per_epoch": min(times), "all_epochs": times, "setup_seconds": setup}
        print(f"  {name:<38} {min(times):8.2f} s/epoch   (setup {setup:.2f} s)", flush=True)

    ours = results["growrun BatchLoader"]["seconds_per_epoch"]
    speedups = {name: r["seconds_per_epoch"] / ours for name, r in results.items() if name.startswith("torchvision")}
    print("speed-up of growrun's loader:")
    for name, s in speedups.items():
        print(f"  vs {name:<35} {s:8.1f}x")
    report = {
        "task": "one CIFAR-10 training epoch (50,000 images), batch 128, RandomCrop(32, padding=4) + "
                "RandomHorizontalFlip + Normalize, each batch summed",
        "root": str(root), "device": args.device, "batch_size": args.batch_size, "repeats": args.repeats,
        "pipelines": results, "speedup_vs": speedups,
        "env": {"torch": torch.__version__, "torchvision": _tv_version(), "python": platform.python_version(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(), "machine_info": machine_info()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _tv_version() -> str:
    import torchvision

    return torchvision.__version__


if __name__ == "__main__":
    sys.exit(main())
