"""Meta-training: the lookahead objective (against finite differences and its expectation), the
trajectory and resets, the command end to end, and its bad inputs."""

import json

import pytest
import torch

from conftest import scorer_and_batch, tiny
from metazo.blocks import model_blocks
from metazo.cli import main
from metazo.diagnostics import expected_cosine, true_gradient
from metazo.errors import MetazoError
from metazo.meta import (
    MetaTrainConfig, MetaTrainer, NonFiniteMetaLossError, loss_at, lookahead_parameters, parse_mixture,
)
from metazo.meta.mixture import MixtureEntry, task_for_step
from metazo.policy import PerturbationPolicy, normalizer
from metazo.samplers import GaussianSampler, block_noise
from metazo.tasks import get_task


def float64_tiny(task):
    # GPT-2: its layers compute in the model's dtype throughout (Llama's norms and eager softmax round to
    # float32 inside a float64 model, which finite differences would see as noise).
    model, tokenizer = tiny("tiny-gpt2")
    model.double()
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=4)
    return model, scorer, batch


def test_lookahead_is_theta_minus_step_along_the_scaled_direction(task):
    model, scorer, batch = float64_tiny(task)
    blocks = model_blocks(model)
    scales = torch.rand(len(blocks), dtype=torch.float64) + 0.5
    steps = [(11, 0.3), (12, -0.1)]
    params = lookahead_parameters(blocks, [(seed, a, scales) for seed, a in steps])
    for i, block in enumerate(blocks):
        expected = block.param.detach() - scales[i] * sum(a * block_noise(GaussianSampler(), block, seed).double()
                                                          for seed, a in steps)
        torch.testing.assert_close(params[block.name], expected, rtol=1e-12, atol=1e-12)
    before = {b.name: b.param.detach().clone() for b in blocks}
    loss_at(scorer, params, batch)
    assert all(torch.equal(b.param, before[b.name]) for b in blocks)  # functional: the model is untouched


def test_lookahead_gradient_matches_finite_differences(task):
    """d L(theta') / d scales and d L(theta') / d policy weights, autograd against central differences (float64)."""
    model, scorer, batch = float64_tiny(task)
    blocks = model_blocks(model)
    def meta_loss(scales):
        return loss_at(scorer, lookahead_parameters(blocks, [(5, 2e-3, scales)]), batch)

    scales = torch.rand(len(blocks), dtype=torch.float64) + 0.5
    scales.requires_grad_(True)
    (grad,) = torch.autograd.grad(meta_loss(scales), [scales])
    h = 1e-4
    for i in (0, 1, 5, len(blocks) - 1):
        up, down = scales.detach().clone(), scales.detach().clone()
        up[i] += h
        down[i] -= h
        numeric = (float(meta_loss(up)) - float(meta_loss(down))) / (2 * h)
        assert grad[i].item() == pytest.approx(numeric, rel=1e-5, abs=1e-10), blocks[i].name

    # Through the policy: sigma -> nf * sigma -> theta' -> loss.
    policy = PerturbationPolicy.for_blocks(blocks).double()
    with torch.no_grad():
        policy.w2.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    index, _ = policy.assign(blocks)
    features = torch.randn(len(blocks), policy.w1.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    numels = torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)

    def policy_loss():
        sigma = policy(features, index)
        return meta_loss(sigma * normalizer(sigma, numels))

    (grad_b2,) = torch.autograd.grad(policy_loss(), [policy.b2])
    for g in range(len(policy.groups)):
        with torch.no_grad():
            policy.b2[g] += h
            up = float(policy_loss())
            policy.b2[g] -= 2 * h
            down = float(policy_loss())
            policy.b2[g] += h
        assert grad_b2[g].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-10), policy.groups[g]


