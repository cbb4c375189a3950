"""How good is a sampler's gradient estimate? Compare it with the true gradient from autograd.

Used by the estimator tests of every sampler and by ``scripts/gradient_cosine.py``.
"""

from __future__ import annotations

from typing import Callable

import torch

from metazo.blocks import Block
from metazo.engine import ZeroOrderOptimizer
from metazo.samplers import block_noise


def true_gradient(blocks: list[Block], loss_fn: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d block, by backpropagation (float32)."""
    params = [block.param for block in blocks]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    return {b.name: (torch.zeros_like(b.param) if g is None else g).float() for b, g in zip(blocks, grads)}


def estimated_gradient(optimizer: ZeroOrderOptimizer, closure: Callable[[], torch.Tensor], steps: int,
                       first_step: int = 0) -> dict[str, torch.Tensor]:
    """Mean over ``steps`` independent steps of the engine's estimate sum_j c_j u_j / q (no update)."""
    total = {b.name: torch.zeros(b.shape, dtype=torch.float32, device=b.param.device) for b in optimizer.blocks}
    for step in range(first_step, first_step + steps):
        estimates = optimizer.estimate(closure, step=step)
        for block in optimizer.blocks:
            if not optimizer.sampler.active(block):
                continue
            for e in estimates:
                total[block.name].add_(block_noise(optimizer.sampler, block, e.seed), alpha=e.projected_grad / len(estimates))
    return {name: t / steps for name, t in total.items()}


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str] | None = None) -> float:
    """Cosine similarity of two gradients given as {block name: tensor}, over ``names`` (default: all)."""
    names = names or list(a)
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in names)
    norm_a = sum(float(a[n].double().pow(2).sum()) for n in names) ** 0.5
    norm_b = sum(float(b[n].double().pow(2).sum()) for n in names) ** 0.5
    return dot / (norm_a * norm_b) if norm_a and norm_b else 0.0


def expected_cosine(scales: torch.Tensor, grad_sq_norms: torch.Tensor, numels: torch.Tensor) -> float:
    """E[<g_hat, g>] / sqrt(E||g_hat||^2 ||g||^2) for the two-point estimate g_hat = (g.u) u (eps -> 0)
    with u_i = scales_i * z_i, z ~ N(0, I), block i of numels_i entries and gradient norm^2 grad_sq_norms_i.

    With s_i = scales_i^2 and A = sum_i s_i ||g_i||^2: E[<g_hat, g>] = A and
    E||g_hat||^2 = A * sum_i s_i d_i + 2 sum_i s_i^2 ||g_i||^2 (Gaussian fourth moments), so this is a
    noise-free figure of how well a sampler's scales point at the gradient: MeZO (all 1) gets about
    1 / sqrt(D), and scaling up blocks with a dense gradient raises it.
    """
    s = scales.double() ** 2
    g2 = grad_sq_norms.double()
    a = (s * g2).sum()
    second_moment = a * (s * numels.double()).sum() + 2 * (s**2 * g2).sum()
    denominator = torch.sqrt(second_moment * g2.sum())
    return float(a / denominator) if denominator > 0 else 0.0
