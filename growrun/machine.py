"""What machine this is, for CI logs and benchmark records: the CPU model and its vector
extensions, the torch build (version, oneDNN / MKL), and the ISA settings that change which
oneDNN kernels run (ONEDNN_MAX_CPU_ISA). `python -m growrun.machine` prints it.
"""
from __future__ import annotations

import os
import platform
import re

import torch

# /proc/cpuinfo flags worth knowing for torch's CPU kernels, in the order printed.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                "amx_int8", "asimd", "sve")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return model, flags
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flag_line = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    family, number = (re.search(rf"^{k}\s*:\s*(\S+)$", text, re.M) for k in ("cpu family", "model"))
    if found:
        model = found.group(1).strip()
        if family and number:
            model += f" (family {family.group(1)}, model {number.group(1)})"
    if flag_line:
        flags = set(flag_line.group(1).split())
    return model, flags


def _build_line(pattern: str) -> str:
    found = re.search(pattern, torch.__config__.show())
    return found.group(1).strip() if found else "not found"


def describe() -> dict:
    """A JSON-able description of this machine and torch build."""
    model, flags = _cpuinfo()
    cuda = torch.cuda.is_available()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "torch": torch.__version__,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": _build_line(r"Intel\(R\) MKL-DNN (v[\d.]+[^\n]*)") if torch.backends.mkldnn.is_available()
        else "not built",
        "mkl": _build_line(r"Intel\(R\) oneAPI Math Kernel Library (Version [^\n]+)"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
    }


def main() -> None:
    for key, value in describe().items():
        if isinstance(value, list):
            value = " ".join(value) or "(none)"
        print(f"{key:20s} {value}")


if __name__ == "__main__":
    main()
