"""Load what a run's checkpoint holds, for the scripts that study a run (gamma_profile.py,
stats_window_check.py): `load_run(run_dir)` -> (checkpoint, config, data, model), on the CPU, the
model from checkpoints/last.pt in training mode and channels-last memory format."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from growrun.data import load_data
from growrun.models import build_model
from growrun.train.outputs import load_checkpoint


def load_run(run_dir: Path):
    """(checkpoint dict, config, data, model) of the run in run_dir."""
    ckpt, _ = load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")
    cfg = OmegaConf.create(ckpt["config"])
    data = load_data(cfg.dataset, torch.device("cpu"), cfg.seed)
    model = build_model(ckpt["arch"]).to(memory_format=torch.channels_last)
    model.load_state_dict(ckpt["model"])
    model.train()
    return ckpt, cfg, data, model
