#!/usr/bin/env python3
"""How much of a run's wall time growth took, from its own logs, into a bench record.

    python scripts/growth_share.py RUN_DIR [RUN_DIR ...] [--out bench/growth_share.json]

Per run (summary.json, metrics.csv, growth.csv): final test accuracy, total and growth seconds
and their ratio (the growth share), per event the statistics (pass, or with growth.stats=training
the products added during the window), solve and line-search seconds summed over its sites,
neurons added, and the training / growth compute (FLOPs) when logged. `make growth-share` runs
`cifar10_tiny` with both statistics modes and records them; the machine info of the recording
(scripts/machine_info.py) goes with it, and any run dir can be added by hand.
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

from machine_info import machine_info
from omegaconf import OmegaConf


def run_record(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(hydra_cfg)) if hydra_cfg.exists() else {}
    events: dict[int, dict] = defaultdict(lambda: {"stats_s": 0.0, "solve_s": 0.0, "search_s": 0.0, "added": 0})
    growth_csv = run_dir / "growth.csv"
    rows = list(csv.DictReader(growth_csv.open())) if growth_csv.exists() else []
    for r in rows:
        e = events[int(r["event"])]
        e["stats_s"] += float(r["stats_seconds"] or 0)  # per-site share of the event's statistics
        e["solve_s"] += float(r["solve_seconds"] or 0)
        e["search_s"] += float(r["search_seconds"] or 0)
        e["added"] += int(r["added"])
    total, growth = summary["total_seconds"], summary["growth_seconds"]
    return {
        "run_dir": str(run_dir), "status": summary.get("status"),
        "growth_stats": (cfg.get("growth") or {}).get("stats", "pass"),
        "test_acc": (summary.get("final") or {}).get("test_acc"), "params": summary.get("params"),
        "total_seconds": total, "growth_seconds": growth, "growth_share": growth / total if total else None,
        "train_flops": summary.get("train_flops"), "growth_flops": summary.get("growth_flops"),
        "events": {k: {n: round(v, 3) if isinstance(v, float) else v for n, v in e.items()}
                   for k, e in sorted(events.items())},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("bench/growth_share.json"))
    p.add_argument("--note", default="", help="how the runs were made (threads, other load)")
    args = p.parse_args()
    runs = [run_record(d) for d in args.run_dirs]
    for r in runs:
        print(f"{r['run_dir']}: stats={r['growth_stats']} acc {r['test_acc']} growth {r['growth_seconds']:.0f} s "
              f"of {r['total_seconds']:.0f} s = {100 * r['growth_share']:.1f} %")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"task": "growth share of wall time", "note": args.note,
                                    "machine": machine_info(), "runs": runs}, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
