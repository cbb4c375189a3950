"""LoZO's low-rank sampler: u = U V^T / sqrt(r) per matrix, V kept for ``resample_every`` steps.

LoZO (Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", arXiv 2410.07698) perturbs each weight matrix W (m x n) along U V^T with U (m x r)
and V (n x r) Gaussian; U is new every step, V only every nu steps ("lazy sampling"), so the
iterates of nu consecutive steps move within one subspace, the column space of V.

How it fits the chunked protocol: the rows of U are the rows of W, so ``noise(block, rows, gen)``
draws U[rows] from the chunk's generator and returns U[rows] V^T / sqrt(r). V is not per-step
randomness; it is regenerated from ``mix_seed(seed, step // resample_every, block.index)``, so it
needs no storage in a checkpoint (only the integers in ``state_dict``) and every process that knows
the sampler's seed builds the same V.

Choices the paper leaves open, all constructor parameters:

- Scale 1/sqrt(r). LoZO perturbs by eps U V^T and steps by c U V^T / r. With u = U V^T / sqrt(r),
  both the perturbation and the step use the same u, the step c u equals LoZO's step in the
  eps -> 0 limit (c u = <g, U V^T> U V^T / r), and each entry has the second moment of MeZO's noise:
  E[u_ij^2] = (1/r) sum_k E[U_ik^2] E[V_jk^2] = 1. So eps and lr mean the same as for MeZO. (With V
  held fixed, E_U[u_ij^2] = ||V_j||^2 / r, which averages 1 over V; and E_U[(g.u) u] = G V V^T / r,
  which averages G over V: unbiased over a run, biased towards span(V) within one period.)
- Defaults rank 2 and resample_every 50: LoZO tunes r and nu per task (small ranks and an
  interval of tens of steps); these are starting values, not published optima.
- Blocks that are not matrices (norms, biases, 0-d scalars) get plain N(0, 1) noise, as in LoZO.
  Embedding tables and the LM head are matrices and get low-rank noise too (rows = vocabulary),
  so the rows a batch reads are U[those rows] V^T / sqrt(r).
- A rank above min(m, n) of any trained matrix is an error at bind time, not a silent clamp:
  the caller asked for a rank that matrix cannot have.
- ``seed`` drives the V sequence only; the U's follow the optimizer's per-step seeds.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from metazo.blocks import Block
from metazo.errors import MetazoError
from metazo.samplers.base import Sampler, chunk_generator, chunk_rows, mix_seed


def _gaussian(block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
    shape = () if len(block.shape) == 0 else (rows.stop - rows.start, *block.shape[1:])
    return torch.randn(shape, generator=generator, device=block.param.device)


class LowRankSampler(Sampler):
    """u = U V^T / sqrt(rank) for every 2-D block; V resampled every ``resample_every`` steps."""

    name = "lowrank"

    def __init__(self, rank: int = 2, resample_every: int = 50, seed: int = 0):
        if int(rank) < 1:
            raise MetazoError(f"lowrank sampler: rank must be >= 1, got {rank}")
        if int(resample_every) < 1:
            raise MetazoError(f"lowrank sampler: resample_every must be >= 1, got {resample_every}")
        self.rank = int(rank)
        self.resample_every = int(resample_every)
        self.seed = int(seed)
        self.blocks: list[Block] = []
        self.period = 0
        self._v_cache: dict[int, torch.Tensor] = {}  # block index -> V of the current period

    def bind(self, blocks: list[Block], model: nn.Module | None = None) -> None:
        super().bind(blocks, model)
        self._check_rank()

    def _check_rank(self) -> None:
        for block in self.blocks:
            if len(block.shape) == 2 and self.rank > min(block.shape):
                raise MetazoError(
                    f"lowrank sampler: rank {self.rank} is larger than min(rows, columns) = {min(block.shape)} "
                    f"of block {block.name}; choose rank <= {min(block.shape)} or leave that block out"
                )

    def begin_step(self, step: int) -> None:
        period = step // self.resample_every
        if period != self.period:
            self.period = period
            self._v_cache.clear()

    def column_factor(self, block: Block) -> torch.Tensor:
        """V (columns x rank, float32) of ``block`` for the current period."""
        v = self._v_cache.get(block.index)
        if v is None:
            generator = torch.Generator(device=block.param.device)
            generator.manual_seed(mix_seed(self.seed, self.period, block.index))
            v = torch.randn((block.shape[1], self.rank), generator=generator, device=block.param.device)
            self._v_cache[block.index] = v
        return v

    def row_factor(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        """U[rows] (rows x rank, float32): a direction's per-step factor, drawn chunk by chunk."""
        return torch.randn((rows.stop - rows.start, self.rank), generator=generator, device=block.param.device)

    def noise(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        if len(block.shape) != 2:
            return _gaussian(block, rows, generator)
        return (self.row_factor(block, rows, generator) @ self.column_factor(block).T).div_(math.sqrt(self.rank))

    def factors(self, block: Block, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U / sqrt(rank), V), float32, with U the rows ``noise`` draws for direction ``seed`` chunk by
        chunk: U V^T / sqrt(rank) is the block's direction (``block_noise``) up to rounding. The engine's
        paired view applies it as a rank-r correction instead of building the perturbed matrix."""
        parts = [self.row_factor(block, rows, chunk_generator(block, seed, chunk)) for chunk, rows in chunk_rows(block)]
        u = torch.cat(parts) if len(parts) > 1 else parts[0]
        return u.mul_(self.block_scale(block) / math.sqrt(self.rank)), self.column_factor(block)

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "resample_every": self.resample_every, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank = int(state["rank"])
        self.resample_every = int(state["resample_every"])
        self.seed = int(state["seed"])
        self._v_cache.clear()
        self._check_rank()

    def __repr__(self) -> str:
        return f"LowRankSampler(rank={self.rank}, resample_every={self.resample_every}, seed={self.seed})"
