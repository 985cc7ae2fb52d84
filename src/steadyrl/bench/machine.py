"""One line describing the device a benchmark ran on (results quote it next to every figure)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line(device: str) -> str:
    torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch_info}, CUDA {torch.version.cuda})"
    return f"CPU {cpu_name()} ({os.cpu_count()} cores), {torch_info}"
