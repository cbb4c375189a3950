"""The sampler protocol: what direction each block moves in, regenerated from a seed.

A direction is never stored. Each block's noise is defined chunk by chunk (a chunk = a run of
whole rows of at most ``CHUNK_ELEMENTS`` entries) and each chunk has its own generator seed,
derived from (step seed, block index, chunk index). So any chunk, or any set of rows, can be
regenerated on its own with bounded memory -- the perturbed forward of an embedding needs only
the rows a batch touches, and the update walks a 100M-entry table a chunk at a time -- and every
process that knows the step seed regenerates the same direction (seed replay).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from metazo.blocks import Block
from metazo.errors import MetazoError

CHUNK_ELEMENTS = 1 << 22  # 4M entries: 16 MB of fp32 noise at most in flight per block

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (splitmix64), identical on every machine."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def rows_per_chunk(block: Block) -> int:
    shape = block.shape
    row_numel = 1 if len(shape) <= 1 else block.numel // shape[0]
    return max(1, CHUNK_ELEMENTS // max(row_numel, 1))


def chunk_rows(block: Block) -> Iterator[tuple[int, slice]]:
    """(chunk index, row slice) covering the block's first dimension."""
    n_rows = block.shape[0] if len(block.shape) else 1
    step = rows_per_chunk(block)
    for index, start in enumerate(range(0, n_rows, step)):
        yield index, slice(start, min(start + step, n_rows))


class Sampler:
    """Base class of every perturbation sampler.

    Subclasses implement :meth:`noise`; the engine calls the hooks around each step. A sampler
    may scale blocks differently (``block_scale``), leave blocks out of a step (``active``), keep
    state across steps (``begin_step``, ``observe``, ``state_dict``), ask for a one-sided estimate
    whose unperturbed pass it watches (``one_sided``, ``base_pass``), need a training mode
    (``requires_mode``), or reparametrise the model before training (``prepare_model``, with
    ``checkpoint_tensors`` / ``restore_model`` so a saved run can be rebuilt).
    """

    name: ClassVar[str] = "base"
    one_sided: ClassVar[bool] = False
    requires_mode: ClassVar[str | None] = None  # "full" or "lora" where the sampler only makes sense there

    def prepare_model(self, model: nn.Module, calibrate: Callable[[int], object]) -> None:
        """Change the model before its blocks are taken; ``calibrate(n)`` runs forwards over the
        first n training examples. Called by the trainer; the default changes nothing."""

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors besides the trained blocks that a checkpoint needs to rebuild the model."""
        return {}

    @classmethod
    def restore_model(cls, model: nn.Module, tensors: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
        """Redo ``prepare_model`` from a checkpoint's tensors (before its weights are loaded)."""

    def bind(self, blocks: list[Block], model: nn.Module | None = None) -> None:
        """Called once by the engine with the blocks it trains (and the model, when it has it)."""
        self.blocks = blocks
        self.model = model

    def begin_step(self, step: int) -> None:
        """Called before the first perturbation of each step."""

    def active(self, block: Block) -> bool:
        """Whether the block moves in this step; an inactive block is neither perturbed nor updated."""
        return True

    def base_pass(self) -> AbstractContextManager:
        """Context around a one-sided estimate's unperturbed forward (AGZO captures activations)."""
        return nullcontext()

    def block_scale(self, block: Block) -> float:
        """Multiplier of the block's noise for this step (a learned policy's sigma_i * nf)."""
        return 1.0

    def noise(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        """Unscaled float32 noise for ``block.param[rows]``, drawn only from ``generator``."""
        raise NotImplementedError

    def observe(self, loss_plus: float, loss_minus: float, projected_grad: float) -> None:
        """Called after each direction's estimate (policies use the losses as features)."""

    def diagnostics(self) -> dict[str, float]:
        """Scalars worth watching after a step, logged to TensorBoard under these names."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def as_bool(value: Any, option: str) -> bool:
    """A boolean sampler option, also from the CLI's strings ("true", "no", "0") and 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise MetazoError(f"option {option} must be true or false, got {value!r}")


def chunk_generator(block: Block, seed: int, chunk: int) -> torch.Generator:
    """The generator a chunk of a block draws its noise from for direction ``seed``."""
    generator = torch.Generator(device=block.param.device)
    generator.manual_seed(mix_seed(seed, block.index, chunk))
    return generator


def chunk_noise(sampler: Sampler, block: Block, seed: int, chunk: int, rows: slice) -> torch.Tensor:
    """The scaled float32 noise of one chunk of one block for direction ``seed``."""
    z = sampler.noise(block, rows, chunk_generator(block, seed, chunk))
    scale = sampler.block_scale(block)
    return z if scale == 1.0 else z.mul_(scale)


def block_noise(sampler: Sampler, block: Block, seed: int) -> torch.Tensor:
    """The whole scaled float32 direction of a block (for tests and small blocks)."""
    parts = [chunk_noise(sampler, block, seed, index, rows) for index, rows in chunk_rows(block)]
    z = torch.cat(parts) if len(parts) > 1 else parts[0]
    return z.reshape(block.shape)


def row_noise(sampler: Sampler, block: Block, seed: int, row_ids: torch.Tensor) -> torch.Tensor:
    """Scaled noise of selected rows of a 2-D block, generating only the chunks that hold them."""
    per_chunk = rows_per_chunk(block)
    out = torch.empty((row_ids.numel(), *block.shape[1:]), dtype=torch.float32, device=block.param.device)
    chunk_of_row = torch.div(row_ids, per_chunk, rounding_mode="floor")
    n_rows = block.shape[0]
    for chunk in torch.unique(chunk_of_row).tolist():
        start = chunk * per_chunk
        rows = slice(start, min(start + per_chunk, n_rows))
        where = (chunk_of_row == chunk).nonzero().squeeze(1)
        z = chunk_noise(sampler, block, seed, chunk, rows)
        out[where] = z[row_ids[where] - start]
    return out
