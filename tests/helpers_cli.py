"""The CLI in tests: growrun's exit status in process (cli), a CSV it wrote (read_csv), the
one-line error of a refused command (one_line_error), a small quick run (SMALL) and the composed
`train` config of some overrides (compose_cfg). The in-process run with the CLI's output and
restored state is the fixture run_cli (tests/conftest.py)."""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

from hydra import compose, initialize_config_module

from growrun.cli import main
from growrun.config import store  # noqa: F401  (registers the schema)

SMALL = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "model=mlp", "model.hidden=[16]",
         "trainer.batch_size=64", "trainer.threads=1", "trainer.epochs=2"]


def cli(*args: str) -> int:
    """growrun's exit status for this command line (run in process)."""
    try:
        return main(list(args))
    except SystemExit as ex:  # a run's own failure exits from inside Hydra's task
        return ex.code


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (exit status 2)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("growrun: error: "), proc.stderr
    return lines[0]


def compose_cfg(*overrides: str, hydra_node: bool = False):
    with initialize_config_module("growrun.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_node)
