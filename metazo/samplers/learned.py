"""The learned sampler: Gaussian directions scaled per block by a perturbation policy.

u_i = nf * sigma_i * z_i, z ~ N(0, I) from the step's seed (as MeZO), sigma from the policy's
networks (``metazo.policy``) and nf = sqrt(D / sum_i d_i sigma_i^2), so the total perturbation has
MeZO's norm and sigma only redistributes it. With sigma = 1 everywhere the scale is exactly 1 and
every step equals the Gaussian sampler's.

Each step the policy reads the blocks' features (weight statistics, relative depth and size, the
previous losses and sigma) and the engine's estimate updates what it remembers (``observe``). Blocks
whose role the policy never saw keep sigma = 1 and are reported once at bind time.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metazo.blocks import Block
from metazo.errors import MetazoError
from metazo.policy import PerturbationPolicy, RunState, block_features, normalizer, weight_statistics
from metazo.samplers.gaussian import GaussianSampler


class UnseenRolesWarning(UserWarning):
    """A policy was loaded onto a model with roles it was never trained on (they keep sigma = 1)."""


class LearnedSampler(GaussianSampler):
    """``LearnedSampler(policy)``: ``policy`` is a :class:`PerturbationPolicy` or a policy file."""

    name = "learned"

    def __init__(self, policy: PerturbationPolicy | str | Path | None = None):
        if policy is None:
            raise MetazoError("sampler 'learned' needs a policy: pass --policy FILE (or policy=FILE)")
        self.policy = policy if isinstance(policy, PerturbationPolicy) else PerturbationPolicy.from_pretrained(policy)
        self.source = None if isinstance(policy, PerturbationPolicy) else str(policy)
        self.unseen: list[str] = []

    def __repr__(self) -> str:
        return f"LearnedSampler({self.source or self.policy!r})"

    def bind(self, blocks: list[Block], model: nn.Module | None = None) -> None:
        super().bind(blocks, model)
        self.group_index, self.unseen = self.policy.assign(blocks)
        if self.unseen:
            warnings.warn(f"the policy has never seen blocks of role {', '.join(self.unseen)}; they keep sigma = 1 (MeZO's)",
                          UnseenRolesWarning, stacklevel=2)
        self.position = {id(block): i for i, block in enumerate(blocks)}
        self.numels = torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)
        self.reset_run()

    def reset_run(self) -> None:
        """Forget the run so far (losses, previous sigma): a new run, or the model reset to its start."""
        self.run = RunState(len(self.blocks))
        self.sigma_now = torch.ones(len(self.blocks))
        self.scales = [1.0] * len(self.blocks)
        self.step_features: torch.Tensor | None = None

    def features(self) -> torch.Tensor:
        """The policy's input now (one pass over the weights for their statistics)."""
        return block_features(self.policy.config.features, self.blocks, self.run, weight_statistics(self.blocks))

    def sigma(self, features: torch.Tensor | None = None) -> torch.Tensor:
        """sigma of every block from the policy (differentiable in its weights when grad is enabled)."""
        return self.policy(self.features() if features is None else features, self.group_index)

    def use_sigma(self, sigma: torch.Tensor) -> None:
        """Scale this step's directions by nf * sigma."""
        sigma = sigma.detach().double().cpu()
        self.sigma_now = sigma.float()
        self.scales = (normalizer(sigma, self.numels) * sigma).tolist()

    def begin_step(self, step: int) -> None:
        self.step_features = self.features()  # kept: meta-training differentiates sigma at the same input
        with torch.no_grad():
            self.use_sigma(self.sigma(self.step_features))

    def block_scale(self, block: Block) -> float:
        return self.scales[self.position[id(block)]]

    def observe(self, loss_plus: float, loss_minus: float, projected_grad: float) -> None:
        self.run.observe(loss_plus, loss_minus, projected_grad, self.sigma_now)

    def diagnostics(self) -> dict[str, float]:
        """Mean sigma of each role in this step, and the extremes."""
        by_role: dict[str, list[float]] = {}
        for block, value in zip(self.blocks, self.sigma_now.tolist()):
            by_role.setdefault(block.role, []).append(value)
        values = {f"sigma/{role}": sum(v) / len(v) for role, v in by_role.items()}
        return {**values, "sigma/max": float(self.sigma_now.max()), "sigma/min": float(self.sigma_now.min())}

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run.load_state_dict(state["run"])