def test_an_applied_step_carries_the_gradient_of_the_step_at_zero_scale(task):
    """s - s.detach() leaves theta as it is, with d/ds = -a <grad L(theta), z>: the gradient of a virtual
    step at scale 0 from the same theta."""
    model, scorer, batch = float64_tiny(task)
    blocks = model_blocks(model)
    scales = torch.rand(len(blocks), dtype=torch.float64, requires_grad=True)
    applied = lookahead_parameters(blocks, [(3, 0.2, scales - scales.detach()), (4, -0.1, scales - scales.detach())])
    assert all(torch.equal(applied[b.name], b.param.detach()) for b in blocks)
    (grad_applied,) = torch.autograd.grad(loss_at(scorer, applied, batch), [scales])
    zero = torch.zeros(len(blocks), dtype=torch.float64, requires_grad=True)
    (grad_virtual,) = torch.autograd.grad(loss_at(scorer, lookahead_parameters(blocks, [(3, 0.2, zero), (4, -0.1, zero)]), batch), [zero])
    torch.testing.assert_close(grad_applied, grad_virtual, rtol=1e-12, atol=0)
    assert grad_applied.abs().sum() > 0


def test_expected_meta_gradient_favours_blocks_with_a_dense_gradient(task):
    """Averaged over directions, d L(theta - a c s z) / d s_i = -a s_i ||g_i||^2 (first order in a)."""
    model, scorer, batch = float64_tiny(task)
    blocks = model_blocks(model)
    scales = torch.exp(torch.randn(len(blocks), dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    truth = true_gradient(blocks, lambda: scorer.loss(batch))
    grad_sq = torch.tensor([float(truth[b.name].double().pow(2).sum()) for b in blocks], dtype=torch.float64)
    a, draws = 1e-4, 100
    total = torch.zeros(len(blocks), dtype=torch.float64)
    for seed in range(draws):
        c = sum(float(scales[i]) * float((truth[b.name].double() * block_noise(GaussianSampler(), b, seed).double()).sum())
                for i, b in enumerate(blocks))  # the projected gradient along u = s z, eps -> 0
        s = scales.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_at(scorer, lookahead_parameters(blocks, [(seed, a * c, s)]), batch), [s])
        total += g
    mean, expected = total / draws, -a * scales * grad_sq
    cos = float(torch.nn.functional.cosine_similarity(mean, expected, dim=0))
    without_scale = float(torch.nn.functional.cosine_similarity(mean, -a * grad_sq, dim=0))
    assert cos > 0.9 and cos > without_scale + 0.05


def test_expected_cosine_matches_monte_carlo():
    torch.manual_seed(0)
    numels = torch.tensor([50, 200, 10])
    grads = [torch.randn(int(n)) * w for n, w in zip(numels, (1.0, 0.1, 3.0))]
    g = torch.cat(grads).double()
    grad_sq = torch.tensor([float(x.pow(2).sum()) for x in grads], dtype=torch.float64)
    scales = torch.tensor([0.5, 1.2, 2.0], dtype=torch.float64)
    s = torch.cat([torch.full((int(n),), float(v)) for n, v in zip(numels, scales)]).double()
    z = torch.randn(200_000, len(g), dtype=torch.float64)
    u = z * s
    estimates = (u @ g)[:, None] * u
    monte_carlo = float((estimates @ g).mean() / torch.sqrt((estimates**2).sum(1).mean() * (g @ g)))
    assert expected_cosine(scales, grad_sq, numels) == pytest.approx(monte_carlo, rel=0.02)


# ----------------------------------------------------------------------------------- the outer loop


def small_trainer(task, **overrides):
    model, tokenizer = tiny()
    tasks = [task, get_task("trec", max_train=64)]
    scorers = [scorer_and_batch(model, tokenizer, t)[0] for t in tasks]
    settings = dict(horizon=1, trajectory="first-order", reset_every=20)  # the paper's one-step lookahead
    config = MetaTrainConfig(model="tiny-llama", steps=6, batch_size=4, probe_examples=4, probe_directions=2,
                             lr_update=1e-2, trajectory_lr=1e-2, **{**settings, **overrides})
    return MetaTrainer(model, tasks, scorers, config), model


def test_meta_step_moves_the_policy_and_the_first_order_trajectory_resets(task):
    trainer, model = small_trainer(task, reset_every=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy_start = [p.detach().clone() for p in trainer.policy.parameters()]
    for step in range(3):
        result = trainer.meta_step()
        assert not result.skipped and result.step == step
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.policy.parameters(), policy_start))
    assert trainer.sampler.run.observations == 3
    trainer.reset_model()
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert trainer.sampler.run.observations == 0
    result = trainer.meta_step()
    assert result.reset  # step 3 is a reset step of its own


