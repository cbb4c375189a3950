"""What a perturbation policy sees of each block, in units that mean the same on every model and task.

The paper (ZO Fine-tuner, arXiv 2510.00419) feeds its PertNN five raw numbers per block: the mean and
variance of the block's weights, the previous L+ and L-, and the previous sigma. Raw values do not
transfer: a loss of 0.7 is high for a binary task and low for a six-way one, and weight variances
differ by orders of magnitude between a norm, a projection, and the same projection in a wider model.
The ``scaled`` set carries the same information in transferable units, plus where the block sits:

=========================  =========================================================================
depth                      relative depth in [0, 1] (``Block.depth``)
log_size                   log(numel / trained numel of the whole model) / 10: the block's share
weight_mean_over_rms       mean / sqrt(mean^2 + var) of the weights, in [-1, 1] (1 for a norm at 1)
weight_log_rms_z           log RMS of the weights as a z-score over the model's blocks, clipped to 3
loss_progress              log(previous loss / first loss), clipped to [-3, 3]: how far the run got
projected_grad_size        |previous c| over the RMS of all c so far, c = (L+ - L-) / (2 eps), clipped
                           to 3: L+ and L- as their scale-free difference (its sign is the random
                           sign of the direction, which says nothing about where to perturb)
previous_log_sigma         log of the block's sigma in the previous step (0 at the start)
=========================  =========================================================================

``paper`` is the paper's raw set (weight mean, weight variance, L+, L-, previous sigma), for
reproducing it on the model it was trained on. At the start of a run losses are 0 and sigma is 1, as
in the paper. The block's role is not a feature: networks are shared per role (``PolicyConfig.sharing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from metazo.blocks import Block
from metazo.errors import MetazoError

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "scaled": ("depth", "log_size", "weight_mean_over_rms", "weight_log_rms_z", "loss_progress",
               "projected_grad_size", "previous_log_sigma"),
    "paper": ("weight_mean", "weight_var", "loss_plus", "loss_minus", "previous_sigma"),
}

CLIP = 3.0


@dataclass
class RunState:
    """What a policy remembers of the run between steps: the last losses, the running scale of c and
    the last sigma of every block. Reset with the model (meta-training resets, a new fine-tuning run)."""

    num_blocks: int
    loss_plus: float = 0.0
    loss_minus: float = 0.0
    first_loss: float | None = None
    projected_grad: float = 0.0
    projected_grad_sq_mean: float = 0.0
    observations: int = 0
    previous_sigma: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.previous_sigma is None:
            self.previous_sigma = torch.ones(self.num_blocks, dtype=torch.float32)

    def observe(self, loss_plus: float, loss_minus: float, projected_grad: float, sigma: torch.Tensor) -> None:
        if not all(math.isfinite(v) for v in (loss_plus, loss_minus, projected_grad)):
            return  # a skipped step teaches the features nothing
        self.loss_plus, self.loss_minus, self.projected_grad = loss_plus, loss_minus, projected_grad
        if self.first_loss is None:
            self.first_loss = (loss_plus + loss_minus) / 2
        self.observations += 1
        self.projected_grad_sq_mean += (projected_grad**2 - self.projected_grad_sq_mean) / self.observations
        self.previous_sigma = sigma.detach().float().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "loss_plus": self.loss_plus, "loss_minus": self.loss_minus,
                "first_loss": self.first_loss, "projected_grad": self.projected_grad,
                "projected_grad_sq_mean": self.projected_grad_sq_mean, "observations": self.observations,
                "previous_sigma": self.previous_sigma.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_blocks"]) != self.num_blocks:
            raise MetazoError(f"policy run state is for {state['num_blocks']} blocks, this model has {self.num_blocks}")
        for key in ("loss_plus", "loss_minus", "projected_grad", "projected_grad_sq_mean"):
            setattr(self, key, float(state[key]))
        self.first_loss = None if state["first_loss"] is None else float(state["first_loss"])
        self.observations = int(state["observations"])
        self.previous_sigma = torch.tensor(state["previous_sigma"], dtype=torch.float32)


@torch.no_grad()
def weight_statistics(blocks: Sequence[Block]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of each block's weights, float64 on the CPU: one pass over the weights, by
    sum and dot product (an order of magnitude faster than ``torch.var_mean`` on a CPU)."""
    means, variances = [], []
    for block in blocks:
        values = block.param.detach().reshape(-1).float()
        n = values.numel()
        mean = float(values.sum()) / n
        means.append(mean)
        variances.append(max(float(torch.dot(values, values)) / n - mean * mean, 0.0))
    return torch.tensor(means, dtype=torch.float64), torch.tensor(variances, dtype=torch.float64)


def block_features(feature_set: str, blocks: Sequence[Block], state: RunState,
                   statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Features of every block, float32 of shape (blocks, features), in ``FEATURE_SETS[feature_set]`` order."""
    if feature_set not in FEATURE_SETS:
        raise MetazoError(f"unknown feature set '{feature_set}'; choose one of: {', '.join(FEATURE_SETS)}")
    mean, var = statistics if statistics is not None else weight_statistics(blocks)
    n = len(blocks)
    if feature_set == "paper":
        columns = [mean, var, torch.full((n,), state.loss_plus, dtype=torch.float64),
                   torch.full((n,), state.loss_minus, dtype=torch.float64), state.previous_sigma.double()]
        return torch.stack(columns, dim=1).float()

    numel = torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)
    depth = torch.tensor([b.depth for b in blocks], dtype=torch.float64)
    log_size = torch.log(numel / numel.sum()) / 10
    rms = torch.sqrt(mean**2 + var)
    mean_over_rms = torch.where(rms > 0, mean / rms.clamp(min=1e-30), torch.zeros_like(rms))
    log_rms = torch.log(rms.clamp(min=1e-12))
    spread = log_rms.std(correction=0) if n > 1 else torch.tensor(0.0, dtype=torch.float64)
    log_rms_z = (log_rms - log_rms.mean()) / spread if spread > 1e-12 else torch.zeros_like(log_rms)
    progress, grad_z = 0.0, 0.0
    if state.first_loss is not None and state.first_loss > 0:
        current = (state.loss_plus + state.loss_minus) / 2
        progress = math.log(max(current, 1e-12) / state.first_loss)
    if state.projected_grad_sq_mean > 0:
        grad_z = abs(state.projected_grad) / math.sqrt(state.projected_grad_sq_mean)
    columns = [
        depth, log_size, mean_over_rms, log_rms_z.clamp(-CLIP, CLIP),
        torch.full((n,), max(-CLIP, min(CLIP, progress)), dtype=torch.float64),
        torch.full((n,), max(-CLIP, min(CLIP, grad_z)), dtype=torch.float64),
        torch.log(state.previous_sigma.double().clamp(min=1e-12)),
    ]
    return torch.stack(columns, dim=1).float()
