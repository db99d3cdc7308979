#!/usr/bin/env python3
"""Training speed of channels_last vs contiguous (NCHW) memory format on this machine.

One training step = forward, cross-entropy, backward, SGD step, on random CIFAR-shaped batches.
Models: ResNet18 with a 1/4-width residual stream and hidden widths 1/4 (the presets' final
network) and 1/64 (their starting network). Formats alternate (cl, contiguous, cl, ...) over
--rounds rounds of --steps timed steps each, after warm-up steps; the median img/s per format
is kept. Run it once as is and once with ONEDNN_MAX_CPU_ISA=AVX2 (what an AVX2-only CPU runs):

    python scripts/bench_memory_format.py                         # -> bench/memory_format.json
    ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_memory_format.py

Each invocation adds (or replaces) its entry, keyed by CPU and ISA setting, in the JSON file.
The numbers are what trainer.channels_last=auto is decided from (growrun/train/runtime.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growrun.models import build_model
from machine_info import machine_info

MODELS = {
    "resnet18 stream 1/4, hidden 1/4": {"stream": [16, 32, 64, 128], "hidden": [16, 16, 32, 32, 64, 64, 128, 128]},
    "resnet18 stream 1/4, hidden 1/64": {"stream": [16, 32, 64, 128], "hidden": [1, 1, 2, 2, 4, 4, 8, 8]},
}


def steps_per_second(widths: dict, memory_format, batch: int, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model({"name": "resnet18", "in_channels": 3, "num_classes": 10, **widths})
    model = model.to(memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/memory_format.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    results = {}
    for name, widths in MODELS.items():
        runs = {f: [] for f in formats}
        for _ in range(args.rounds):
            for f, mf in formats.items():
                runs[f].append(steps_per_second(widths, mf, args.batch, args.warmup, args.steps))
        med = {f: statistics.median(v) for f, v in runs.items()}
        results[name] = {"images_per_second": med, "all": runs,
                         "channels_last_over_contiguous": med["channels_last"] / med["contiguous"]}
        print(f"{name}: channels_last {med['channels_last']:.0f} img/s, contiguous {med['contiguous']:.0f} img/s, "
              f"ratio {results[name]['channels_last_over_contiguous']:.2f}")
    machine = machine_info()
    entry = {"machine": machine, "threads": args.threads, "batch": args.batch, "steps": args.steps,
             "rounds": args.rounds, "models": results}
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else {}
    records[f"{machine['cpu']} | ISA={machine['ONEDNN_MAX_CPU_ISA'] or 'native'}"] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