def test_no_trajectory_leaves_the_model_bitwise_unchanged(task):
    trainer, model = small_trainer(task, trajectory="none")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        trainer.meta_step()
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_zo_trajectory_is_the_learned_samplers_step(task):
    trainer, model = small_trainer(task, trajectory="zo", reset_every=0)  # horizon 1: the lookahead is virtual
    result = trainer.meta_step()
    assert not result.skipped
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, trainer.initial.get(n, p))]
    assert changed  # a ZO step along u moved every trained tensor
    assert len(changed) == len(trainer.blocks)


def test_unrolled_horizon_takes_the_deployment_steps_of_the_policy(task, tiny_tokenizer):
    """A meta-step with horizon 3 moves the model exactly as 3 steps of ZeroOrderOptimizer with the
    learned sampler (same policy, lr, eps, seed and batches), then updates the policy."""
    import copy

    from metazo.engine import ZeroOrderOptimizer
    from metazo.samplers import LearnedSampler
    from metazo.trainer import training_batch

    model, tokenizer = tiny()
    scorer = scorer_and_batch(model, tokenizer, task)[0]
    config = MetaTrainConfig(model="tiny-llama", steps=2, batch_size=4, horizon=3, trajectory="zo", lr_update=1e-2,
                             reset_every=0, probe_every=0)
    trainer = MetaTrainer(model, [task], [scorer], config)
    reference, _ = tiny()
    ref_scorer = scorer_and_batch(reference, tokenizer, task)[0]
    optimizer = ZeroOrderOptimizer(reference, LearnedSampler(copy.deepcopy(trainer.policy)), lr=1e-2, eps=config.eps,
                                   seed=config.seed)
    policy_start = [p.detach().clone() for p in trainer.policy.parameters()]
    result = trainer.meta_step()
    for k in range(3):
        batch = ref_scorer.encode(training_batch(task.train, k, 4, config.seed))
        optimizer.step(lambda: ref_scorer.loss(batch))
    assert not result.skipped and trainer.zo_step_count == 3 and trainer.task_steps == [4]  # 3 steps + the meta batch
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in zip(trainer.policy.parameters(), policy_start))
    with pytest.raises(MetazoError, match="pass --trajectory zo"):
        MetaTrainConfig(horizon=3, trajectory="first-order").validate()


def test_probe_reports_expected_and_measured_cosines(task):
    trainer, _ = small_trainer(task)
    probe = trainer.probe()
    assert probe["expected_cosine_gain"] == pytest.approx(1.0)  # a fresh policy is MeZO
    assert 0 < probe["expected_cosine_mezo"] < 1 and -1 <= probe["measured_cosine"] <= 1


def test_non_finite_meta_loss_is_skipped_then_stops(task, monkeypatch):
    trainer, _ = small_trainer(task, max_nonfinite=2)
    for scorer in trainer.scorers:
        monkeypatch.setattr(scorer, "loss", lambda batch, real=scorer.loss: real(batch) * float("nan"))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    assert trainer.meta_step().skipped
    assert all(torch.equal(p, q) for p, q in zip(trainer.policy.parameters(), before))
    with pytest.raises(NonFiniteMetaLossError, match="not finite for 2 meta-steps in a row"):
        trainer.meta_step()


