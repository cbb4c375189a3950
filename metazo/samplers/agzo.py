"""AGZO: activation-guided perturbations for linear layers (arXiv 2601.17261).

The gradient of a linear layer y = x W^T is G = sum_t delta_t h_t^T, so its rows lie in the span of
the layer's input activations h_t. AGZO perturbs W only inside (the top of) that span: in the
unperturbed forward of a one-sided estimate it captures each linear layer's inputs H (tokens x d_in),
reduces them to an orthonormal basis A (d_in x r) by randomised power iteration on H^T H, and
perturbs W by Delta = R A^T with R ~ N(0, I) (d_out x r). Other tensors get plain Gaussian noise.

How it fits the engine: the sampler is one-sided, so the engine runs the unperturbed forward inside
``base_pass()``. There a forward pre-hook on every hooked ``nn.Linear`` sees H and, at once, under no
grad, turns it into A; H is never kept, so peak memory stays that of inference (per layer only
A, d_in x r, and r singular values survive the pass). The hooks are removed when the pass ends.
The rows of R are the rows of W, so ``noise(block, rows, gen)`` draws R[rows] from the chunk's
generator and returns R[rows] A^T.

Choices the paper leaves open, all constructor parameters or stated here:

- ``match_mezo_norm`` (default True): Delta is multiplied by sqrt(d_in / r). With A orthonormal,
  ||R A^T||_F^2 = ||R||_F^2, whose mean is d_out * r, while MeZO's z has d_out * d_in; the factor
  makes the mean per-entry second moment 1, as for MeZO, so eps and lr mean the same as for the
  Gaussian sampler. False gives the paper's literal Delta = R A^T.
  The step's expectation is then E[(g.Delta) Delta] = s^2 G A A^T with s the factor.
- ``rank`` r = 1 and ``power_iterations`` K = 3, as in the paper's main runs. The start matrix of
  the power iteration is Gaussian from ``mix_seed(seed, step, block index)``, so a step's bases are
  reproducible from the batch, the weights and integers.
- After the K rounds the basis is rotated within its span to the Ritz vectors of H (columns in
  order of singular value). The span, and so the distribution of Delta, is the paper's; the
  ordering and the singular values are what a streamed forward needs (next item).
- A layer called several times in one base pass (a scorer that splits the batch into micro-batches)
  sees its inputs in parts. Each call replaces the layer's running summary by the top-r part of
  [summary; H_call]: the summary is diag(singular values) A^T, r rows, so memory stays d_in x r.
  With one call this is exactly the paper's algorithm; with several it is a streaming sketch of the
  whole batch's top-r subspace (exact when the earlier parts have rank <= r). The power iteration
  of a later call starts from the current basis.
- Padding tokens are part of H: the hook sees the padded batch and a Linear hook has no attention
  mask (the engine's base pass does not pass the batch to the sampler). Padded positions still flow
  through every layer, so their rows add directions the loss does not depend on; with heavy padding
  a larger rank helps.
- Memory: inside a hook, one layer's input in float32 (a copy when the model runs in bf16/fp16) and
  a few (tokens x r) products exist at a time; they are freed when the hook returns.
- Hooked layers: ``nn.Linear`` modules found in the bound model whose ``weight`` is a trained block
  (by identity), except the LM head and weights tied to the embedding. The scorer applies the head
  through ``F.embedding`` on the label rows, never through the module, so the head never has
  activations; and a tied table's gradient also comes from its use as an embedding, which is not in
  any activation span. Those, norms, biases and embeddings get N(0, 1) noise, as in the paper.
  GPT-2's ``Conv1D`` (weight stored d_in x d_out) is not hooked: its rows are input features, so
  Delta = A R^T would need the whole R in every chunk, which a per-chunk generator cannot give.
- A hooked layer that did not run in this step's base pass (its output unused) has no basis; it gets
  Gaussian noise for the step. Noise for a hooked layer before any base pass of the step is a
  RuntimeError: a stale basis from another step must never be used.
- AGZO needs full fine-tuning (``requires_mode = "full"``): LoRA's adapter matrices are not
  ``nn.Linear`` modules, so every block would be Gaussian and the sampler only a one-sided MeZO.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from metazo.blocks import Block
from metazo.errors import MetazoError
from metazo.samplers.base import Sampler, as_bool, mix_seed


def _gaussian(block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
    shape = () if len(block.shape) == 0 else (rows.stop - rows.start, *block.shape[1:])
    return torch.randn(shape, generator=generator, device=block.param.device)


def top_right_singular_basis(h: torch.Tensor, start: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (d_in x r) basis of the top-r right singular subspace of ``h`` (n x d_in), and the
    r singular values along it, by ``rounds`` rounds of power iteration Q <- qr(h^T (h Q)) from
    ``start``, then Ritz vectors (the exact SVD of h restricted to the span)."""
    q = torch.linalg.qr(start).Q
    for _ in range(rounds):
        q = torch.linalg.qr(h.T @ (h @ q)).Q
    _, singular_values, right = torch.linalg.svd(h @ q, full_matrices=False)
    return q @ right.T, singular_values


