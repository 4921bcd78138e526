"""The machine a benchmark ran on, named the same way in every report."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device, threads: bool = False) -> str:
    """A torch device by name: the GPU's (torch.cuda.get_device_name), or "CPU <model>" (with torch's thread
    count when `threads`)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()}" + (f", {torch.get_num_threads()} threads" if threads else "")


def synchronize(device) -> None:
    """Wait for a GPU's queued work (nothing to wait for on a CPU): before and after a timed region."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
