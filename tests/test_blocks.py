import pytest
import torch
from torch import nn

from metazo.blocks import ROLES, Block, model_blocks, param_role
from metazo.models import load_model

# Layer-0 and outside-the-stack parameters with the role each must get, per family.
EXPECTED_ROLES = {
    "tiny-llama": {
        "model.embed_tokens.weight": "embed",
        "model.layers.0.self_attn.q_proj.weight": "attn_q",
        "model.layers.0.self_attn.k_proj.weight": "attn_k",
        "model.layers.0.self_attn.v_proj.weight": "attn_v",
        "model.layers.0.self_attn.o_proj.weight": "attn_o",
        "model.layers.0.mlp.gate_proj.weight": "mlp_gate",
        "model.layers.0.mlp.up_proj.weight": "mlp_up",
        "model.layers.0.mlp.down_proj.weight": "mlp_down",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.layers.0.post_attention_layernorm.weight": "norm",
        "model.norm.weight": "norm",
        "lm_head.weight": "head",
    },
    "tiny-qwen2": {
        "model.embed_tokens.weight": "embed",
        "model.layers.0.self_attn.q_proj.weight": "attn_q",
        "model.layers.0.self_attn.q_proj.bias": "attn_q",
        "model.layers.0.self_attn.k_proj.bias": "attn_k",
        "model.layers.0.self_attn.v_proj.bias": "attn_v",
        "model.layers.0.self_attn.o_proj.weight": "attn_o",
        "model.layers.0.mlp.gate_proj.weight": "mlp_gate",
        "model.layers.0.mlp.down_proj.weight": "mlp_down",
        "model.norm.weight": "norm",
        "lm_head.weight": "head",
    },
    "tiny-opt": {
        "model.decoder.embed_tokens.weight": "embed",
        "model.decoder.embed_positions.weight": "embed",
        "model.decoder.layers.0.self_attn.q_proj.weight": "attn_q",
        "model.decoder.layers.0.self_attn.k_proj.bias": "attn_k",
        "model.decoder.layers.0.self_attn.v_proj.weight": "attn_v",
        "model.decoder.layers.0.self_attn.out_proj.weight": "attn_o",
        "model.decoder.layers.0.self_attn.out_proj.bias": "attn_o",
        "model.decoder.layers.0.self_attn_layer_norm.weight": "norm",
        "model.decoder.layers.0.fc1.weight": "mlp_up",
        "model.decoder.layers.0.fc1.bias": "mlp_up",
        "model.decoder.layers.0.fc2.weight": "mlp_down",
        "model.decoder.layers.0.final_layer_norm.bias": "norm",
        "model.decoder.final_layer_norm.weight": "norm",
    },
    "tiny-gpt2": {
        "transformer.wte.weight": "embed",
        "transformer.wpe.weight": "embed",
        "transformer.h.0.ln_1.weight": "norm",
        "transformer.h.0.attn.c_attn.weight": "attn_qkv",
        "transformer.h.0.attn.c_attn.bias": "attn_qkv",
        "transformer.h.0.attn.c_proj.weight": "attn_o",
        "transformer.h.0.attn.c_proj.bias": "attn_o",
        "transformer.h.0.ln_2.bias": "norm",
        "transformer.h.0.mlp.c_fc.weight": "mlp_up",
        "transformer.h.0.mlp.c_proj.weight": "mlp_down",
        "transformer.h.0.mlp.c_proj.bias": "mlp_down",
        "transformer.ln_f.weight": "norm",
    },
    "tiny-gemma3": {
        "model.embed_tokens.weight": "embed",
        "model.layers.0.self_attn.q_proj.weight": "attn_q",
        "model.layers.0.self_attn.k_proj.weight": "attn_k",
        "model.layers.0.self_attn.v_proj.weight": "attn_v",
        "model.layers.0.self_attn.o_proj.weight": "attn_o",
        "model.layers.0.self_attn.q_norm.weight": "norm",
        "model.layers.0.self_attn.k_norm.weight": "norm",
        "model.layers.0.mlp.gate_proj.weight": "mlp_gate",
        "model.layers.0.mlp.up_proj.weight": "mlp_up",
        "model.layers.0.mlp.down_proj.weight": "mlp_down",
        "model.layers.0.pre_feedforward_layernorm.weight": "norm",
        "model.norm.weight": "norm",
    },
}
FAMILIES = list(EXPECTED_ROLES)
FINAL_NORM = {
    "tiny-llama": "model.norm.weight",
    "tiny-qwen2": "model.norm.weight",
    "tiny-opt": "model.decoder.final_layer_norm.weight",
    "tiny-gpt2": "transformer.ln_f.weight",
    "tiny-gemma3": "model.norm.weight",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, _ = load_model(request.param, device="cpu")
    return request.param, model


def unique_trainable_numel(model: nn.Module) -> int:
    unique = {id(p): p for p in model.parameters() if p.requires_grad}
    return sum(p.numel() for p in unique.values())


def test_roles_of_named_parameters(family):
    name, model = family
    roles = {block.name: block.role for block in model_blocks(model)}
    for param_name, expected in EXPECTED_ROLES[name].items():
        assert roles[param_name] == expected, param_name
    assert set(roles.values()) <= set(ROLES)


def test_every_layer_has_the_same_roles(family):
    _, model = family
    blocks = model_blocks(model)
    first_layer = sorted(b.role for b in blocks if b.depth == 0.0 and b.role != "embed")
    middle_layer = sorted(b.role for b in blocks if b.depth == 0.5)
    assert first_layer == middle_layer
    assert "other" not in first_layer


def test_tied_head_counted_once_and_numel_matches(family):
    name, model = family
    blocks = model_blocks(model)
    params = [block.param for block in blocks]
    assert len({id(p) for p in params}) == len(params)
    assert sum(block.numel for block in blocks) == unique_trainable_numel(model)
    assert [block.index for block in blocks] == list(range(len(blocks)))

    head_weight = model.get_output_embeddings().weight
    head_blocks = [block for block in blocks if block.param is head_weight]
    assert len(head_blocks) == 1
    if head_weight is model.get_input_embeddings().weight:
        assert head_blocks[0].role == "embed"
        assert not any(block.role == "head" for block in blocks)
    else:
        assert head_blocks[0].role == "head"
        assert head_blocks[0].depth == 1.0


def test_frozen_parameters_are_skipped(family):
    name, model = family
    blocks = model_blocks(model)
    embedding = model.get_input_embeddings().weight
    first_q = next(block.param for block in blocks if block.role in ("attn_q", "attn_qkv"))
    try:
        embedding.requires_grad_(False)
        first_q.requires_grad_(False)
        fewer = model_blocks(model)
        assert len(fewer) == len(blocks) - 2
        assert sum(b.numel for b in fewer) == sum(b.numel for b in blocks) - embedding.numel() - first_q.numel()
        assert not any(b.param is embedding or b.param is first_q for b in fewer)
        assert [b.index for b in fewer] == list(range(len(fewer)))
    finally:
        model.requires_grad_(True)


def test_depth(family):
    name, model = family
    blocks = {block.name: block for block in model_blocks(model)}
    assert all(0.0 <= block.depth <= 1.0 for block in blocks.values())
    assert all(block.depth == 0.0 for block in blocks.values() if block.role == "embed")
    assert blocks[FINAL_NORM[name]].depth == 1.0
    for block in blocks.values():
        if block.role == "head":
            assert block.depth == 1.0

    # The same tensor in successive layers sits strictly deeper.
    layer0_q = next(b for b in blocks.values() if b.role in ("attn_q", "attn_qkv"))
    depths = [blocks[layer0_q.name.replace(".0.", f".{i}.", 1)].depth for i in range(3)]
    assert depths[0] < depths[1] < depths[2]
    assert depths == [0.0, 0.5, 1.0]


def test_decays_only_on_matrices_that_are_not_norms(family):
    _, model = family
    for block in model_blocks(model):
        if block.role == "norm" or block.name.endswith(".bias"):
            assert not block.decays, block.name
        if block.param.ndim >= 2 and block.role != "norm":
            assert block.decays, block.name


def test_block_properties():
    model, _ = load_model("tiny-llama", device="cpu", dtype="bf16")
    block = model_blocks(model)[1]
    assert isinstance(block, Block)
    assert block.shape == block.param.shape
    assert block.numel == block.param.numel()
    assert block.dtype == torch.bfloat16
    assert "param" not in repr(block)  # a tensor dump would flood logs
    with pytest.raises(AttributeError):
        block.role = "other"


# --- adapters and hand-made modules -------------------------------------------------------------------


class LowRankAdapter(nn.Module):
    """A LoRA-style wrapper: the frozen original as `.base`, trainable low-rank factors beside it."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def test_lora_adapters_take_the_role_of_the_projection_they_wrap():
    model, _ = load_model("tiny-llama", device="cpu")
    model.requires_grad_(False)
    for layer in model.model.layers:
        layer.self_attn.q_proj = LowRankAdapter(layer.self_attn.q_proj)
        layer.mlp.down_proj = LowRankAdapter(layer.mlp.down_proj)
    model.lm_head = LowRankAdapter(model.lm_head)

    blocks = {block.name: block for block in model_blocks(model)}
    assert len(blocks) == 2 * 2 * 3 + 2
    assert blocks["model.layers.0.self_attn.q_proj.lora_A"].role == "attn_q"
    assert blocks["model.layers.0.self_attn.q_proj.lora_B"].role == "attn_q"
    assert blocks["model.layers.2.mlp.down_proj.lora_B"].role == "mlp_down"
    assert blocks["lm_head.lora_A"].role == "head"
    assert all(block.decays for block in blocks.values())
    assert blocks["model.layers.0.self_attn.q_proj.lora_A"].depth == 0.0
    assert blocks["model.layers.1.self_attn.q_proj.lora_A"].depth == 0.5
    assert blocks["model.layers.2.self_attn.q_proj.lora_A"].depth == 1.0

    # Training the wrapped weight too: it keeps its projection role.
    model.model.layers[0].self_attn.q_proj.base.weight.requires_grad_(True)
    blocks = {block.name: block for block in model_blocks(model)}
    assert blocks["model.layers.0.self_attn.q_proj.base.weight"].role == "attn_q"


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_proj = nn.Linear(8, 8)
        self.dense = nn.Linear(8, 8)


class Feedforward(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_proj = nn.Linear(8, 8)
        self.dense = nn.Linear(8, 8)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.mlp = Feedforward()
        self.my_norm = MyNorm()


class MyNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8, 8))  # a matrix, but a norm: no decay


class Stack(nn.Module):
    def __init__(self, n_layers):
        super().__init__()
        self.token_table = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(Layer() for _ in range(n_layers))
        self.extra = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])  # mixed types: not the layer stack
        self.readout = nn.Linear(8, 3)


def test_roles_come_from_structure_not_the_model_class():
    model = Stack(n_layers=4)
    blocks = {block.name: block for block in model_blocks(model)}
    assert blocks["token_table.weight"].role == "embed"
    assert blocks["blocks.0.attention.c_proj.weight"].role == "attn_o"
    assert blocks["blocks.0.attention.dense.bias"].role == "attn_o"
    assert blocks["blocks.0.mlp.c_proj.weight"].role == "mlp_down"
    assert blocks["blocks.0.mlp.dense.weight"].role == "other"
    assert blocks["blocks.3.my_norm.scale"].role == "norm"
    assert not blocks["blocks.3.my_norm.scale"].decays
    assert blocks["readout.weight"].role == "other"  # no get_output_embeddings: no head
    assert [blocks[f"blocks.{i}.mlp.c_proj.weight"].depth for i in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert blocks["token_table.weight"].depth == 0.0
    assert blocks["readout.weight"].depth == 1.0
    assert blocks["extra.0.weight"].depth == 1.0


def test_single_layer_and_no_layer_stack():
    one = {block.name: block for block in model_blocks(Stack(n_layers=1))}
    assert one["blocks.0.attention.c_proj.weight"].depth == 0.0
    flat = model_blocks(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert [b.depth for b in flat] == [0.0] * 4
    assert [b.role for b in flat] == ["other", "other", "norm", "norm"]


def test_param_role_directly():
    linear = nn.Linear(4, 4)
    assert param_role("model.layers.3.self_attn.k_proj.weight", linear) == "attn_k"
    assert param_role("encoder.layer.0.attention.self.value.bias", linear) == "attn_v"
    assert param_role("h.1.self_attention.query_key_value.weight", linear) == "attn_qkv"
    assert param_role("layers.0.attn.qkv_proj.weight", linear) == "attn_qkv"
    assert param_role("layers.0.self_attn.q_proj.lora_A.default.weight", linear) == "attn_q"
    assert param_role("layers.0.mlp.fc1.weight", linear) == "mlp_up"
    assert param_role("layers.0.whatever.weight", linear) == "other"
    assert param_role("layers.0.q_proj.weight", nn.LayerNorm(4)) == "norm"
    assert param_role("wte.weight", nn.Embedding(3, 4)) == "embed"
