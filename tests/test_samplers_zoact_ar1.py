"""ZO-Act (activation-subspace coefficients) and AR1-ZO (one LoRA atom per step) samplers."""

import math

import pytest
import torch

from conftest import scorer_and_batch, tiny
from metazo.blocks import model_blocks, param_role
from metazo.checkpoints import load_tensors, load_weights, save_weights
from metazo.diagnostics import cosine, true_gradient
from metazo.engine import ZeroOrderOptimizer
from metazo.errors import MetazoError
from metazo.lora import add_lora
from metazo.samplers import GaussianSampler, block_noise
from metazo.samplers.ar1 import AR1Sampler, lora_factor
from metazo.samplers.zoact import ActSubspaceLinear, ZOActSampler




def calibrator(scorer, examples, batch_size):
    """The trainer's calibrate(n): score the first n examples in batches."""
    def calibrate(n_examples):
        with torch.inference_mode():
            chosen = examples[:n_examples]
            for start in range(0, len(chosen), batch_size):
                scorer.loss(scorer.encode(chosen[start:start + batch_size]))
    return calibrate


def logits(scorer, batch):
    with torch.no_grad():
        return scorer.label_logits(batch)


# ---------------------------------------------------------------------------------------- ZO-Act

def prepared_zoact(task, name="tiny-llama", rank=4, **options):
    model, tokenizer = tiny(name)
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    before = logits(scorer, batch)
    sampler = ZOActSampler(rank=rank, calibration_examples=8, **options)
    sampler.prepare_model(model, calibrator(scorer, task.train, batch_size=4))
    return model, tokenizer, scorer, batch, sampler, before


@pytest.mark.parametrize("name,n_linear", [("tiny-llama", 7), ("tiny-gpt2", 4)])
def test_zoact_starts_at_the_base_model_and_trains_only_coefficients(task, name, n_linear):
    model, _, scorer, batch, _, before = prepared_zoact(task, name)
    assert torch.equal(logits(scorer, batch), before)  # C = 0 adds exactly nothing
    blocks = model_blocks(model)
    assert len(blocks) == n_linear * model.config.num_hidden_layers  # every projection, not the head
    assert all(b.name.endswith(".coefficients") and b.shape[1] == 4 for b in blocks)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {b.name for b in blocks}
    wrapper = model.get_submodule(blocks[0].name.rpartition(".")[0])
    assert isinstance(wrapper, ActSubspaceLinear) and not wrapper.base.weight.requires_grad
    # The wrapper plays the wrapped projection's part.
    roles = {b.role for b in blocks}
    assert roles == ({"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"} if name == "tiny-llama"
                     else {"attn_qkv", "attn_o", "mlp_up", "mlp_down"})
    assert param_role(blocks[0].name, wrapper) == blocks[0].role


def test_zoact_basis_is_the_top_right_singular_subspace_of_real_token_activations(task):
    """U against torch.linalg.svd of the stacked activations, gathered one example at a time (no
    padding at all); ZO-Act itself calibrates on padded batches and must leave the padding out."""
    model, tokenizer = tiny("tiny-llama")
    scorer, _ = scorer_and_batch(model, tokenizer, task)
    watched = {"model.layers.1.self_attn.q_proj": [], "model.layers.2.mlp.down_proj": []}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, store=s: store.append(i[0].reshape(-1, i[0].shape[-1])))
             for n, s in watched.items()]
    calibrator(scorer, task.train, batch_size=1)(12)
    for hook in hooks:
        hook.remove()
    sampler = ZOActSampler(rank=4, calibration_examples=12)
    sampler.prepare_model(model, calibrator(scorer, task.train, batch_size=6))
    for name, activations in watched.items():
        basis = model.get_submodule(name).activation_basis
        torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
        right_vectors = torch.linalg.svd(torch.cat(activations).double(), full_matrices=False).Vh[:4].T.float()
        # Singular vectors are defined up to sign (and rotation in ties): compare the projectors.
        torch.testing.assert_close(basis @ basis.T, right_vectors @ right_vectors.T, atol=2e-4, rtol=0)


