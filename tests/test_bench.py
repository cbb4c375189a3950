"""`metazo bench`: the smoke run CI does on the tiny shape, and the MeZO reference arm against MeZO's formula."""

import json

import pytest
import torch
import torch.nn.functional as F

from metazo.bench import MezoReference, build_model, synthetic_batch
from metazo.cli import main


def test_bench_cli_runs_every_arm_on_the_tiny_shape(capsys):
    code = main(["bench", "--model", "tiny", "--device", "cpu", "--batch", "2", "--seq-len", "16",
                 "--repeats", "2", "--warmup", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["arms"]) == {"reference", "metazo", "floor"}
    for arm in result["arms"].values():
        assert len(arm["times_ms"]) == 2 and all(t > 0 for t in arm["times_ms"])
        assert arm["median_ms"] == pytest.approx(sum(arm["times_ms"]) / 2)
        assert arm["peak_memory_bytes"] > 0
        assert arm["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / arm["median_ms"] * 1000)
    arms, ratios = result["arms"], result["ratios"]
    assert result["tokens_per_step"] == 32
    assert ratios["speedup_vs_reference"] == pytest.approx(arms["reference"]["median_ms"] / arms["metazo"]["median_ms"])
    assert ratios["metazo_over_floor_time"] == pytest.approx(arms["metazo"]["median_ms"] / arms["floor"]["median_ms"])
    assert ratios["metazo_over_floor_memory"] == pytest.approx(
        arms["metazo"]["peak_memory_bytes"] / arms["floor"]["peak_memory_bytes"])


def test_bench_text_table_and_one_line_errors(capsys):
    assert main(["bench", "--device", "cpu", "--batch", "1", "--seq-len", "8", "--repeats", "1", "--warmup", "0",
                 "--arms", "metazo,floor", "--sampler", "lowrank", "--paired"]) == 0
    out = capsys.readouterr().out
    assert "sampler lowrank (paired)" in out and "metazo step" in out and "floor (two scoring forwards)" in out and "MeZO reference" not in out
    assert "metazo / floor: time" in out
    for argv, fragment in ([["--sampler", "ar1-zo"], "needs LoRA"], [["--seq-len", "5000"], "longer than the model"],
                           [["--arms", "metazo,fast"], "unknown arm"]):
        assert main(["bench", "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1


def test_mezo_reference_step_is_mezos_formula():
    """Seed once per pass, torch.normal per tensor; g = (L(theta + eps z) - L(theta - eps z)) / 2eps; theta -= lr g z."""
    model = build_model("tiny", torch.float32, torch.device("cpu"))
    batch, label_ids = synthetic_batch(1024, 3, 12, torch.device("cpu"))
    reference = MezoReference(model, batch, label_ids, lr=1e-2, eps=1e-3, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    torch.manual_seed(0)  # the first step's seed
    z = [torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype) for p in params]

    def loss_at(sign):
        with torch.no_grad():
            for p, t, d in zip(params, theta, z):
                p.copy_(t + sign * 1e-3 * d)
            logits = model(input_ids=batch.input_ids).logits[:, -1, label_ids]
            return float(F.cross_entropy(logits, batch.labels))

    expected = (loss_at(1) - loss_at(-1)) / 2e-3
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    grad = reference.step()
    assert grad == pytest.approx(expected, rel=1e-3)
    for p, t, d in zip(params, theta, z):
        torch.testing.assert_close(p, t - 1e-2 * grad * d, rtol=1e-5, atol=1e-6)
    assert reference.step_count == 1
