import torch

from metazo.runtime.memory import peak_memory_bytes


def test_cpu_peak_memory_sees_a_transient_allocation():
    idle = peak_memory_bytes(lambda: None)
    big = peak_memory_bytes(lambda: torch.ones(64 * 2**20).sum())  # 256 MiB, freed at once
    assert big - idle > 200 * 2**20