def test_mixture_parsing_and_sampling():
    assert parse_mixture("rotten-tomatoes, trec:2,hf:glue:3") == [
        MixtureEntry("rotten-tomatoes", 1.0), MixtureEntry("trec", 2.0), MixtureEntry("hf:glue", 3.0)]
    assert parse_mixture("hf:imdb") == [MixtureEntry("hf:imdb", 1.0)]
    for bad, message in (("", "at least one task"), (" , ", "at least one task"), ("trec:0", "> 0"),
                         ("trec:nan", "finite"), ("trec,trec:2", "twice")):
        with pytest.raises(MetazoError, match=message):
            parse_mixture(bad)
    draws = [task_for_step([1.0, 3.0], step, seed=0) for step in range(2000)]
    assert draws == [task_for_step([1.0, 3.0], step, seed=0) for step in range(2000)]  # pure in (step, seed)
    assert 0.7 < sum(draws) / len(draws) < 0.8


# ---------------------------------------------------------------------------------- the command


def test_meta_train_command_end_to_end(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "meta"
    code = main(["meta-train", "--model", "tiny-llama", "--tasks", "rotten-tomatoes,trec:2", "--steps", "4",
                 "--batch", "4", "--probe-every", "2", "--max-train", "64", "--output", str(output), "--no-progress",
                 "--heldout-task", "sms-spam", "--heldout-steps", "2", "--heldout-eval-examples", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "policy:" in out and "held-out task sms-spam" in out and "mezo" in out
    policy = PerturbationPolicy.from_pretrained(output / "policy.safetensors")
    card = policy.card
    assert card["tasks"] == {"rotten-tomatoes": 1.0, "trec": 2.0}
    assert card["source_model"]["name"] == "tiny-llama" and card["source_model"]["roles"]["norm"] == 7
    assert card["training"]["lr_update"] == MetaTrainConfig().lr_update
    assert card["heldout"][0]["task"] == "sms-spam" and {"mezo", "policy"} <= set(card["heldout"][0])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["history"]) == 4 and len(summary["probes"]) == 2
    events = EventAccumulator(str(output), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"meta/loss", "meta/improvement", "train/zo_loss", "probe/expected_cosine_gain",
            "probe/measured_cosine"} <= set(tags["scalars"])
    assert "sigma/norm" in tags["scalars"] and "sigma_histogram/norm" in tags["histograms"]
    assert "sigma/role_by_depth" in tags["images"]
    assert (output / "heldout" / "compare.md").is_file()


@pytest.mark.parametrize("args,message", [
    (["--tasks", ""], "at least one task"),
    (["--tasks", "rotten-tomatoes", "--heldout-task", "rotten-tomatoes"], "is in the meta-training mixture"),
    (["--tasks", "no-such-task"], "unknown task"),
    (["--steps", "0"], "steps must be > 0"),
    (["--trajectory-lr", "-1"], "trajectory-lr must be >= 0"),
])
def test_meta_train_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    output = tmp_path / "meta"
    code = main(["meta-train", "--model", "tiny-llama", "--output", str(output), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not output.exists()


def test_meta_train_stopped_by_non_finite_loss_writes_no_policy(tmp_path, monkeypatch, capsys):
    from metazo import scoring

    calls = {"n": 0}
    original = scoring.Scorer.loss

    def flaky(self, batch):  # finite for the first meta-step (3 forwards), NaN afterwards
        calls["n"] += 1
        return original(self, batch) * (1.0 if calls["n"] <= 3 else float("nan"))

    monkeypatch.setattr(scoring.Scorer, "loss", flaky)
    output = tmp_path / "meta"
    code = main(["meta-train", "--model", "tiny-llama", "--tasks", "trec", "--steps", "10", "--batch", "4",
                 "--horizon", "1", "--trajectory", "first-order", "--probe-every", "0", "--max-train", "64",
                 "--output", str(output), "--no-progress", "--heldout-task", "none"])
    assert code == 2 and "not finite for 5 meta-steps in a row" in capsys.readouterr().err
    assert not (output / "policy.safetensors").exists()
    assert json.loads((output / "summary.json").read_text())["status"].startswith("failed at meta-step 6")
