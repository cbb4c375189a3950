"""LoZO's low-rank sampler and AGZO: structure of the directions, seed replay, and estimator quality
against the exact gradient from autograd."""

import math

import pytest
import torch
from torch import nn

from conftest import scorer_and_batch, tiny
from metazo.blocks import model_blocks
from metazo.diagnostics import cosine, true_gradient
from metazo.engine import ZeroOrderOptimizer
from metazo.errors import MetazoError
from metazo.samplers import GaussianSampler, base, block_noise, row_noise
from metazo.samplers.agzo import AGZOSampler
from metazo.samplers.lowrank import LowRankSampler




def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def block_named(blocks, fragment):
    return next(b for b in blocks if fragment in b.name)


def projector(basis):
    """Orthogonal projector onto the column space of ``basis``."""
    q = torch.linalg.qr(basis.double()).Q
    return q @ q.T


# --- LoZO ---------------------------------------------------------------------------------------


def test_lowrank_directions_have_rank_r_and_vectors_are_gaussian():
    model, _ = tiny("tiny-llama")
    blocks = model_blocks(model)
    sampler = LowRankSampler(rank=3, resample_every=10)
    sampler.bind(blocks, model)
    sampler.begin_step(0)
    for block in blocks:
        z = block_noise(sampler, block, seed=11)
        if block.param.dim() == 2:  # projections, the embedding table and the head alike
            assert int(torch.linalg.matrix_rank(z)) == 3, block.name
            residual = z.double() - z.double() @ projector(sampler.column_factor(block))
            assert float(residual.abs().max()) < 1e-4 * float(z.abs().max()), block.name  # rows in span(V)
        else:  # norms: MeZO's noise, draw for draw
            assert torch.equal(z, block_noise(GaussianSampler(), block, seed=11)), block.name


def test_lowrank_column_factor_is_kept_for_a_period_and_replaced_at_its_end():
    model, _ = tiny("tiny-llama")
    block = block_named(model_blocks(model), "layers.1.mlp.up_proj")
    sampler = LowRankSampler(rank=2, resample_every=5, seed=4)
    sampler.bind(model_blocks(model), model)
    factors = []
    for step in range(11):
        sampler.begin_step(step)
        factors.append(sampler.column_factor(block).clone())
    assert all(torch.equal(factors[0], f) for f in factors[1:5])
    assert all(torch.equal(factors[5], f) for f in factors[6:10])
    assert not torch.equal(factors[4], factors[5]) and not torch.equal(factors[9], factors[10])
    # Within a period two steps' directions differ (new U) but share their row space (same V).
    sampler.begin_step(5)
    first = block_noise(sampler, block, seed=1)
    sampler.begin_step(6)
    second = block_noise(sampler, block, seed=2)
    assert not torch.equal(first, second)
    torch.testing.assert_close(second.double() @ projector(first.T), second.double(), atol=1e-4, rtol=0)


def test_lowrank_seed_replay_with_many_chunks(monkeypatch):
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1000)  # every matrix spans several chunks
    model, _ = tiny("tiny-llama")
    blocks = model_blocks(model)
    first, again, other = LowRankSampler(seed=3), LowRankSampler(seed=3), LowRankSampler(seed=4)
    for sampler in (first, again, other):
        sampler.bind(blocks, model)
        sampler.begin_step(120)
    for fragment in ("embed_tokens", "layers.0.mlp.down_proj", "lm_head", "layers.2.input_layernorm"):
        block = block_named(blocks, fragment)
        z = block_noise(first, block, seed=9)
        assert torch.equal(z, block_noise(again, block, seed=9)), fragment
        if block.param.dim() == 2:
            assert not torch.equal(z, block_noise(other, block, seed=9)), fragment  # another V
            assert int(torch.linalg.matrix_rank(z)) == 2, fragment  # chunked U rows still one U
            rows = torch.tensor([0, 17, 3, 17, block.shape[0] - 1])
            assert torch.equal(row_noise(first, block, 9, rows), z[rows]), fragment
    state = first.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    restored = LowRankSampler(rank=5, resample_every=1, seed=99)
    restored.load_state_dict(state)
    restored.bind(blocks, model)
    restored.begin_step(120)
    block = block_named(blocks, "layers.0.self_attn.q_proj")
    assert torch.equal(block_noise(restored, block, 9), block_noise(first, block, 9))


