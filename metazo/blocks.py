"""Parameter blocks: the trainable tensors a zeroth-order optimizer perturbs, with what they are for.

A block's role and depth come from the model's structure and parameter names (the owning module's
type, the name components, the repeated layer stack), never from the model class or model_type, so a
new architecture that follows the usual naming gets sensible roles without a line of code here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ROLES = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "attn_qkv",
    "mlp_up",
    "mlp_gate",
    "mlp_down",
    "norm",
    "embed",
    "head",
    "other",
)

# Module names that say what a projection does, whatever the architecture.
_PROJECTION_ROLES = {
    "q_proj": "attn_q",
    "query": "attn_q",
    "k_proj": "attn_k",
    "key": "attn_k",
    "v_proj": "attn_v",
    "value": "attn_v",
    "o_proj": "attn_o",
    "out_proj": "attn_o",
    "c_attn": "attn_qkv",
    "qkv_proj": "attn_qkv",
    "query_key_value": "attn_qkv",
    "gate_proj": "mlp_gate",
    "up_proj": "mlp_up",
    "fc1": "mlp_up",
    "c_fc": "mlp_up",
    "down_proj": "mlp_down",
    "fc2": "mlp_down",
}

# Module names whose meaning depends on whether they sit in an attention or an MLP block
# (GPT-2 uses c_proj for both outputs): (role inside attention, role elsewhere).
_CONTEXT_ROLES = {
    "c_proj": ("attn_o", "mlp_down"),
    "dense": ("attn_o", "other"),
}


@dataclass(frozen=True, eq=False)
class Block:
    """One trainable tensor. Blocks compare by identity, like the parameters they hold."""

    index: int  # position in the block list
    name: str  # name in model.named_parameters() (the first name of a tied tensor)
    param: nn.Parameter = field(repr=False)
    role: str  # one of ROLES
    depth: float  # 0 = embeddings / first layer, 1 = last layer / final norm / head
    decays: bool  # weight decay applies: matrices that are not norms (MeZO skips norms and biases)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype


def param_role(name: str, module: nn.Module) -> str:
    """Role of the parameter `name` (full dotted name) owned directly by `module`.

    The output head is recognised only by `model_blocks`, which can ask the model for it.
    """
    # An adapter wrapper (e.g. LoRA) keeps the module it wraps as `.base` and plays its part.
    wrapped = module.base if isinstance(getattr(module, "base", None), nn.Module) else module
    if isinstance(wrapped, nn.Embedding):
        return "embed"
    if isinstance(wrapped, nn.LayerNorm) or "Norm" in type(wrapped).__name__:
        return "norm"
    return _projection_role(name.split(".")[:-1])


def _projection_role(module_path: list[str]) -> str:
    # The nearest recognised name wins, so adapter sub-modules (q_proj.lora_A.default) inherit
    # the role of the projection they sit in.
    for position in range(len(module_path) - 1, -1, -1):
        component = module_path[position]
        if component in _PROJECTION_ROLES:
            return _PROJECTION_ROLES[component]
        if component in _CONTEXT_ROLES:
            in_attention, elsewhere = _CONTEXT_ROLES[component]
            return in_attention if _inside_attention(module_path[:position]) else elsewhere
    return "other"


def _inside_attention(ancestors: list[str]) -> bool:
    for ancestor in reversed(ancestors):
        lowered = ancestor.lower()
        if "attn" in lowered or "attention" in lowered:
            return True
        if "mlp" in lowered or "ffn" in lowered or "feed_forward" in lowered:
            return False
    return False


def model_blocks(model: nn.Module) -> list[Block]:
    """The trainable tensors of `model`, each once (tied weights found by identity), in model order."""
    input_embeddings = _call_if_present(model, "get_input_embeddings")
    output_embeddings = _call_if_present(model, "get_output_embeddings")
    input_weight = getattr(input_embeddings, "weight", None)
    # Everything inside the output module (an adapter wrapper and the Linear it wraps) is the head.
    head_modules = {id(m) for m in output_embeddings.modules()} if output_embeddings is not None else set()
    layer_stack = _layer_stack(model)

    blocks: list[Block] = []
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        owner = model.get_submodule(name.rpartition(".")[0])
        if param is input_weight:
            role = "embed"  # a head tied to the input embedding is the embedding
        elif id(owner) in head_modules:
            role = "head"
        else:
            role = param_role(name, owner)
        blocks.append(
            Block(
                index=len(blocks),
                name=name,
                param=param,
                role=role,
                depth=_depth(name, role, layer_stack),
                decays=param.ndim >= 2 and role != "norm",
            )
        )
    return blocks


def _call_if_present(model: nn.Module, method: str) -> nn.Module | None:
    getter = getattr(model, method, None)
    if not callable(getter):
        return None
    try:
        return getter()
    except NotImplementedError:
        return None


def _layer_stack(model: nn.Module) -> tuple[str, int] | None:
    """(name, length) of the transformer layer stack: the ModuleList of same-type children holding
    the most parameters. Counting parameters rather than entries keeps a nested list (MoE experts)
    from winning over the layer list that contains it."""
    best_name, best_length, best_size = None, 0, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best_name, best_length, best_size = name, len(module), size
    return None if best_name is None else (best_name, best_length)


def _depth(name: str, role: str, layer_stack: tuple[str, int] | None) -> float:
    if layer_stack is None:
        return 0.0
    stack_name, n_layers = layer_stack
    prefix = f"{stack_name}." if stack_name else ""
    if name.startswith(prefix):
        layer_index = name[len(prefix) :].split(".", 1)[0]
        if layer_index.isdigit():
            return int(layer_index) / (n_layers - 1) if n_layers > 1 else 0.0
    # Outside the stack, registration order does not tell before from after (OPT registers its final
    # norm before its layers), but what the tensor is does: embeddings feed the first layer, and the
    # rest (final norm, head) reads the last one.
    return 0.0 if role == "embed" else 1.0
