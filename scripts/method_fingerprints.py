"""Fingerprints of every growth method on a short synthetic run: the sha256 of growth.csv (timing
columns left out) and of the final weights, per method and a few option variants, into a JSON.

A refactoring that must not change any method's results runs this before and after and compares
the two files (bit-identical on the same CPU):

    python scripts/method_fingerprints.py --out before.json        # on the old commit
    python scripts/method_fingerprints.py --out after.json --compare before.json

The runs use 1 thread (deterministic on CPU); a ResNet18 and an MLP, 3 epochs, 256 images.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESNET = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "model=resnet18", "model.width=0.125",
          "model.start_fraction=0.015625", "growth.target_fraction=0.0625", "growth.steps=2", "growth.dt=0.5",
          "growth.samples=128", "growth.stats_batch_size=64", "growth.line_search.batch_size=64",
          "trainer.batch_size=64", "trainer.epochs=3", "trainer.threads=1", "trainer.progress=off"]
MLP = [*RESNET[:3], "model=mlp", "model.hidden=[32,32]", "model.start_fraction=0.125", *RESNET[7:]]
METHODS = ["tiny", "tiny_noproj", "tiny_full", "gradmax", "random", "zero", "net2net", "firefly", "splitting"]
# option variants that take other paths through the event (name, base, overrides)
VARIANTS = [("tiny+adaptive", RESNET, ["growth=tiny", "growth.neurons=adaptive"]),
            ("tiny+stats_training", RESNET, ["growth=tiny", "growth.stats=training"]),
            ("tiny+apply_dw", RESNET, ["growth=tiny", "growth.apply_dw=true"]),
            ("gradmax+mean_norm", RESNET, ["growth=gradmax", "growth.normalize=mean_norm"]),
            ("tiny+best_gain", MLP, ["growth=tiny", "growth.sites=best_gain"]),
            *((f"{m}+mlp", MLP, [f"growth={m}"]) for m in METHODS if m != "tiny_full")]


def growth_rows_hash(path: Path) -> tuple[str, int]:
    with path.open(newline="") as f:
        rows = [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]
    added = sum(int(r["added"]) for r in rows)
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(), added


def weights_hash(path: Path) -> str:
    from growrun.train.outputs import load_checkpoint

    state = load_checkpoint(path)[0]["model"]
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(key.encode())
        h.update(t.float().numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


def fingerprint(name: str, args: list[str], root: Path) -> dict:
    run_dir = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "growrun", "train", *args, f"hydra.run.dir={run_dir}"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    rows, added = growth_rows_hash(run_dir / "growth.csv")
    return {"growth_csv": rows, "added": added, "weights": weights_hash(run_dir / "checkpoints" / "last.pt")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="a JSON of an earlier run of this script")
    ap.add_argument("--keep", type=Path, help="keep the run directories here")
    ap.add_argument("--only", nargs="*", help="these names only")
    a = ap.parse_args()
    runs = [(m, RESNET, [f"growth={m}"]) for m in METHODS] + VARIANTS
    runs = [r for r in runs if not a.only or r[0] in a.only]
    root = a.keep or Path(tempfile.mkdtemp(prefix="fingerprints-"))
    result = {}
    for i, (name, base, extra) in enumerate(runs, 1):
        result[name] = fingerprint(name, [*base, *extra], root)
        print(f"[{i}/{len(runs)}] {name}: {result[name]}", flush=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    if a.compare is None:
        return 0
    before = json.loads(a.compare.read_text())
    differ = [n for n in result if n in before and result[n] != before[n]]
    for n in differ:
        print(f"DIFFERS {n}: before {before[n]} after {result[n]}")
    print(f"{len(result) - len(differ)} of {len(result)} identical to {a.compare}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
