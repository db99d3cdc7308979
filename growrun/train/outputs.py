"""What a run writes into its directory, written so that a crash never leaves a torn file.

    <run dir>/.hydra/               the composed config (written by Hydra)
    <run dir>/metrics.csv           one row per epoch, flushed as soon as the epoch ends
    <run dir>/growth.csv            one row per site per growth event
    <run dir>/checkpoints/last.pt   everything needed to continue (atomic replace)
    <run dir>/summary.json          status and final numbers (atomic replace)

On resume, rows of the CSV files that come after the checkpoint are dropped, so the files
always describe exactly the trajectory the checkpoint continues.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class CsvLog:
    """An append-only CSV file with a fixed header; each row is flushed when written."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns

    def start(self, keep=None) -> None:
        """Begin the file; with `keep` (a predicate on rows), keep the existing matching rows."""
        rows = []
        if keep is not None and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if keep(r)]
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, self.columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        atomic_write(self.path, write)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            for row in rows:
                w.writerow({k: _fmt(v) for k, v in row.items()})
            f.flush()


def _fmt(v: Any) -> Any:
    return f"{v:.8g}" if isinstance(v, float) else v


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def write_summary(path: Path, summary: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n"))
