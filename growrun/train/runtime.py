"""Device choice, seeding, threads and determinism."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from growrun import devices
from growrun.errors import GrowrunError


def resolve_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu; otherwise the named device, which must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GrowrunError(f"device={name}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GrowrunError(f"device={name}: CUDA is not available here; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GrowrunError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GrowrunError(f"device={name}: MPS is not available here; use device=auto or cpu")
    return device


def memory_format(channels_last, device: torch.device) -> torch.memory_format:
    """trainer.channels_last: true / false, or auto: channels_last on CPU and CUDA, where it
    trained faster (bench/memory_format.json; the CPU's known oneDNN crash in this format is
    avoided by growrun.models.layers.conv2d), contiguous elsewhere (MPS)."""
    if channels_last == "auto":
        channels_last = device.type in ("cpu", "cuda")
    return torch.channels_last if channels_last else torch.contiguous_format


def deterministic_mode(setting, device: torch.device) -> bool:
    """trainer.deterministic: true / false, or auto: true on the CPU (where it costs little and
    a resumed run is the uninterrupted one bit for bit), false on CUDA (cuDNN's autotuner picks
    the fastest kernels, which may differ from run to run; see docs/options.md, Numerics)."""
    if setting == "auto":
        return device.type != "cuda"
    return bool(setting)


def configure(threads: int, deterministic: bool, tf32: bool = False) -> None:
    """Threads, denormals, determinism, and TF32 for training steps and evaluation
    (growrun.devices: growth events never use TF32)."""
    if threads:
        torch.set_num_threads(threads)
    # Subnormal floats (tiny weights and gradients late in training, zero-variance channels
    # after function-preserving growth) are many times slower on x86 CPUs; flush them to zero.
    torch.set_flush_denormal(True)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Deterministic mode also fills every new tensor with NaN by default (~10% slower on
        # CPU here); results do not depend on uninitialised memory, so skip that.
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    devices.set_tf32(tf32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """The global RNG states as CPU tensors and plain containers (checkpoints load weights_only);
    on CUDA, the generator of the run's own device only (a job resumed with fewer or other visible
    GPUs restores it onto its device)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(_cuda_index(device)).cpu()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore rng_state(); its tensors may come from any device (they are moved to the CPU).
    A CUDA state goes to `device` (a checkpoint of an older growrun holds a list, one per GPU
    then visible: the entry of this device's index, when there is one)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else keys  # an array in older checkpoints
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    index = _cuda_index(device)
    if isinstance(cuda, (list, tuple)):
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), index)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