def test_lowrank_second_moment_per_entry_is_one_like_mezo():
    model, _ = tiny("tiny-llama")
    blocks = model_blocks(model)
    block = block_named(blocks, "layers.0.mlp.up_proj")  # 128 x 64
    fresh_v = LowRankSampler(rank=2, resample_every=1)
    fixed_v = LowRankSampler(rank=2, resample_every=10**9)
    for sampler in (fresh_v, fixed_v):
        sampler.bind(blocks, model)
    squares_fresh = torch.zeros(block.shape)
    squares_fixed = torch.zeros(block.shape)
    draws = 400
    for step in range(draws):
        for sampler, squares in ((fresh_v, squares_fresh), (fixed_v, squares_fixed)):
            sampler.begin_step(step)
            squares += block_noise(sampler, block, seed=step).pow(2)
    # Over U and V: E[u_ij^2] = (1/r) sum_k E[U_ik^2] E[V_jk^2] = 1, MeZO's.
    assert float(squares_fresh.mean()) / draws == pytest.approx(1.0, abs=0.05)
    # V held: E_U[u_ij^2] = ||V_j||^2 / r for column j.
    v = fixed_v.column_factor(block)
    torch.testing.assert_close(squares_fixed.mean(0) / draws, v.pow(2).sum(1) / 2, rtol=0.05, atol=0)


@pytest.mark.parametrize("sampler_class", [LowRankSampler, AGZOSampler])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lr_zero_step_leaves_weights_bitwise_identical(task, sampler_class, dtype):
    model, tokenizer = tiny("tiny-llama", dtype)
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    before = snapshot(model)
    optimizer = ZeroOrderOptimizer(model, sampler_class(), lr=0.0, eps=1e-2, num_directions=2)
    for _ in range(3):
        result = optimizer.step(lambda: scorer.loss(batch))
        assert result.loss_plus != result.loss_minus
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_lowrank_rank_larger_than_a_matrix_is_one_clear_error():
    model, _ = tiny("tiny-llama")
    with pytest.raises(MetazoError, match=r"rank 33 is larger than .* 32 of block model\.layers\.0\.self_attn\.k_proj"):
        ZeroOrderOptimizer(model, LowRankSampler(rank=33))
    with pytest.raises(MetazoError, match="rank must be >= 1"):
        LowRankSampler(rank=0)


# --- AGZO ---------------------------------------------------------------------------------------


def agzo_after_base_pass(model, scorer, batch, step=0, **options):
    sampler = AGZOSampler(**options)
    optimizer = ZeroOrderOptimizer(model_blocks(model), sampler, model=model)
    sampler.begin_step(step)
    with torch.inference_mode(), sampler.base_pass():
        scorer.loss(batch)
    return sampler, optimizer