def test_zoact_steps_move_only_the_coefficients(task):
    model, _, scorer, batch, sampler, _ = prepared_zoact(task)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = ZeroOrderOptimizer(model_blocks(model), sampler, lr=1e-2, eps=1e-3, seed=1, model=model)
    for _ in range(3):
        result = optimizer.step(lambda: scorer.loss(batch))
        assert result.loss_plus != result.loss_minus  # perturbing C changes the model
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.all(b.param == 0) for b in optimizer.blocks)


def test_zoact_checkpoint_rebuilds_the_same_model(task, tmp_path):
    model, tokenizer, scorer, batch, sampler, _ = prepared_zoact(task)
    optimizer = ZeroOrderOptimizer(model_blocks(model), sampler, lr=1e-2, seed=2, model=model)
    optimizer.step(lambda: scorer.loss(batch))
    trained = logits(scorer, batch)
    path = save_weights(tmp_path / "weights.safetensors", optimizer.blocks, {"sampler": "zo-act"},
                        sampler.checkpoint_tensors(model))
    fresh, _ = tiny("tiny-llama")
    ZOActSampler.restore_model(fresh, load_tensors(path), {})
    load_weights(fresh, path)
    fresh_scorer, _ = scorer_and_batch(fresh, tokenizer, task)
    assert torch.equal(logits(fresh_scorer, batch), trained)
    assert [b.name for b in model_blocks(fresh)] == [b.name for b in optimizer.blocks]


def test_zoact_other_parameters_train_only_when_asked(task):
    model, *_ = prepared_zoact(task, train_other=True)
    roles = {b.role for b in model_blocks(model)}
    assert {"embed", "norm"} <= roles  # left trainable: the Gaussian noise moves them too
    assert all(not m.base.weight.requires_grad for m in model.modules() if isinstance(m, ActSubspaceLinear))


def test_zoact_user_errors(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, _ = scorer_and_batch(model, tokenizer, task)
    with pytest.raises(MetazoError, match="rank 65 is larger than the 64 inputs"):
        ZOActSampler(rank=65).prepare_model(model, calibrator(scorer, task.train, 4))
    with pytest.raises(MetazoError, match="rank must be an integer >= 1"):
        ZOActSampler(rank=0)
    with pytest.raises(MetazoError, match="train_other must be true or false"):
        ZOActSampler(train_other="maybe")
    with pytest.raises(MetazoError, match="no ZO-Act activation bases"):
        ZOActSampler.restore_model(model, {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 64)}, {})
    assert ZOActSampler.requires_mode == "full"


# ---------------------------------------------------------------------------------------- AR1-ZO

def lora_model(task, rank, alpha=16.0, targets=("attn_q", "mlp_up"), n=8):
    model, tokenizer = tiny("tiny-llama")
    torch.manual_seed(1)  # the same A initialisation wherever a test builds this model
    add_lora(model, rank=rank, alpha=alpha, targets=targets)
    scorer, batch = scorer_and_batch(model, tokenizer, task, n)
    return model, scorer, batch


