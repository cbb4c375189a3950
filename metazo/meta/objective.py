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
    """theta' = theta - sum_k a_k s_k z(seed_k) for one block, with s_k the block's scale in step k;
    backward regenerates the z's rather than saving them. A step whose scale is 0 in value (an
    applied step, see ``lookahead_parameters``) costs no noise in the forward."""

    @staticmethod
    def forward(ctx, scales: torch.Tensor, theta: torch.Tensor, steps: tuple[tuple[int, float], ...], block: Block):
        ctx.steps, ctx.block, ctx.scale_dtype = steps, block, scales.dtype
        work = torch.promote_types(theta.dtype, torch.float32)  # float32, or float64 for a float64 model
        delta = None
        for (seed, coefficient), scale in zip(steps, scales.tolist()):
            if scale != 0.0:
                z = block_noise(_NOISE, block, seed).to(theta.device, work)
                delta = z.mul_(coefficient * scale) if delta is None else delta.add_(z, alpha=coefficient * scale)
        return theta.clone() if delta is None else theta.to(work, copy=True).sub_(delta).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat = grad_out.to(torch.promote_types(grad_out.dtype, torch.float32)).reshape(-1)
        grads = [-coefficient * torch.dot(flat, block_noise(_NOISE, ctx.block, seed).to(flat).reshape(-1))
                 for seed, coefficient in ctx.steps]
        return torch.stack(grads).to(ctx.scale_dtype), None, None, None


def lookahead_parameters(blocks: Sequence[Block], steps: Sequence[tuple[int, float, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{block name: theta'_i}, theta'_i = theta_i - sum_k a_k s_k[i] z_i(seed_k), for the steps
    (seed_k, a_k, s_k) with s_k the scales of every block (a_k = lr_update * c_k / q).

    A step already applied to theta is passed with s_k - s_k.detach(): zero in value, so theta' is
    theta, but d theta' / d s_k = -a_k z_k, what an unrolled meta-gradient needs."""
    seeds = tuple((int(seed), float(coefficient)) for seed, coefficient, _ in steps)
    scales = torch.stack([s for _, _, s in steps])  # (steps, blocks)
    return {block.name: _Lookahead.apply(scales[:, i], block.param.detach(), seeds, block) for i, block in enumerate(blocks)}


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
