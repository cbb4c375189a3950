"""The ZO engine against plain reference implementations, and its exactness guarantees."""


import pytest
import torch

from conftest import scorer_and_batch, tiny
from metazo.blocks import model_blocks
from metazo.engine import NonFiniteLossError, PerturbedView, ZeroOrderOptimizer, scheduled_lr
from metazo.errors import MetazoError
from metazo.lora import add_lora
from metazo.samplers import GaussianSampler, RademacherSampler, base, block_noise, row_noise
from metazo.scoring import Scorer




def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_lr_zero_step_leaves_weights_bitwise_identical(task, dtype):
    model, tokenizer = tiny("tiny-llama", dtype)
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    before = snapshot(model)
    optimizer = ZeroOrderOptimizer(model, "gaussian", lr=0.0, eps=1e-3, num_directions=2)
    for _ in range(3):
        result = optimizer.step(lambda: scorer.loss(batch))
        assert result.loss_plus != result.loss_minus  # the perturbation really changed the model
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_mezo_in_place_round_trip_drifts_in_bf16():
    """Why the engine never writes theta while scoring: MeZO's +eps, -2eps, +eps does not restore it."""
    torch.manual_seed(0)
    theta = torch.randn(4096).to(torch.bfloat16)
    z = torch.randn(4096).to(torch.bfloat16)
    walked = theta.clone()
    for scale in (1e-3, -2e-3, 1e-3):
        walked.add_(z, alpha=scale)
    assert not torch.equal(walked, theta)


def naive_mezo_step(model, loss_fn, blocks, seeds, lr, eps, weight_decay=0.0, sampler=None):
    """MeZO written out: explicit z per tensor, theta +/- eps z on copies, theta -= lr (mean_j g_j z_j + wd theta)."""
    sampler = sampler or GaussianSampler()
    theta = {b.name: b.param.detach().clone() for b in blocks}
    grads = []
    for seed in seeds:
        z = {b.name: block_noise(sampler, b, seed) for b in blocks}
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for b in blocks:
                    b.param.copy_(torch.add(theta[b.name], z[b.name], alpha=sign * eps))
                losses.append(float(loss_fn()))
        grads.append(((losses[0] - losses[1]) / (2 * eps), z))
    with torch.no_grad():
        for b in blocks:
            direction = sum(g * z[b.name] for g, z in grads) / len(grads)
            decay = weight_decay * theta[b.name] if b.decays else 0.0
            b.param.copy_(theta[b.name] - lr * (direction + decay))
    return [g for g, _ in grads]


@pytest.mark.parametrize("num_directions,weight_decay", [(1, 0.0), (3, 0.1)])
def test_gaussian_step_equals_naive_mezo(task, num_directions, weight_decay):
    model, tokenizer = tiny("tiny-llama")
    reference, _ = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    ref_scorer, ref_batch = scorer_and_batch(reference, tokenizer, task)
    optimizer = ZeroOrderOptimizer(model, "gaussian", lr=1e-2, eps=1e-3, num_directions=num_directions,
                                   weight_decay=weight_decay, seed=7)
    ref_blocks = model_blocks(reference)
    initial = snapshot(model)
    for step in range(3):
        # Each step starts both from the same weights: (L+ - L-) / 2eps amplifies any earlier
        # rounding difference 500-fold, which would test float chaos instead of the step.
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                q.copy_(p)
        result = optimizer.step(lambda: scorer.loss(batch))
        seeds = [optimizer.direction_seed(step, j) for j in range(num_directions)]
        ref_grads = naive_mezo_step(reference, lambda: ref_scorer.loss(ref_batch), ref_blocks, seeds,
                                    lr=1e-2, eps=1e-3, weight_decay=weight_decay)
        assert result.projected_grad == pytest.approx(sum(ref_grads) / len(ref_grads), rel=1e-6)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    moved = sum(not torch.equal(p, initial[name]) for name, p in model.named_parameters())
    assert moved == len(initial)  # every tensor took the steps


def test_weight_decay_skips_norms_and_biases(task):
    model, tokenizer = tiny("tiny-opt")
    before = snapshot(model)
    blocks = model_blocks(model)
    optimizer = ZeroOrderOptimizer(blocks, "gaussian", lr=1.0, weight_decay=0.5)
    optimizer.update([], lr=1.0)  # no directions: only decay acts
    for block in blocks:
        changed = not torch.equal(block.param, before[block.name])
        assert changed == block.decays, block.name
    assert any(b.decays for b in blocks) and any(not b.decays for b in blocks)


