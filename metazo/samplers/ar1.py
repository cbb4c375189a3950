"""AR1-ZO: one rank-1 LoRA atom per query, rescaled so its signal does not fade with the rank
(arXiv 2605.19767).

Only the paper's abstract is public. LoRA's update dW = s B A (s = alpha / r) is a sum of r rank-1
atoms s B[:, k] A[k, :]. Perturbing all atoms at once, or one atom with the usual s, drowns the
finite-difference signal as r grows. AR1-ZO perturbs one atom per step, two-point, in every adapted
layer at once, and rescales its noise so the signal does not shrink with r.

The noise of a step is zero everywhere except row k of each ``lora_A`` (r x in) and column k of
each ``lora_B`` (out x r), where it is N(0, 1). LoRA tensors are recognised by their name (ending
in ``lora_A`` / ``lora_B``, as :mod:`metazo.lora` names them) and r is read from their shape.

The rescaling (``rescale="rank"``), derived. Perturb atom k by eps (a, b): a ~ N(0, I_in) on A[k, :],
b ~ N(0, I_out) on B[:, k], and let G = dL/dW. To first order the projected gradient is

    c = s * (b^T G A[k, :]^T + B[:, k]^T G a).

At LoRA's start B = 0, only the first term is there, and A's rows have a fixed size (Kaiming
uniform: |A[k, :]|^2 ~ 1/3 whatever r), so E[c^2] = s^2 |G A[k, :]^T|^2 ~ (alpha / r)^2: the signal
of one atom falls as 1/r (and that of all r atoms at once, whose c is a sum of r such terms, as
1/sqrt(r)). Multiplying B's column noise by r makes the first term alpha * b^T G A[k, :]^T: the
atom is queried as if it were a rank-1 adapter with the same alpha, at every rank. A's row noise is
left at scale 1: multiplying it too would put a second-order term s * r^2 eps^2 b a^T into the
perturbed weights that grows with r, and it is not needed, because B's column then grows r times
faster under the update (its step is -lr * c * r * b), so B[:, k] ~ r and the second term
s * B[:, k]^T G a is r-independent as well. In function space every step is then the same at every
rank: s * dB[:, k] A[k, :] ~ lr * alpha^2. The factor is applied with ``block_scale`` and so also
scales the update (as it must for seed replay: the update is exactly the perturbation direction).
Averaged over the r steps of a cycle, the estimate's expectation (first order) is
E[c u] = (1/r) diag(scale^2) grad: r * grad_B on the B's and grad_A / r on the A's.
``rescale="none"`` keeps scale 1 (AR1 with the usual alpha/r), for comparison.
Limit of the A factor 1: it assumes B's columns are as large as AR1-ZO's own updates make them
(~r). Where B was grown otherwise, e.g. spread evenly so that (alpha/r) B A has an r-independent
size (the "warm" state of ``scripts/ar1_signal.py``), one atom's A term shrinks as 1/sqrt(r) and
the all-atom query, dominated there by the A gradient, no longer loses signal with r.

Other choices the abstract leaves open (constructor parameters):

- ``schedule="cyclic"``: atom k = step mod r, so any r consecutive steps query every atom once.
  ``"permuted"``: a fresh seeded permutation of the atoms for each cycle of r steps (same coverage,
  no fixed order for the data order to correlate with); ``seed`` seeds it.
- Every adapted layer queries the same atom index k in a step (the atoms of different layers are
  unrelated, so any shared k is as good as another, and one k keeps the schedule simple).
- Initialisation: LoRA's own (A Kaiming-uniform, B = 0, :mod:`metazo.lora`).
- Blocks that are not LoRA factors (none in LoRA mode) are left out of every step (``active``).

The all-atom baseline is the Gaussian sampler on the same LoRA blocks (``GaussianSampler``).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from metazo.blocks import Block
from metazo.errors import MetazoError
from metazo.samplers.base import Sampler, mix_seed

SCHEDULES = ("cyclic", "permuted")
RESCALES = ("rank", "none")


def lora_factor(block: Block) -> str | None:
    """"A" for a LoRA down-projection (r x in), "B" for an up-projection (out x r), else None."""
    if len(block.shape) != 2:
        return None
    if block.name.endswith("lora_A"):
        return "A"
    if block.name.endswith("lora_B"):
        return "B"
    return None


def lora_rank(block: Block) -> int:
    return block.shape[0] if lora_factor(block) == "A" else block.shape[1]


class AR1Sampler(Sampler):
    """One LoRA atom per step, Gaussian on A[k, :] and B[:, k], B's noise times r (module docstring).

    ``AR1Sampler(schedule="cyclic", rescale="rank", seed=0)``
    """

    name = "ar1-zo"
    requires_mode = "lora"

    def __init__(self, schedule: str = "cyclic", rescale: str = "rank", seed: int = 0):
        if schedule not in SCHEDULES:
            raise MetazoError(f"unknown AR1-ZO schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")
        if rescale not in RESCALES:
            raise MetazoError(f"unknown AR1-ZO rescale '{rescale}'; choose one of: {', '.join(RESCALES)}")
        if not isinstance(seed, int):
            raise MetazoError(f"AR1-ZO seed must be an integer, got {seed!r}")
        self.schedule, self.rescale, self.seed = schedule, rescale, seed
        self.step = 0

    def __repr__(self) -> str:
        return f"AR1Sampler(schedule={self.schedule!r}, rescale={self.rescale!r}, seed={self.seed})"

    def bind(self, blocks: list[Block], model: nn.Module | None = None) -> None:
        if not any(lora_factor(block) for block in blocks):
            raise MetazoError("AR1-ZO perturbs LoRA adapters, and there are none to train; pass --mode lora")
        super().bind(blocks, model)

    def begin_step(self, step: int) -> None:
        self.step = int(step)

    def atom(self, rank: int, step: int | None = None) -> int:
        """The atom index queried at ``step`` (default: the current step) in a rank-``rank`` adapter."""
        step = self.step if step is None else step
        cycle, position = divmod(step, rank)
        if self.schedule == "cyclic":
            return position
        order = list(range(rank))
        random.Random(mix_seed(self.seed, rank, cycle)).shuffle(order)
        return order[position]

    def active(self, block: Block) -> bool:
        return lora_factor(block) is not None

    def block_scale(self, block: Block) -> float:
        if self.rescale == "rank" and lora_factor(block) == "B":
            return float(lora_rank(block))
        return 1.0

    def noise(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        factor = lora_factor(block)
        if factor is None:
            raise MetazoError(f"AR1-ZO cannot perturb '{block.name}': it is not a LoRA factor")
        n_rows = rows.stop - rows.start
        out = torch.zeros((n_rows, block.shape[1]), dtype=torch.float32, device=block.param.device)
        k = self.atom(lora_rank(block))
        if factor == "B":  # column k of these rows
            out[:, k] = torch.randn(n_rows, generator=generator, device=block.param.device)
        elif rows.start <= k < rows.stop:  # row k of A, when this chunk holds it
            out[k - rows.start] = torch.randn(block.shape[1], generator=generator, device=block.param.device)
        return out
