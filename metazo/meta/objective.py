"""The lookahead objective of learning to learn a ZO optimizer, differentiable in the policy only.

One ZO step with the policy's scales s_i = nf * sigma_i gives c = (L+ - L-) / (2 eps) along
u = s z. The lookahead parameters are where a step of size ``lr_update`` along that estimate lands,

    theta'_i = theta_i - lr_update * c * s_i * z_i        (with q directions: the mean of c_j u_j),

and the meta-loss is L(theta') on the same batch. c and theta are constants; only s (through sigma,
and through nf unless it is detached as in the paper) carries gradient, back into the policy's
weights. L(theta') is computed with ``torch.func.functional_call`` on the model itself: no copy of
the model, only the tensors theta' (what any forward with grad holds as weights). The noise z is
regenerated from the seed in the backward pass instead of being saved, so the objective holds one
copy of the trained tensors more than inference does, not three.

Why it teaches something: to first order E_z[L(theta')] = L(theta) - lr_update * sum_i s_i^2 ||g_i||^2,
so the meta-gradient moves the fixed perturbation budget (sum_i d_i s_i^2 = D) towards the blocks
where the gradient is dense (large ||g_i||^2 / d_i); the second-order term, lr_update^2 c^2 u'Hu / 2,
holds it back where the loss is curved.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from metazo.blocks import Block
from metazo.samplers import GaussianSampler, block_noise
from metazo.scoring import Batch, Scorer

_NOISE = GaussianSampler()  # the learned sampler's z before its scale


class _Lookahead(torch.autograd.Function):
    """theta' = theta - s * sum_j a_j z(seed_j) for one block; backward regenerates the z's rather
    than saving them."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, theta: torch.Tensor, steps: tuple[tuple[int, float], ...], block: Block):
        ctx.steps, ctx.block, ctx.scale_dtype = steps, block, scale.dtype
        work = torch.promote_types(theta.dtype, torch.float32)  # float32, or float64 for a float64 model
        delta = torch.zeros(theta.shape, dtype=work, device=theta.device)
        for seed, coefficient in steps:
            delta.add_(block_noise(_NOISE, block, seed).to(theta.device, work), alpha=coefficient)
        return delta.mul_(-float(scale)).add_(theta.to(work)).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat = grad_out.to(torch.promote_types(grad_out.dtype, torch.float32)).reshape(-1)
        grad_scale = sum(-coefficient * torch.dot(flat, block_noise(_NOISE, ctx.block, seed).to(flat).reshape(-1))
                         for seed, coefficient in ctx.steps)
        return grad_scale.to(ctx.scale_dtype), None, None, None


def lookahead_parameters(blocks: Sequence[Block], scales: torch.Tensor,
                         steps: Sequence[tuple[int, float]]) -> dict[str, torch.Tensor]:
    """{block name: theta'_i} with theta'_i = theta_i - scales[i] * sum_j a_j z_i(seed_j), for the
    (seed_j, a_j) of ``steps`` (one per direction; a_j = lr_update * c_j / q)."""
    steps = tuple((int(seed), float(coefficient)) for seed, coefficient in steps)
    return {block.name: _Lookahead.apply(scales[i], block.param.detach(), steps, block) for i, block in enumerate(blocks)}


class _ScorerLoss(nn.Module):
    """The scorer's loss as a module around the model, so functional_call can swap its tensors."""

    def __init__(self, scorer: Scorer):
        super().__init__()
        self.model = scorer.model
        self._scorer = (scorer,)  # not a submodule

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._scorer[0].loss(batch)


def loss_at(scorer: Scorer, parameters: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """The scorer's loss on ``batch`` with the model's tensors replaced by ``parameters`` (by name;
    tied tensors follow), computed with grad through those tensors."""
    module = _ScorerLoss(scorer)
    return torch.func.functional_call(module, {f"model.{name}": t for name, t in parameters.items()}, (batch,),
                                      tie_weights=True, strict=False)
