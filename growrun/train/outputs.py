"""What a run writes into its directory, written so that a crash never leaves a torn file.

    <run dir>/.hydra/               the composed config (written by Hydra)
    <run dir>/metrics.csv           one row per epoch, flushed as soon as the epoch ends
    <run dir>/growth.csv            one row per site per growth event
    <run dir>/checkpoints/last.pt   everything needed to continue
    <run dir>/checkpoints/prev.pt   the checkpoint before it, kept until last.pt is complete
    <run dir>/summary.json          status and final numbers (atomic replace)
    <run dir>/.lock                 held (flock) by the process training in the directory

Every replaced file goes through a temporary file in the same directory: write, flush, fsync,
rename, fsync of the directory, so a crash of the process or of the machine leaves either the
old or the new file, never a torn one. A checkpoint is a dict {format, sha256, payload}: the
payload is the torch.save bytes of the state, and its SHA-256 detects a file damaged after the
write. Checkpoints hold tensors and plain containers only and are loaded with
torch.load(weights_only=True): a file that would need anything else (pickled code) is refused.

On resume, rows of the CSV files that come after the checkpoint are dropped, so the files
always describe exactly the trajectory the checkpoint continues.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch

from growrun.errors import GrowrunError
from growrun.files import atomic_write, disk_error

log = logging.getLogger("growrun")
FORMAT = "growrun-checkpoint-1"
class CheckpointError(GrowrunError):
    """A checkpoint that cannot be used (torn, damaged, or holding more than tensors)."""


class CsvLog:
    """An append-only CSV file with a fixed header; each row is flushed when written. After the
    rows are on disk, each of `listeners` (the run's loggers, growrun/loggers/) gets them as
    written: {column: value}, floats as their CSV text."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        self.listeners: list = []

    def start(self, keep=None) -> None:
        """Begin the file; with `keep` (a predicate on rows), keep the existing matching rows."""
        rows = []
        if keep is not None and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if keep(r)]

        def write(f) -> None:
            text = io.TextIOWrapper(f, newline="", encoding="utf-8")
            w = csv.DictWriter(text, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            text.flush()
            text.detach()

        atomic_write(self.path, write)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        written = [{k: _fmt(v) for k, v in row.items() if k in self.columns} for row in rows]
        try:
            with self.path.open("a", newline="") as f:
                w = csv.DictWriter(f, self.columns)
                w.writerows(written)
                f.flush()
                os.fsync(f.fileno())
        except OSError as ex:
            raise (disk_error(ex, self.path) or ex) from None
        for listener in self.listeners:
            listener(written)


def _fmt(v: Any) -> Any:
    return f"{v:.8g}" if isinstance(v, float) else v


def previous_path(path: Path) -> Path:
    """checkpoints/last.pt -> checkpoints/prev.pt"""
    return path.with_name("prev" + path.suffix)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` (tensors and plain containers) as a checksummed checkpoint at `path`; the
    checkpoint it replaces becomes previous_path(path)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    wrapped = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    atomic_write(path, lambda f: torch.save(wrapped, f), keep_previous=previous_path(path))


def read_checkpoint(path: Path) -> dict:
    """One checkpoint file, checked: CheckpointError (one line) when it is torn, damaged, not a
    growrun checkpoint, or holds anything but tensors and plain containers. Every tensor is
    loaded on the CPU, whatever device it was saved from: the RNG states must stay CPU tensors
    (torch.set_rng_state takes a CPU ByteTensor), and the model, optimizer and trainer states
    are copied to the run's device by their load_state_dict."""
    try:
        try:
            wrapped = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return _read_legacy(path)
    except pickle.UnpicklingError as ex:
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain containers "
                              f"({_first_line(ex)}); loading it could run code") from None
    except (RuntimeError, EOFError, OSError, ValueError) as ex:
        raise CheckpointError(f"{path}: unreadable or torn checkpoint ({_first_line(ex)})") from None
    if not isinstance(wrapped, dict) or wrapped.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    payload = wrapped["payload"]
    if hashlib.sha256(payload).hexdigest() != wrapped["sha256"]:
        raise CheckpointError(f"{path}: damaged checkpoint (SHA-256 mismatch)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as ex:
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain containers "
                              f"({_first_line(ex)}); loading it could run code") from None


def _read_legacy(path: Path) -> dict:
    """A checkpoint of growrun before FORMAT (no checksum; the numpy RNG state as an array):
    loaded weights_only with numpy's array-rebuilding types allowed, nothing else."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(state, dict) and {"arch", "model", "trainer", "rng"} <= set(state)):
        raise CheckpointError(f"{path}: not a growrun checkpoint")
    log.warning("%s: a checkpoint of an older growrun (no checksum); resuming from it", path)
    return state


def load_checkpoint(path: Path) -> tuple[dict, Path] | None:
    """The newest usable checkpoint: `path`, or when it is missing, torn or damaged, the
    previous one (with a warning naming why). None when neither exists. A checkpoint refused as
    unsafe is an error, not a fallback."""
    problems = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            if candidate == path and previous_path(path).exists():
                problems.append(f"{path}: missing (the run stopped while replacing it)")
            continue
        try:
            state = read_checkpoint(candidate)
        except CheckpointError as ex:
            if "refused" in str(ex):
                raise
            problems.append(str(ex))
            continue
        for problem in problems:
            log.warning("%s; using the previous checkpoint %s", problem, candidate)
        return state, candidate
    if problems:
        raise CheckpointError("; ".join(problems) + "; no usable checkpoint left to resume from")
    return None


def has_checkpoint(path: Path) -> bool:
    return path.exists() or previous_path(path).exists()


def _first_line(ex: BaseException) -> str:
    text = str(ex).strip().splitlines()
    return (text[0] if text else type(ex).__name__)[:160]


def write_summary(path: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
