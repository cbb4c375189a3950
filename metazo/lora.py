"""LoRA adapters for the engine's LoRA mode: train only low-rank updates of chosen projections.

MeZO's LoRA setting: rank 8, alpha 16, on the query and value projections, lr 1e-4, eps 1e-2.
The adapted layer computes base(x) + (alpha / r) * x A^T B^T with A (r x in) random and B (out x r)
zero, so the adapted model starts equal to the base model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metazo.blocks import param_role
from metazo.errors import MetazoError

DEFAULT_TARGETS = ("attn_q", "attn_v")


class LoRALinear(nn.Module):
    """Wraps a linear layer (``nn.Linear`` or GPT-2's transposed ``Conv1D``) with a LoRA update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        weight = base.weight
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) and says so with `nf` (= out).
        out_features, in_features = weight.shape if not hasattr(base, "nf") else weight.shape[::-1]
        if rank > min(in_features, out_features):
            raise MetazoError(f"LoRA rank {rank} is larger than the layer's dimensions {in_features}x{out_features}")
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """Freeze the model and wrap every projection whose role is in ``targets``; returns how many.

    A model with fused attention projections (GPT-2's c_attn) has no attn_q / attn_v: its
    ``attn_qkv`` projections are adapted instead when the targets name q or v.
    """
    if rank < 1:
        raise MetazoError(f"LoRA rank must be >= 1, got {rank}")
    for param in model.parameters():
        param.requires_grad_(False)
    wanted = set(targets)
    candidates = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            candidates.append((name, module, param_role(f"{name}.weight", module)))
    if wanted & {"attn_q", "attn_v"} and not any(role in ("attn_q", "attn_v") for _, _, role in candidates):
        wanted.add("attn_qkv")
    chosen = [(name, module) for name, module, role in candidates if role in wanted]
    if not chosen:
        raise MetazoError(f"no layers with roles {', '.join(sorted(targets))} to put LoRA adapters on")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha))
    return len(chosen)