def test_perturbed_view_matches_explicit_perturbation_with_many_chunks(task, monkeypatch):
    """Chunked noise, row gathers of the embedding and the head rows all give theta + eps z exactly."""
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1000)  # force many chunks per tensor
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    blocks = model_blocks(model)
    sampler = GaussianSampler()
    seed, eps = 123, 1e-2
    with torch.inference_mode(), PerturbedView(blocks, sampler, seed, eps):
        viewed = scorer.label_logits(batch)
    explicit_model, _ = tiny("tiny-llama")
    with torch.no_grad():
        for b, e in zip(blocks, model_blocks(explicit_model)):
            e.param.add_(block_noise(sampler, b, seed), alpha=eps)
    explicit = Scorer(explicit_model, tokenizer, scorer.label_ids.tolist()).label_logits(batch)
    torch.testing.assert_close(viewed, explicit.detach(), rtol=1e-5, atol=1e-5)
    embed = next(b for b in blocks if b.role == "embed")
    rows = torch.tensor([5, 0, 4000, 5, embed.shape[0] - 1])
    torch.testing.assert_close(row_noise(sampler, embed, seed, rows), block_noise(sampler, embed, seed)[rows])


def test_seed_replay_and_noise_statistics(task):
    model, _ = tiny("tiny-llama")
    block = max(model_blocks(model), key=lambda b: b.numel)
    gaussian = GaussianSampler()
    z1, z2 = block_noise(gaussian, block, 5), block_noise(gaussian, block, 5)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, block_noise(gaussian, block, 6))
    assert abs(float(z1.mean())) < 0.01 and abs(float(z1.var()) - 1) < 0.02
    r = block_noise(RademacherSampler(), block, 5)
    assert set(r.unique().tolist()) == {-1.0, 1.0}


def test_state_dict_round_trip_continues_identically(task):
    model_a, tokenizer = tiny("tiny-llama")
    model_b, _ = tiny("tiny-llama")
    scorer_a, batch = scorer_and_batch(model_a, tokenizer, task)
    scorer_b, _ = scorer_and_batch(model_b, tokenizer, task)
    opt_a = ZeroOrderOptimizer(model_a, lr=1e-2, seed=3, schedule="linear", total_steps=10)
    for _ in range(2):
        opt_a.step(lambda: scorer_a.loss(batch))
    with torch.no_grad():
        for p, q in zip(model_b.parameters(), model_a.parameters()):
            p.copy_(q)
    opt_b = ZeroOrderOptimizer(model_b, lr=999.0, seed=0)
    opt_b.load_state_dict(opt_a.state_dict())
    ra, rb = opt_a.step(lambda: scorer_a.loss(batch)), opt_b.step(lambda: scorer_b.loss(batch))
    assert ra == rb
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(MetazoError, match="rademacher"):
        ZeroOrderOptimizer(model_b, "gaussian").load_state_dict(ZeroOrderOptimizer(model_b, "rademacher").state_dict())


def test_non_finite_losses_are_skipped_then_stop_the_run(task):
    model, _ = tiny("tiny-llama")
    before = snapshot(model)
    optimizer = ZeroOrderOptimizer(model, lr=1.0, max_nonfinite=3)
    for _ in range(2):
        assert optimizer.step(lambda: torch.tensor(float("nan"))).skipped
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        optimizer.step(lambda: torch.tensor(float("inf")))
    assert optimizer.nonfinite_total == 3


def test_loss_falls_on_a_fixed_batch(task):
    model, tokenizer = tiny("tiny-qwen2")
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=16)
    optimizer = ZeroOrderOptimizer(model, lr=5e-3, eps=1e-3, num_directions=4, seed=1)
    start = float(scorer.loss(batch).detach())
    for _ in range(40):
        optimizer.step(lambda: scorer.loss(batch))
    assert float(scorer.loss(batch).detach()) < start - 0.05


def test_lora_mode_trains_adapters_only_and_starts_at_the_base_model(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    with torch.no_grad():
        base_logits = scorer.label_logits(batch)
    n = add_lora(model, rank=4, alpha=8)
    assert n == 2 * model.config.num_hidden_layers  # q and v in every layer
    blocks = model_blocks(model)
    assert blocks and all(".lora_" in b.name for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(scorer.label_logits(batch), base_logits)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = ZeroOrderOptimizer(blocks, lr=1e-1, eps=1e-2)
    optimizer.step(lambda: scorer.loss(batch))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.all(b.param == 0) for b in blocks if b.name.endswith("lora_B"))


def test_schedules_and_bad_settings():
    assert scheduled_lr(1.0, 0, 10, "linear") == 1.0
    assert scheduled_lr(1.0, 5, 10, "linear") == pytest.approx(0.5)
    assert scheduled_lr(1.0, 5, 10, "cosine") == pytest.approx(0.5)
    assert scheduled_lr(1.0, 10, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(1.0, 7, 10, "constant") == 1.0
    with pytest.raises(MetazoError, match="unknown lr schedule"):
        scheduled_lr(1.0, 0, 10, "step")
    model, _ = tiny("tiny-llama")
    with pytest.raises(MetazoError, match="unknown sampler 'nope'"):
        ZeroOrderOptimizer(model, "nope")
    with pytest.raises(MetazoError, match="eps must be positive"):
        ZeroOrderOptimizer(model, eps=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(MetazoError, match="nothing to train"):
        ZeroOrderOptimizer(model)
