"""MeZO's sampler: every entry N(0, 1) (arXiv 2305.17333)."""

import torch

from metazo.blocks import Block
from metazo.samplers.base import Sampler


def _rows_shape(block: Block, rows: slice) -> tuple[int, ...]:
    if len(block.shape) == 0:
        return ()
    return (rows.stop - rows.start, *block.shape[1:])


class GaussianSampler(Sampler):
    """z ~ N(0, I) per block, as MeZO."""

    name = "gaussian"

    def noise(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(_rows_shape(block, rows), generator=generator, device=block.param.device)


class RademacherSampler(Sampler):
    """z uniform on {-1, +1} per entry: same second moment as Gaussian, bounded entries."""

    name = "rademacher"

    def noise(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        bits = torch.randint(0, 2, _rows_shape(block, rows), generator=generator, device=block.param.device)
        return bits.to(torch.float32).mul_(2).sub_(1)
