"""PertNN: a compact network that gives every parameter block its perturbation scale sigma.

The paper's PertNN is Linear(5, 64) -> Tanh -> Linear(64, 1) with sigma = |output|, one network per
tensor. That ties a policy to the model it was trained on. Here the networks are shared per *role*
(attn_q, mlp_down, norm, ...; see ``metazo.blocks``): every block of a role, at any depth, in any
model, goes through the same weights, and what tells the blocks apart are transferable features
(relative depth, share of the model, scaled weight statistics; ``metazo.policy.features``). So a
policy trained on one model applies to another of other depth, width or family. ``sharing="tensor"``
gives one network per tensor (by name), as the paper, usable on the model it was trained on only.

sigma only redistributes the perturbation: u_i = nf * sigma_i * z_i with
nf = sqrt(D / sum_i d_i sigma_i^2) (``normalizer``), so ||u||^2 has MeZO's expectation D.

The G networks are stored as stacked tensors (w1: G x F x H, ...) and evaluated in one batched
einsum. All start with a zero output layer, so a fresh policy gives sigma = 1 everywhere: MeZO.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from metazo.blocks import ROLES, Block
from metazo.errors import MetazoError
from metazo.policy.features import FEATURE_SETS

SHARINGS = ("role", "tensor")
SIGMA_ACTIVATIONS = ("exp", "abs")
ABS_FLOOR = 1e-6  # the paper's |output| can reach 0, which would make nf infinite


@dataclass(frozen=True)
class PolicyConfig:
    """The architecture of a policy; saved in its file, so a loaded policy is rebuilt exactly."""

    features: str = "scaled"        # a key of FEATURE_SETS
    sharing: str = "role"           # one network per role, or per tensor (the paper)
    hidden: int = 64                # the paper's width
    sigma_activation: str = "exp"   # exp: sigma = exp(b tanh(out / b)), bounded and smooth; abs: |out| (the paper)
    log_sigma_bound: float = 3.0    # b: sigma in [e^-b, e^b] for "exp"

    def validate(self) -> None:
        if self.features not in FEATURE_SETS:
            raise MetazoError(f"unknown feature set '{self.features}'; choose one of: {', '.join(FEATURE_SETS)}")
        if self.sharing not in SHARINGS:
            raise MetazoError(f"unknown sharing '{self.sharing}'; choose one of: {', '.join(SHARINGS)}")
        if self.sigma_activation not in SIGMA_ACTIVATIONS:
            raise MetazoError(f"unknown sigma activation '{self.sigma_activation}'; choose one of: {', '.join(SIGMA_ACTIVATIONS)}")
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise MetazoError(f"policy hidden width must be an integer >= 1, got {self.hidden!r}")
        if not self.log_sigma_bound > 0:
            raise MetazoError(f"log_sigma_bound must be > 0, got {self.log_sigma_bound}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_SETS[self.features]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def group_of(block: Block, sharing: str) -> str:
    """The network a block goes through: its role, or its own name."""
    return block.role if sharing == "role" else block.name


def normalizer(sigma: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """nf = sqrt(D / sum_i d_i sigma_i^2): the factor that gives u = nf sigma z MeZO's expected norm."""
    sigma = sigma.double()
    numels = numels.to(sigma.device, torch.float64)
    return torch.sqrt(numels.sum() / (numels * sigma**2).sum())


class PerturbationPolicy(nn.Module):
    """sigma per block from its features, one small MLP per group (role or tensor).

    >>> policy = PerturbationPolicy.for_blocks(model_blocks(model))
    >>> policy.save_pretrained("my-policy.safetensors", card={...})
    >>> policy = PerturbationPolicy.from_pretrained("my-policy.safetensors")
    """

    def __init__(self, groups: Sequence[str], config: PolicyConfig = PolicyConfig(), seed: int = 0):
        super().__init__()
        config.validate()
        if not groups:
            raise MetazoError("a policy needs at least one group (role or tensor) to act on")
        if len(set(groups)) != len(groups):
            raise MetazoError("policy groups must be distinct")
        self.config = config
        self.groups = tuple(groups)
        self.card: dict[str, Any] = {}
        n_groups, n_features, hidden = len(groups), len(config.feature_names), config.hidden
        generator = torch.Generator().manual_seed(seed)
        bound = n_features**-0.5  # nn.Linear's default range
        self.w1 = nn.Parameter(torch.empty(n_groups, n_features, hidden).uniform_(-bound, bound, generator=generator))
        self.b1 = nn.Parameter(torch.empty(n_groups, hidden).uniform_(-bound, bound, generator=generator))
        self.w2 = nn.Parameter(torch.zeros(n_groups, hidden))
        # Zero output layer: sigma = exp(0) = 1, or |1| = 1 for "abs": a fresh policy is MeZO.
        start = 0.0 if config.sigma_activation == "exp" else 1.0
        self.b2 = nn.Parameter(torch.full((n_groups,), start))

    @classmethod
    def for_blocks(cls, blocks: Sequence[Block], config: PolicyConfig = PolicyConfig(), seed: int = 0) -> "PerturbationPolicy":
        """A fresh policy with one network per role present in ``blocks`` (or per tensor)."""
        names = {group_of(b, config.sharing) for b in blocks}
        order = ROLES if config.sharing == "role" else [b.name for b in blocks]
        return cls([g for g in order if g in names], config, seed)

    def assign(self, blocks: Sequence[Block]) -> tuple[torch.Tensor, list[str]]:
        """Network index of each block (-1 where the policy has none: sigma stays 1), and the groups
        of ``blocks`` the policy never saw."""
        index = {g: i for i, g in enumerate(self.groups)}
        groups = [group_of(b, self.config.sharing) for b in blocks]
        if self.config.sharing == "tensor":
            unknown = [g for g in groups if g not in index]
            if unknown:
                raise MetazoError(
                    f"this policy has one network per tensor (trained on another model) and none for '{unknown[0]}' "
                    f"({len(unknown)} tensors unmatched); use a policy shared per role for a new model"
                )
        unseen = sorted({g for g in groups if g not in index}, key=lambda g: ROLES.index(g) if g in ROLES else 0)
        return torch.tensor([index.get(g, -1) for g in groups], dtype=torch.long), unseen

    def forward(self, features: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
        """sigma (float32, one per block) from features (blocks x F) and each block's network index."""
        known = group_index >= 0
        g = group_index.clamp(min=0).to(self.w1.device)
        x = features.to(self.w1.device, self.w1.dtype)
        hidden = torch.tanh(torch.einsum("nf,nfh->nh", x, self.w1[g]) + self.b1[g])
        out = (hidden * self.w2[g]).sum(-1) + self.b2[g]
        if self.config.sigma_activation == "exp":
            bound = self.config.log_sigma_bound
            sigma = torch.exp(bound * torch.tanh(out / bound))
        else:
            sigma = out.abs().clamp(min=ABS_FLOOR)
        return torch.where(known.to(sigma.device), sigma, torch.ones_like(sigma))

    def save_pretrained(self, path: str | Path, card: dict[str, Any] | None = None) -> Path:
        from metazo.policy.io import save_policy

        return save_policy(self, path, card if card is not None else self.card)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PerturbationPolicy":
        from metazo.policy.io import load_policy

        return load_policy(path)

    def extra_repr(self) -> str:
        return f"groups={len(self.groups)} ({self.config.sharing}), features={self.config.features}, hidden={self.config.hidden}"
