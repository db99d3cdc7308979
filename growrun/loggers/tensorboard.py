"""logger=tensorboard: TensorBoard event files (torch.utils.tensorboard's SummaryWriter).

Where: <run dir>/tensorboard, or <logger.tensorboard_dir>/<run name> (logger.name, else the run
directory's name) so that one `tensorboard --logdir DIR` shows several runs side by side.
Scalars are float32, TensorBoard's own precision (the CSV's value rounded to float32; FLOP counts
keep about 7 digits); the x axis of every scalar is the training step (metrics.csv's and growth.csv's `step`):
    metrics/<column>           each numeric metrics.csv column, once per epoch
    growth/<site>/<column>     each numeric growth.csv column, once per growth event and site
    growth/<site>/event        text: the row's method, added / requested, reason, trigger
    config                     text: the resolved config (YAML), and the config as hparams
    summary/<key>              the summary's final numbers, at the last step; text: summary
    plots/<figure>             the report's figures (acc_vs_compute, widths, psi, ...), at the last
                               step, as the PNG files `growrun report` writes (Images tab)
Resume: before it writes, the run keeps of the directory's event files only the events up to the
checkpoint's step (none for a new run in a directory that held a crashed attempt), rewritten into
one file and swapped in whole (keep_until), so that no reader, whichever way it treats restarts,
sees a step the resumed run logs again. Each call flushes.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import yaml

from growrun.loggers import flat_config, numbers, summary_numbers

# the headline numbers declared to TensorBoard's HParams dashboard (its metric columns)
HPARAM_METRICS = ("metrics/test_acc", "metrics/test_loss", "metrics/val_acc", "metrics/train_loss")


def event_dir(opts, run_dir: Path) -> Path:
    if opts.tensorboard_dir is None:
        return run_dir / "tensorboard"
    return Path(opts.tensorboard_dir) / (opts.name or run_dir.name)


class TensorBoard:
    name = "tensorboard"

    def __init__(self, opts, run_dir: Path, resumed_step: int | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = event_dir(opts, run_dir)
        keep_until(self.dir, -1 if resumed_step is None else resumed_step)
        self.writer = SummaryWriter(str(self.dir))
        self.last_step = resumed_step or 0
        if resumed_step is None:  # a resumed run's config is already there (step 0, kept)
            self.writer.add_text("config", _code(yaml.safe_dump(config, sort_keys=False)), 0)
            self._hparams(config)
            self.writer.flush()

    def _hparams(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        exp, ssi, sei = hparams(flat_config(config), dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """A float32 scalar (TensorBoard's simple value): what TensorBoard's default data server
        plots (float64 tensor scalars it silently leaves out: checked with tensorboard 2.21)."""
        self.writer.add_scalar(tag, value, step)

    def epoch(self, rows: list[dict]) -> None:
        for row in rows:
            step = int(row["step"])
            for key, value in numbers(row).items():
                if key != "step":
                    self._scalar(f"metrics/{key}", value, step)
            self.last_step = step
        self.writer.flush()

    def growth(self, rows: list[dict]) -> None:
        for row in rows:
            step, site = int(row["step"]), row["site"]
            for key, value in numbers(row).items():
                if key != "step":
                    self._scalar(f"growth/{site}/{key}", value, step)
            said = ", ".join(f"{k} {row.get(k, '')}" for k in ("method", "requested", "added", "reason", "trigger"))
            self.writer.add_text(f"growth/{site}/event", f"event {row['event']} at step {step}: {said}", step)
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        step = max(self.last_step, int(summary.get("step", 0)))
        final = summary_numbers(summary)
        for key, value in final.items():
            self._scalar(f"summary/{key}", value, step)
        self.writer.add_text("summary", _code(json.dumps(summary, indent=1, default=str)), step)
        self.writer.flush()

    def plots(self, images: dict[str, bytes]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        for name, png in images.items():
            width, height, colour = png_size(png)
            image = Summary.Image(width=width, height=height, colorspace=colour, encoded_image_string=png)
            tag = f"plots/{name.removesuffix('.png')}"
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), self.last_step)
        self.writer.flush()

    def checkpointed(self, step: int) -> None:
        pass  # every call is written at once (a resume drops what comes after its checkpoint)

    def close(self) -> None:
        self.writer.close()


def keep_until(event_dir: Path, step: int) -> None:
    """Leave in event_dir only the summaries of its event files with a step <= `step`, in one
    file. Crash-safe: the kept events are written to <dir>.tmp, then <dir> becomes <dir>.old and
    <dir>.tmp becomes <dir>; a later call first finishes (or drops) an interrupted swap."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from torch.utils.tensorboard.writer import FileWriter

    tmp, old = event_dir.with_name(event_dir.name + ".tmp"), event_dir.with_name(event_dir.name + ".old")
    if old.exists() and not event_dir.exists():  # killed between the two renames: tmp is complete
        os.replace(tmp, event_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p for p in event_dir.glob("*tfevents*") if p.is_file()) if event_dir.is_dir() else []
    if not files:
        return
    writer = FileWriter(str(tmp), filename_suffix=".kept")
    for path in files:
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)  # as written (the non-raw loader converts old summaries)
            if event.HasField("summary") and event.step <= step:
                writer.add_event(event)
    writer.close()  # flushed and closed: the file is complete
    os.replace(event_dir, old)
    os.replace(tmp, event_dir)
    shutil.rmtree(old, ignore_errors=True)


def png_size(png: bytes) -> tuple[int, int, int]:
    """(width, height, channels) of a PNG, read from its IHDR chunk (bytes 16-25)."""
    width, height, _, colour_type = struct.unpack(">IIBB", png[16:26])
    return width, height, {0: 1, 2: 3, 4: 2, 6: 4}.get(colour_type, 4)


def _code(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown (an indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())