def warm_up(model, rank, alpha=16.0, size=0.5):
    """B != 0, sized so (alpha/r) B A has the same spread at every rank (as in scripts/ar1_signal.py)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * size * math.sqrt(rank) / alpha)


def test_ar1_step_perturbs_and_updates_one_atom_only(task):
    rank = 4
    model, scorer, batch = lora_model(task, rank)
    warm_up(model, rank)
    sampler = AR1Sampler(schedule="permuted", seed=5)
    optimizer = ZeroOrderOptimizer(model_blocks(model), sampler, lr=1e-1, eps=1e-2, seed=3)
    for step in range(2 * rank):
        before = {b.name: b.param.detach().clone() for b in optimizer.blocks}
        seed = optimizer.direction_seed(step, 0)
        result = optimizer.step(lambda: scorer.loss(batch))
        k = sampler.atom(rank, step)
        for block in optimizer.blocks:
            moved = block.param.detach() - before[block.name]
            u = block_noise(sampler, block, seed)
            # The update is exactly -lr * c * u: the step's perturbation direction, seed-replayed.
            torch.testing.assert_close(moved, -0.1 * result.projected_grad * u, rtol=1e-4, atol=1e-6)
            if lora_factor(block) == "A":
                assert moved.abs().sum(1).nonzero().flatten().tolist() == [k]
                assert torch.count_nonzero(u[k]) == block.shape[1]
            else:
                assert moved.abs().sum(0).nonzero().flatten().tolist() == [k]
                assert torch.count_nonzero(u[:, k]) == block.shape[0]


def test_ar1_schedules_cover_every_atom_each_cycle():
    for schedule in ("cyclic", "permuted"):
        sampler = AR1Sampler(schedule=schedule, seed=1)
        for rank in (1, 4, 16):
            for cycle in range(3):
                atoms = [sampler.atom(rank, step) for step in range(cycle * rank, (cycle + 1) * rank)]
                assert sorted(atoms) == list(range(rank))
    cyclic, permuted = AR1Sampler(), AR1Sampler(schedule="permuted", seed=1)
    assert [cyclic.atom(16, s) for s in range(16)] == list(range(16))
    assert [permuted.atom(16, s) for s in range(48)] != [cyclic.atom(16, s) for s in range(48)]


def test_ar1_seed_replay_scale_and_modes(task):
    model, _, _ = lora_model(task, rank=4)
    blocks = model_blocks(model)
    sampler = AR1Sampler()
    sampler.bind(blocks, model)
    sampler.begin_step(2)
    a_block = next(b for b in blocks if lora_factor(b) == "A")
    b_block = next(b for b in blocks if lora_factor(b) == "B")
    assert torch.equal(block_noise(sampler, b_block, 11), block_noise(sampler, b_block, 11))
    assert not torch.equal(block_noise(sampler, b_block, 11), block_noise(sampler, b_block, 12))
    assert sampler.block_scale(b_block) == 4.0 and sampler.block_scale(a_block) == 1.0
    assert AR1Sampler(rescale="none").block_scale(b_block) == 1.0
    sampler.begin_step(3)  # another step, another atom
    assert torch.count_nonzero(block_noise(sampler, b_block, 11)[:, 2]) == 0
    assert AR1Sampler.requires_mode == "lora"
    full_model, _ = tiny("tiny-llama")
    with pytest.raises(MetazoError, match="pass --mode lora"):
        ZeroOrderOptimizer(full_model, AR1Sampler())
    with pytest.raises(MetazoError, match="unknown AR1-ZO schedule"):
        AR1Sampler(schedule="random")
    with pytest.raises(MetazoError, match="unknown AR1-ZO rescale"):
        AR1Sampler(rescale="sqrt")


def rms_projected_gradient(model, scorer, batch, sampler, directions, eps=1e-2):
    optimizer = ZeroOrderOptimizer(model_blocks(model), sampler, lr=0.0, eps=eps, seed=4, model=model)
    squares = [optimizer.estimate(lambda: scorer.loss(batch), step=s)[0].projected_grad ** 2 for s in range(directions)]
    return math.sqrt(sum(squares) / len(squares))


def test_ar1_signal_does_not_fade_with_rank_while_all_atom_signal_does(task):
    """Signal = rms of c over directions. At LoRA's start (B = 0), c = s b^T G A_k^T for atom k, so
    E[c^2] = r |g_B|^2 with B's noise x r, |g_B|^2 / r without, and |g_B|^2 for the all-atom query,
    where |g_B|^2 = s^2 sum_k |G A_k^T|^2 ~ alpha^2 / r. Hence AR1-ZO / all-atom = sqrt(r) at every
    rank whatever A is, AR1-ZO is flat in r, all-atom falls as 1/sqrt(r), unrescaled AR1 as 1/r.
    Across ranks A's random draw adds spread (at rank 4, four rows of A decide |g_B|), so the bands
    there are wide; the within-rank ratio is the sharp check."""
    signal = {}
    for rank in (4, 64):
        model, scorer, batch = lora_model(task, rank)
        for label, sampler in (("ar1", AR1Sampler()), ("ar1-none", AR1Sampler(rescale="none")),
                               ("all-atom", GaussianSampler())):
            signal[label, rank] = rms_projected_gradient(model, scorer, batch, sampler, directions=32)
        assert 0.6 < signal["ar1", rank] / signal["all-atom", rank] / math.sqrt(rank) < 1.5
    growth = {label: signal[label, 64] / signal[label, 4] for label in ("ar1", "ar1-none", "all-atom")}
    assert 0.5 < growth["ar1"] < 2.5                 # flat (1 expected)
    assert growth["all-atom"] < 0.6                  # 1/sqrt(16) = 0.25 expected
    assert growth["ar1-none"] < 0.2                  # 1/16 expected
    assert signal["ar1", 64] > 4 * signal["all-atom", 64]


def test_ar1_mean_estimate_matches_its_derived_expectation(task):
    """Over whole cycles E[c u] = (1/r) diag(scale^2) g = r g_B + g_A / r, so the estimate's projection
    on the true gradient, <g_hat, g>, should be r |g_B|^2 + |g_A|^2 / r; with rank 4 and 24 queries per
    atom the sample mean is within about 15% (one standard deviation) of it."""
    rank = 4
    model, scorer, batch = lora_model(task, rank)
    warm_up(model, rank)  # B != 0, so the A's have a gradient too
    blocks = model_blocks(model)
    sampler = AR1Sampler()
    grad = true_gradient(blocks, lambda: scorer.loss(batch))
    optimizer = ZeroOrderOptimizer(blocks, sampler, lr=0.0, eps=1e-3, seed=6)
    directions = 24 * rank
    mean = {b.name: torch.zeros(b.shape) for b in blocks}
    for step in range(directions):
        (estimate,) = optimizer.estimate(lambda: scorer.loss(batch), step=step)
        for block in blocks:
            mean[block.name].add_(block_noise(sampler, block, estimate.seed), alpha=estimate.projected_grad / directions)
    norm2 = {f: sum(float(grad[b.name].pow(2).sum()) for b in blocks if lora_factor(b) == f) for f in "AB"}
    assert norm2["A"] > 0 and norm2["B"] > 0
    projection = sum(float((mean[n] * grad[n]).sum()) for n in grad)
    expected = rank * norm2["B"] + norm2["A"] / rank
    assert 0.6 < projection / expected < 1.4
    assert cosine(mean, grad) > 0.1


def test_ar1_query_at_rank_r_equals_a_rank_1_adapter_with_the_same_alpha(task):
    """Why the factor is r: with B = 0, perturbing atom k of a rank-r adapter with B's noise x r gives
    (alpha/r) (r eps b)(A_k + eps a)^T = alpha (eps b)(A_k + eps a)^T, exactly the query of a rank-1
    adapter holding row A_k. The noise streams match too (same blocks, same chunk seeds)."""
    rank, step = 4, 2
    model, scorer, batch = lora_model(task, rank)
    single, single_scorer, _ = lora_model(task, 1)
    k = AR1Sampler().atom(rank, step)
    with torch.no_grad():
        for name, param in single.named_parameters():
            if name.endswith("lora_A"):
                param.copy_(model.get_parameter(name)[k:k + 1])
    results = []
    for m, sc in ((model, scorer), (single, single_scorer)):
        optimizer = ZeroOrderOptimizer(model_blocks(m), AR1Sampler(), lr=0.0, eps=1e-2, seed=8)
        results.append(optimizer.estimate(lambda: sc.loss(batch), step=step)[0])
    assert results[0].loss_plus != results[0].loss_minus
    assert results[0].projected_grad == pytest.approx(results[1].projected_grad, rel=1e-3)
