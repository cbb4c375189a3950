"""Peak memory of a piece of work, on CPU (resident set) or CUDA (allocator)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak resident set on Linux
    (VmHWM, reset through /proc/self/clear_refs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def read_peak_memory(device: torch.device | str = "cpu") -> int:
    """Peak bytes since the last reset: CUDA max allocated, or the peak resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _read_status_kib("VmHWM") * 1024


def peak_memory_bytes(work: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak memory while ``work()`` runs."""
    reset_peak_memory(device)
    work()
    return read_peak_memory(device)
