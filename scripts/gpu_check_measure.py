"""Measurements of scripts/gpu_check.py: comparing two runs (weights and growth.csv), the GPU vs
CPU solve of TINY proposals, and the machine record. They return what differed (in words, or as
numbers); gpu_check.py decides what passes.
"""
from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

from gpu_check_lib import CheckFailed, csv_rows, final_state


# ------------------------------------------------------------------------------------ comparisons
def compare_states(a: dict, b: dict) -> dict:
    """Two state dicts (name -> tensor): {"equal": bit for bit, "max_abs": the largest absolute
    difference over the tensors of equal shapes, "problems": what differs, in words}."""
    import torch

    problems, max_abs, differing = [], 0.0, []
    if a.keys() != b.keys():
        problems.append(f"keys differ: only in the first {sorted(a.keys() - b.keys())[:3]}, "
                        f"only in the second {sorted(b.keys() - a.keys())[:3]}")
    for key in [k for k in a if k in b]:
        x, y = a[key], b[key]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x != y:
                problems.append(f"{key}: {x!r} != {y!r}")
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            continue
        if torch.equal(x, y):
            continue
        if x.is_floating_point():
            diff = (x.double() - y.double()).abs()
            nan_mismatch = int((x.isnan() != y.isnan()).sum())
            diff = torch.nan_to_num(diff, nan=float("inf")) if nan_mismatch else diff.nan_to_num(nan=0.0)
        else:
            diff = (x.long() - y.long()).abs().double()
        n = int((diff != 0).sum())
        if n == 0:  # NaNs in the same places (torch.equal calls them unequal)
            continue
        where = tuple(int(i) for i in torch.nonzero(diff)[0])
        differing.append(key)
        max_abs = max(max_abs, float(diff.max()))
        problems.append(f"{key}: {n} of {x.numel()} elements differ (first at {where}: "
                        f"{x[where].item()!r} vs {y[where].item()!r}), max abs {float(diff.max()):.3g}")
    return {"equal": not problems, "max_abs": max_abs, "differing": differing, "problems": problems}


def compare_rows(a: list[dict], b: list[dict], what: str) -> list[str]:
    """What differs between two CSV logs (timing columns already dropped), in words."""
    if len(a) != len(b):
        return [f"{what}: {len(a)} rows vs {len(b)}"]
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if not bad:
        return []
    x, y = a[bad[0]], b[bad[0]]
    cols = [k for k in x if x.get(k) != y.get(k)]
    return [f"{what}: {len(bad)} of {len(a)} rows differ (first row {bad[0] + 1}, columns "
            f"{', '.join(f'{c} {x.get(c)} vs {y.get(c)}' for c in cols[:3])})"]


def compare_runs(a: Path, b: Path) -> dict:
    """Run a (e.g. killed and resumed) against run b (uninterrupted): architecture, final step,
    model weights (checkpoints/last.pt) and growth.csv rows (timing columns aside)."""
    sa, sb = final_state(a), final_state(b)
    problems = []
    if sa["arch"] != sb["arch"]:
        problems.append(f"architectures differ (widths {sa['arch'].get('hidden')} vs {sb['arch'].get('hidden')})")
    step_a, step_b = sa["trainer"].get("step"), sb["trainer"].get("step")
    if step_a != step_b:
        problems.append(f"final step {step_a} vs {step_b}")
    weights = compare_states(sa["model"], sb["model"])
    problems += weights["problems"]
    problems += compare_rows(csv_rows(Path(a) / "growth.csv"), csv_rows(Path(b) / "growth.csv"), "growth.csv")
    return {"equal": not problems, "max_abs": weights["max_abs"], "problems": problems,
            "tensors": len(sb["model"]), "elements": sum(int(t.numel()) for t in sb["model"].values()),
            "growth_rows": len(csv_rows(Path(b) / "growth.csv"))}


def tiny_proposer():
    """propose(site, stats, count, solve_device) -> TINY's Proposal (growrun.growth.methods)."""
    from omegaconf import OmegaConf

    from growrun.config.schema import GrowthConfig
    from growrun.growth import methods

    tiny = methods.create(OmegaConf.structured(GrowthConfig(method="tiny")))
    return lambda site, stats, count, where: tiny.propose(site, stats, count, methods.EventContext(solve_device=where))


