"""The scorer against the model's own full-vocabulary logits, on every tiny family."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_FAMILIES, tiny
from metazo.errors import MetazoError
from metazo.scoring import Scorer
from metazo.tasks import Example, get_task


@pytest.fixture(scope="module")
def examples():
    # prompts of very different lengths, so padding really happens
    task = get_task("rotten-tomatoes")
    picked = sorted(task.test[:40], key=lambda e: len(e.prompt))
    return [picked[0], picked[-1], picked[len(picked) // 2], picked[1]], task


def reference_logits(model, tokenizer, example, label_ids):
    """Full-vocabulary logits of the unpadded prompt, from the model's own forward."""
    ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    return logits[label_ids]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_label_logits_equal_full_model_logits(family, padding_side, examples):
    examples, task = examples
    model, tokenizer = tiny(family)
    label_ids = task.label_token_ids(tokenizer)
    scorer = Scorer(model, tokenizer, label_ids, padding_side=padding_side)
    batch = scorer.encode(examples)
    assert (batch.attention_mask == 0).any()  # padded
    head_calls = []
    handle = scorer.head.register_forward_hook(lambda *a: head_calls.append(1))
    with torch.no_grad():
        logits = scorer.label_logits(batch)
    handle.remove()
    assert not head_calls  # the LM head never runs over full sequences
    assert logits.shape == (len(examples), 2)
    for row, example in enumerate(examples):
        torch.testing.assert_close(logits[row], reference_logits(model, tokenizer, example, label_ids),
                                   rtol=1e-4, atol=1e-4)


def test_loss_accuracy_and_micro_batches(examples):
    examples, task = examples
    model, tokenizer = tiny("tiny-llama")
    label_ids = task.label_token_ids(tokenizer)
    whole = Scorer(model, tokenizer, label_ids)
    micro = Scorer(model, tokenizer, label_ids, micro_batch_size=3)
    batch = whole.encode(examples)
    with torch.no_grad():
        logits = whole.label_logits(batch)
        expected = F.cross_entropy(logits, batch.labels)
        torch.testing.assert_close(whole.loss(batch), expected)
        torch.testing.assert_close(micro.loss(batch), expected, rtol=1e-5, atol=1e-6)
    metrics = micro.evaluate(examples, batch_size=3)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == batch.labels).float().mean()))
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_choices_beyond_an_examples_count_are_never_predicted():
    model, tokenizer = tiny("tiny-llama")
    words = [" A", " B", " C", " D"]
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    scorer = Scorer(model, tokenizer, label_ids)
    batch = scorer.encode([Example("Q?\nA. x\nB. y\nAnswer:", 1, num_choices=2),
                           Example("Q?\nA. x\nB. y\nC. z\nD. w\nAnswer:", 3)])
    with torch.no_grad():
        logits = scorer.label_logits(batch)
    assert torch.isinf(logits[0, 2:]).all() and torch.isfinite(logits[1]).all()
    assert int(logits[0].argmax()) in (0, 1)


def test_truncation_keeps_the_end_of_the_prompt(examples):
    examples, task = examples
    model, tokenizer = tiny("tiny-llama")
    scorer = Scorer(model, tokenizer, task.label_token_ids(tokenizer), max_length=8)
    batch = scorer.encode(examples[1:2])
    full = tokenizer(examples[1].prompt)["input_ids"]
    assert batch.input_ids[0].tolist() == full[-8:]


def test_bad_scorer_settings():
    model, tokenizer = tiny("tiny-llama")
    with pytest.raises(MetazoError, match="padding side"):
        Scorer(model, tokenizer, [1, 2], padding_side="middle")
    with pytest.raises(MetazoError, match="empty batch"):
        Scorer(model, tokenizer, [1, 2]).encode([])
