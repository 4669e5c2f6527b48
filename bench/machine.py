"""The machine a benchmark ran on, in words: time ratios depend on it (1.01x and 1.08x for the
same L0 step on two machines, bench/README.md), so every timing benchmark records it."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(threads: int | None = None, device: str = "cpu") -> str:
    """The CPU model, its core count, the threads torch was given (when ``threads`` is set)
    and torch's version; first the GPU's name where ``device`` is one."""
    try:
        model = next(line.split(":", 1)[1].strip()
                     for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    import torch  # imported here: train_cost's parent process loads torch only for this
    used = "" if threads is None else f", {threads} threads"
    gpu = f"{torch.cuda.get_device_name(device)} GPU, " if device.startswith("cuda") else ""
    return f"{gpu}{model}, {os.cpu_count()} cores{used}, torch {torch.__version__}"
