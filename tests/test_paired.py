"""Both signs in one batched forward (PairedView, Scorer.paired_loss) and the low-rank update as one matmul."""

import pytest
import torch

from conftest import scorer_and_batch, tiny
from metazo.blocks import model_blocks
from metazo.engine import ZeroOrderOptimizer
from metazo.errors import MetazoError
from metazo.samplers import LowRankSampler, block_noise


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
@pytest.mark.parametrize("sampler", ["gaussian", "lowrank"])
def test_paired_forward_gives_the_two_pass_estimates(task, family, sampler):
    model, tokenizer = tiny(family)
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=6, micro_batch_size=4)
    optimizer = ZeroOrderOptimizer(model, sampler, lr=0.0, eps=1e-3, num_directions=2, seed=3)
    two_pass = optimizer.estimate(lambda: scorer.loss(batch), step=0)
    paired = optimizer.estimate(lambda: pytest.fail("the paired path must not call the closure"), step=0,
                                paired_closure=lambda: scorer.paired_loss(batch))
    for a, b in zip(two_pass, paired):
        assert a.seed == b.seed
        assert b.loss_plus == pytest.approx(a.loss_plus, abs=1e-6)
        assert b.loss_minus == pytest.approx(a.loss_minus, abs=1e-6)
        assert b.projected_grad == pytest.approx(a.projected_grad, rel=1e-4, abs=1e-4)
        assert a.loss_plus != a.loss_minus


@pytest.mark.parametrize("sampler", ["gaussian", "lowrank"])
def test_paired_step_with_lr_zero_leaves_weights_bitwise_identical(task, sampler):
    model, tokenizer = tiny("tiny-llama", "bfloat16")
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = ZeroOrderOptimizer(model, sampler, lr=0.0, eps=1e-2)
    for _ in range(2):
        result = optimizer.step(lambda: scorer.loss(batch), paired_closure=lambda: scorer.paired_loss(batch))
        assert result.loss_plus != result.loss_minus
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_paired_scoring_refuses_what_it_cannot_split(task):
    model, tokenizer = tiny("tiny-gemma3")  # its norms compute (1 + weight.float()) before reading the batch
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=4)
    optimizer = ZeroOrderOptimizer(model, "gaussian", eps=1e-3)
    with pytest.raises(MetazoError, match="separate passes"):
        optimizer.estimate(lambda: scorer.loss(batch), paired_closure=lambda: scorer.paired_loss(batch))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lowrank_update_is_one_matmul_equal_to_the_chunked_direction(dtype):
    model, _ = tiny("tiny-llama", dtype)
    blocks = model_blocks(model)
    sampler = LowRankSampler(rank=3, seed=1)
    optimizer = ZeroOrderOptimizer(blocks, sampler, model=model)
    before = {b.name: b.param.detach().float().clone() for b in blocks}
    coefficients = [(11, 0.7), (12, -1.3)]
    optimizer.update(coefficients, lr=1e-2)
    for block in blocks:
        expected = before[block.name] - 1e-2 * sum(a * block_noise(sampler, block, seed) for seed, a in coefficients)
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(block.param.float(), expected, **tolerance, msg=block.name)
        if len(block.shape) == 2 and dtype == "float32":
            assert torch.linalg.matrix_rank(block.param.detach().float() - before[block.name], rtol=1e-3) <= 6


def test_finetune_paired_follows_the_two_pass_run(tmp_path):
    from metazo.trainer import FinetuneConfig, finetune

    runs = {}
    for paired in (False, True):
        config = FinetuneConfig(model="tiny-llama", sampler="lowrank", steps=3, lr=1e-2, batch_size=4, eval_every=0,
                                eval_examples=8, device="cpu", progress=False, paired=paired,
                                output=str(tmp_path / f"paired-{paired}"))
        runs[paired] = finetune(config)
    assert runs[True]["forward_passes"] == runs[False]["forward_passes"] == 6
    assert runs[True]["final_train_loss"] == pytest.approx(runs[False]["final_train_loss"], rel=1e-4)
    assert runs[True]["final"]["loss"] == pytest.approx(runs[False]["final"]["loss"], rel=1e-4)