def proposal_difference(device, dtype) -> dict:
    """Largest relative differences between TINY proposals solved on `device` and on the CPU
    (float64) from the same statistics of every site of a small ResNet18 (train mode)."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from growrun.config.schema import ModelConfig
    from growrun.growth.stats import collect_statistics
    from growrun.models import build_model, initial_arch

    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(name="resnet18", width=0.125, start_fraction=0.0625))
    model = build_model(initial_arch(cfg, 10, (3, 16, 16))).to(device=device, dtype=dtype).train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 3, 16, 16, generator=g, dtype=dtype).to(device),
                torch.randint(0, 10, (32,), generator=g).to(device)) for _ in range(4)]
    sites, propose = model.sites(), tiny_proposer()
    stats = collect_statistics(model, list(sites.values()), batches,
                               lambda out, y: F.cross_entropy(out, y, reduction="sum"))

    def rel(a, b) -> float:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0

    def products(prop) -> list:
        nz = prop.neurons
        fan_in = nz.w1.reshape(nz.count, -1)
        if nz.b1 is not None:
            fan_in = torch.cat([fan_in, nz.b1.unsqueeze(1)], 1)
        fan_out = nz.w2.transpose(0, 1).reshape(nz.count, -1)
        return [torch.outer(fan_out[k], fan_in[k]) for k in range(nz.count)]  # sign-free

    worst = {"lambdas": 0.0, "neurons": 0.0, "first_order": 0.0, "sites": len(sites), "compared": 0}
    for name, site in sites.items():
        gpu = propose(site, stats[name], 4, "model")
        cpu = propose(site, stats[name], 4, "cpu")
        if gpu.count != cpu.count or gpu.lambdas.shape != cpu.lambdas.shape:
            raise CheckFailed(f"site {name}: {gpu.count} neurons / {gpu.lambdas.numel()} lambdas on the GPU, "
                              f"{cpu.count} / {cpu.lambdas.numel()} on the CPU")
        worst["lambdas"] = max(worst["lambdas"], rel(gpu.lambdas, cpu.lambdas))
        for a, b in zip(products(gpu), products(cpu)):
            worst["neurons"] = max(worst["neurons"], rel(a, b))
            worst["compared"] += 1
        fo = abs(gpu.first_order - cpu.first_order) / max(abs(cpu.first_order), 1e-300)
        worst["first_order"] = max(worst["first_order"], fo)
    return worst


# ------------------------------------------------------------------------------------ the machine
def _quiet(read):
    with warnings.catch_warnings():  # torch >= 2.9 deprecates allow_tf32 in favour of fp32_precision
        warnings.simplefilter("ignore")
        try:
            return read()
        except Exception:  # an attribute this torch does not have
            return None


def machine() -> dict:
    """growrun.machine.describe() (CPU, cores, torch build, first CUDA device) plus every CUDA
    device, the CUDA / cuDNN versions and torch's TF32 settings as this fresh process has them
    (training runs set their own, trainer.tf32; growth events turn TF32 off)."""
    import datetime
    import platform

    import torch

    from growrun.machine import describe

    info = describe()
    b = torch.backends
    info.update({
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cuda_available": torch.cuda.is_available(), "cuda_runtime": torch.version.cuda,
        "cudnn": _quiet(lambda: b.cudnn.version()) if _quiet(b.cudnn.is_available) else None,
        "tf32": {"cuda.matmul.allow_tf32": _quiet(lambda: b.cuda.matmul.allow_tf32),
                 "cudnn.allow_tf32": _quiet(lambda: b.cudnn.allow_tf32),
                 "float32_matmul_precision": _quiet(torch.get_float32_matmul_precision),
                 "cuda.matmul.fp32_precision": _quiet(lambda: b.cuda.matmul.fp32_precision),
                 "cudnn.conv.fp32_precision": _quiet(lambda: b.cudnn.conv.fp32_precision)},
        "gpus": [],
    })
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                             "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count})
    try:
        from growrun.config.schema import TrainerConfig
        info["growrun_trainer_tf32_default"] = getattr(TrainerConfig(), "tf32", None)
        info["growrun_trainer_deterministic_default"] = TrainerConfig().deterministic
    except Exception:
        pass
    if info["gpus"]:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, IndexError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info