def linear_inputs(model, run):
    """{module: inputs (tokens x d_in)} of every nn.Linear while ``run()`` runs."""
    captured = {}

    def hook(module, args):
        captured.setdefault(module, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {module: torch.cat(parts) for module, parts in captured.items()}


def test_agzo_hooks_linear_layers_only_and_needs_the_model(task):
    model, _ = tiny("tiny-llama")
    blocks = model_blocks(model)
    sampler = AGZOSampler()
    sampler.bind(blocks, model)
    roles = {block.role for _, block in sampler.hooked}
    assert len(sampler.hooked) == 7 * 3 and roles <= {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_gate", "mlp_down"}
    opt_model, _ = tiny("tiny-opt")  # tied head: the embedding table is not hooked, biases are not
    opt_sampler = AGZOSampler()
    opt_sampler.bind(model_blocks(opt_model), opt_model)
    assert all(b.param.dim() == 2 and b.role not in ("embed", "head") for _, b in opt_sampler.hooked)
    with pytest.raises(MetazoError, match="pass model="):
        ZeroOrderOptimizer(blocks, AGZOSampler())
    gpt2, _ = tiny("tiny-gpt2")
    with pytest.raises(MetazoError, match="no nn.Linear"):
        ZeroOrderOptimizer(gpt2, AGZOSampler())
    with pytest.raises(MetazoError, match="rank 65 is larger than the input size 64"):
        ZeroOrderOptimizer(model, AGZOSampler(rank=65))


def test_agzo_directions_lie_in_the_span_of_the_layer_inputs(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=1)  # one short prompt: H has rank < d_in
    inputs = linear_inputs(model, lambda: scorer.loss(batch))
    sampler, _ = agzo_after_base_pass(model, scorer, batch, rank=2)
    for module, block in sampler.hooked:
        h = inputs[module].double()
        assert int(torch.linalg.matrix_rank(h)) < h.shape[1]  # the check below is not trivial
        delta = block_noise(sampler, block, seed=5)
        assert int(torch.linalg.matrix_rank(delta)) == 2
        delta = delta.double()
        in_span = delta @ projector(h.T)
        assert float((delta - in_span).norm()) < 1e-4 * float(delta.norm()), block.name


def test_agzo_basis_is_the_top_singular_subspace_of_the_inputs(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    inputs = linear_inputs(model, lambda: scorer.loss(batch))
    # A random tiny model has small spectral gaps (about 1.2), so take enough rounds to converge.
    sampler, _ = agzo_after_base_pass(model, scorer, batch, rank=1, power_iterations=40)
    for module, block in sampler.hooked:
        top = torch.linalg.svd(inputs[module], full_matrices=False).Vh[0]
        assert abs(float(sampler.basis(block)[:, 0] @ top)) > 0.99, block.name


def test_agzo_micro_batched_base_pass_keeps_a_good_basis(task):
    """A scorer that splits the batch calls each layer several times; the streamed basis must still
    capture most of the energy the best rank-r basis of the whole batch captures."""
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task, micro_batch_size=2)
    inputs = linear_inputs(model, lambda: scorer.loss(batch))
    sampler, _ = agzo_after_base_pass(model, scorer, batch, rank=2)
    captured = []
    for module, block in sampler.hooked:
        a, h = sampler.basis(block), inputs[module]
        torch.testing.assert_close(a.T @ a, torch.eye(2), atol=1e-5, rtol=0)
        best = torch.linalg.svdvals(h)[:2].pow(2).sum()
        captured.append(float((h @ a).pow(2).sum() / best))
    assert min(captured) > 0.6 and sum(captured) / len(captured) > 0.85


def test_agzo_keeps_no_activations_and_removes_its_hooks(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    modules = list(model.modules())
    assert not any(m._forward_pre_hooks for m in modules)
    sampler = AGZOSampler(rank=2)
    optimizer = ZeroOrderOptimizer(model, sampler, num_directions=1)
    hooks_seen = []

    def closure():
        hooks_seen.append(sum(len(m._forward_pre_hooks) for m in modules))
        return scorer.loss(batch)

    optimizer.step(closure)
    assert hooks_seen == [21, 0]  # hooks during the base pass only; one base + one perturbed forward
    assert not any(m._forward_pre_hooks for m in modules)

    # Only A (d_in x r) and r singular values per layer survive; the inputs (tokens x d_in) do not.
    held = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            held.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item)

    walk({k: v for k, v in vars(sampler).items() if k not in ("blocks", "model", "hooked")})
    expected = sum(block.shape[1] * 2 + 2 for _, block in sampler.hooked)
    assert held and sum(t.numel() for t in held) == expected
    assert max(t.numel() for t in held) == 128 * 2  # down_proj's input size times the rank
    tokens = int(batch.attention_mask.numel())
    assert tokens > 2 * 2  # a kept input would be tokens x d_in, larger than any of the above

    # An exception inside the base pass still takes the hooks off.
    sampler.begin_step(1)
    with pytest.raises(ValueError), sampler.base_pass():
        scorer.loss(batch)
        raise ValueError("scoring failed")
    assert not any(m._forward_pre_hooks for m in modules)


def test_agzo_closure_calls_per_step(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=4)
    calls = []
    for q in (1, 3):
        optimizer = ZeroOrderOptimizer(model, AGZOSampler(), num_directions=q, lr=0.0)
        calls.clear()
        optimizer.step(lambda: calls.append(1) or scorer.loss(batch))
        assert len(calls) == q + 1


def test_agzo_noise_without_this_steps_base_pass_raises(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=4)
    blocks = model_blocks(model)
    sampler = AGZOSampler()
    ZeroOrderOptimizer(blocks, sampler, model=model)
    hooked = sampler.hooked[0][1]
    norm = block_named(blocks, "input_layernorm")
    sampler.begin_step(0)
    with pytest.raises(RuntimeError, match="before this step's base pass"):
        block_noise(sampler, hooked, seed=1)
    assert block_noise(sampler, norm, seed=1).shape == norm.shape  # Gaussian blocks need no basis
    with torch.inference_mode(), sampler.base_pass():
        scorer.loss(batch)
    block_noise(sampler, hooked, seed=1)
    sampler.begin_step(1)  # the last step's basis is stale now
    with pytest.raises(RuntimeError, match="before this step's base pass"):
        block_noise(sampler, hooked, seed=1)


def test_agzo_seed_replay_with_many_chunks(task, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1000)
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=4)
    first, _ = agzo_after_base_pass(model, scorer, batch, step=3, seed=8)
    again, _ = agzo_after_base_pass(model, scorer, batch, step=3, seed=8)
    other_start, _ = agzo_after_base_pass(model, scorer, batch, step=4, seed=8)
    for _, block in first.hooked:
        z = block_noise(first, block, seed=21)
        assert torch.equal(z, block_noise(again, block, seed=21)), block.name
        assert torch.equal(first.basis(block), again.basis(block))
        rows = torch.tensor([1, 0, 30, 1, block.shape[0] - 1])
        assert torch.equal(row_noise(first, block, 21, rows), z[rows]), block.name
    # Another step starts its power iteration elsewhere: another (nearby) basis, as documented.
    assert any(not torch.equal(first.basis(b), other_start.basis(b)) for _, b in first.hooked)
    state = first.state_dict()
    assert state == {"rank": 1, "power_iterations": 3, "match_mezo_norm": True, "seed": 8}


def test_agzo_step_changes_each_linear_layer_by_a_rank_r_update_in_its_basis(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    sampler = AGZOSampler(rank=2)
    optimizer = ZeroOrderOptimizer(model, sampler, lr=1e-2, eps=1e-3)
    before = snapshot(model)
    result = optimizer.step(lambda: scorer.loss(batch))
    assert not result.skipped and result.projected_grad != 0
    for _, block in sampler.hooked:
        change = (block.param.detach() - before[block.name]).double()
        assert int(torch.linalg.matrix_rank(change, rtol=1e-3)) == 2, block.name
        residual = change - change @ projector(sampler.basis(block))
        assert float(residual.norm()) < 1e-3 * float(change.norm()), block.name


# --- estimator quality against the exact gradient ------------------------------------------------
#
# With eps -> 0 a step's estimate is c u with c = <g, u>. Write every sampler's u as u = M z with z
# ~ N(0, I_D) (D = dimension of the sampler's subspace): Gaussian M = I; LoZO with V fixed, per
# matrix z = U (d_out x r) and M z = z V^T / sqrt(r); AGZO per linear layer z = R and M z = s R A^T
# (s = sqrt(d_in / r) when matching MeZO's norm); norm blocks M = I. Then c = <b, z> with b = M^T g,
# and E[c u] = M b ("target": LoZO G V V^T / r, AGZO s^2 G A A^T, plain g elsewhere).
# Cov((b.z) z) = ||b||^2 I + b b^T, so the mean of N independent estimates has
#     E||mean - target||^2 = (||b||^2 tr(M^T M) + ||M b||^2) / N
# (AGZO: A changes a little between steps, so average these per-step quantities over the steps).
# Hence the expected cosine(mean, target) = ||target|| / sqrt(||target||^2 + that), and
# ||mean|| / ||target|| = sqrt(1 + that / ||target||^2). A random direction of the subspace has
# cosine about 1/sqrt(D) with the target, so the measured cosine must also clear 5/sqrt(D).

N_ESTIMATES = 200


@pytest.fixture(scope="module")
def gradient_setup(task):
    model, tokenizer = tiny("tiny-llama")
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    blocks = [b for b in model_blocks(model) if b.role not in ("embed", "head")]  # about 1.1e5 entries
    closure = lambda: scorer.loss(batch)  # noqa: E731
    return model, blocks, closure, true_gradient(blocks, closure)


def squared_norm(tensors):
    return sum(float(t.double().pow(2).sum()) for t in tensors.values())


def measure_estimator(sampler, model, blocks, closure, gradient, eps=1e-3):
    """(mean estimate, target, predicted E||mean - target||^2, subspace dimension D) over N_ESTIMATES steps."""
    optimizer = ZeroOrderOptimizer(blocks, sampler, eps=eps, model=model)
    total = {b.name: torch.zeros(b.shape) for b in blocks}
    target = {b.name: torch.zeros(b.shape) for b in blocks}
    noise_energy, dimension = 0.0, 0
    for step in range(N_ESTIMATES):
        (estimate,) = optimizer.estimate(closure, step=step)
        b_squared, trace, step_target, dimension = 0.0, 0.0, {}, 0
        for block in blocks:
            total[block.name] += block_noise(sampler, block, estimate.seed) * estimate.projected_grad
            g = gradient[block.name]
            if isinstance(sampler, LowRankSampler) and g.dim() == 2:
                v, r = sampler.column_factor(block).double(), sampler.rank
                b_squared += float((g.double() @ v).pow(2).sum()) / r
                trace += block.shape[0] * float(v.pow(2).sum()) / r
                step_target[block.name] = (g.double() @ v @ v.T / r).float()
                dimension += block.shape[0] * r
            elif isinstance(sampler, AGZOSampler) and sampler.basis(block) is not None:
                a = sampler.basis(block).double()
                s2 = a.shape[0] / a.shape[1]
                b_squared += s2 * float((g.double() @ a).pow(2).sum())
                trace += s2 * block.shape[0] * a.shape[1]
                step_target[block.name] = (s2 * g.double() @ a @ a.T).float()
                dimension += block.shape[0] * a.shape[1]
            else:
                b_squared += float(g.double().pow(2).sum())
                trace += g.numel()
                step_target[block.name] = g
                dimension += g.numel()
            target[block.name] += step_target[block.name]
        noise_energy += b_squared * trace + squared_norm(step_target)
    mean = {k: v / N_ESTIMATES for k, v in total.items()}
    target = {k: v / N_ESTIMATES for k, v in target.items()}
    return mean, target, noise_energy / N_ESTIMATES**2, dimension


def check_against_prediction(mean, target, noise_energy, dimension):
    target_sq = squared_norm(target)
    predicted_cosine = math.sqrt(target_sq / (target_sq + noise_energy))
    predicted_ratio = math.sqrt(1 + noise_energy / target_sq)
    measured_cosine = cosine(mean, target)
    measured_ratio = math.sqrt(squared_norm(mean) / target_sq)
    assert measured_cosine > 5 / math.sqrt(dimension)
    # Bands: sum of N c^2 terms fluctuates by about sqrt(2/N) = 10% (1 sigma) in energy.
    assert 0.7 * predicted_cosine < measured_cosine < 1.3 * predicted_cosine
    assert 0.75 * predicted_ratio < measured_ratio < 1.33 * predicted_ratio
    return measured_cosine


def test_lowrank_estimate_concentrates_on_the_gradient_in_span_v(gradient_setup):
    model, blocks, closure, gradient = gradient_setup
    sampler = LowRankSampler(rank=2, resample_every=10**9)  # one V for all N estimates
    mean, target, noise_energy, dimension = measure_estimator(sampler, model, blocks, closure, gradient)
    measured = check_against_prediction(mean, target, noise_energy, dimension)
    assert measured > 0.15  # about 0.24 measured; D is about 3.5e3
    # The unbiased target differs from the projection G P_V only by V^T V / r != (d_in / r) I.
    projected = {
        b.name: gradient[b.name] @ projector(sampler.column_factor(b)).float() if b.param.dim() == 2 else gradient[b.name]
        for b in blocks
    }
    assert cosine(mean, projected) > 0.7 * measured


def test_agzo_estimate_concentrates_on_the_gradient_in_the_activation_span(gradient_setup):
    model, blocks, closure, gradient = gradient_setup
    sampler = AGZOSampler(rank=1)
    mean, target, noise_energy, dimension = measure_estimator(sampler, model, blocks, closure, gradient)
    check_against_prediction(mean, target, noise_energy, dimension)

    # The paper's claim: at the same number of directions AGZO's estimate is better aligned with the
    # true gradient than MeZO's, because G's rows lie in the span of the activations.
    gaussian_mean, _, _, _ = measure_estimator(GaussianSampler(), model, blocks, closure, gradient)
    agzo_cosine, gaussian_cosine = cosine(mean, gradient), cosine(gaussian_mean, gradient)
    assert agzo_cosine > 2 * gaussian_cosine  # measured about 0.16 vs 0.044 on tiny-llama