class AGZOSampler(Sampler):
    """Delta = R A^T for hooked linear layers, A from this step's input activations; one-sided."""

    name = "agzo"
    one_sided = True
    requires_mode = "full"

    def __init__(self, rank: int = 1, power_iterations: int = 3, match_mezo_norm: bool = True, seed: int = 0):
        if int(rank) < 1:
            raise MetazoError(f"agzo sampler: rank must be >= 1, got {rank}")
        if int(power_iterations) < 0:
            raise MetazoError(f"agzo sampler: power_iterations must be >= 0, got {power_iterations}")
        self.rank = int(rank)
        self.power_iterations = int(power_iterations)
        self.match_mezo_norm = as_bool(match_mezo_norm, "match_mezo_norm")
        self.seed = int(seed)
        self.blocks: list[Block] = []
        self.model = None
        self.hooked: list[tuple[nn.Linear, Block]] = []
        self._hooked_indices: set[int] = set()
        self.step = 0
        self.base_pass_done = False
        # block index -> (A: d_in x r, singular values: r), this step's only: reset by begin_step
        self.bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bind(self, blocks: list[Block], model: nn.Module | None = None) -> None:
        super().bind(blocks, model)
        if model is None:
            raise MetazoError(
                "agzo sampler hooks the model's linear layers: pass model= to ZeroOrderOptimizer along with the blocks"
            )
        by_param = {id(block.param): block for block in blocks if block.role not in ("embed", "head")}
        self.hooked = [
            (module, by_param[id(module.weight)])
            for module in model.modules()
            if isinstance(module, nn.Linear) and id(module.weight) in by_param
        ]
        if not self.hooked:
            raise MetazoError(
                "agzo sampler found no nn.Linear layer among the trained tensors (GPT-2's Conv1D and LoRA "
                "adapters are not hooked); use another sampler, e.g. gaussian"
            )
        for _, block in self.hooked:
            if self.rank > block.shape[1]:
                raise MetazoError(
                    f"agzo sampler: rank {self.rank} is larger than the input size {block.shape[1]} of block "
                    f"{block.name}; choose rank <= {block.shape[1]}"
                )
        self._hooked_indices = {block.index for _, block in self.hooked}

    def begin_step(self, step: int) -> None:
        self.step = step
        self.bases = {}
        self.base_pass_done = False

    @contextmanager
    def base_pass(self) -> Iterator[None]:
        self.bases = {}  # a second base pass in one step starts afresh instead of merging
        handles = [
            module.register_forward_pre_hook(self._capture_hook(block), with_kwargs=True) for module, block in self.hooked
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.base_pass_done = True

    def _capture_hook(self, block: Block):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                self._absorb(block, args[0] if args else kwargs["input"])
        return hook

    def _absorb(self, block: Block, inputs: torch.Tensor) -> None:
        """Fold one call's inputs into the block's basis; ``inputs`` is not kept."""
        h = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        previous = self.bases.get(block.index)
        if previous is None:
            generator = torch.Generator(device=h.device)
            generator.manual_seed(mix_seed(self.seed, self.step, block.index))
            start = torch.randn((h.shape[1], self.rank), generator=generator, device=h.device)
        else:
            basis, singular_values = previous
            h = torch.cat([singular_values[:, None] * basis.T, h])
            start = basis
        self.bases[block.index] = top_right_singular_basis(h, start, self.power_iterations)

    def basis(self, block: Block) -> torch.Tensor | None:
        """This step's A (d_in x r) of a hooked block, or None when it gets Gaussian noise."""
        if block.index not in self._hooked_indices:
            return None
        if not self.base_pass_done:
            raise RuntimeError(
                f"agzo: noise for {block.name} was asked before this step's base pass; the engine runs the "
                "unperturbed forward inside sampler.base_pass() first (one-sided estimate)"
            )
        found = self.bases.get(block.index)
        return None if found is None else found[0]

    def noise(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        basis = self.basis(block)
        if basis is None:
            return _gaussian(block, rows, generator)
        r = basis.shape[1]
        coefficients = torch.randn((rows.stop - rows.start, r), generator=generator, device=block.param.device)
        delta = coefficients @ basis.T
        return delta.mul_(math.sqrt(basis.shape[0] / r)) if self.match_mezo_norm else delta

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "power_iterations": self.power_iterations,
                "match_mezo_norm": self.match_mezo_norm, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank = int(state["rank"])
        self.power_iterations = int(state["power_iterations"])
        self.match_mezo_norm = as_bool(state["match_mezo_norm"], "match_mezo_norm")
        self.seed = int(state["seed"])

    def __repr__(self) -> str:
        return (f"AGZOSampler(rank={self.rank}, power_iterations={self.power_iterations}, "
                f"match_mezo_norm={self.match_mezo_norm}, seed={self.seed})")
