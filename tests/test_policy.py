"""The learned perturbation policy: network, features, the learned sampler against MeZO, policy files."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import scorer_and_batch, tiny
from metazo.blocks import model_blocks
from metazo.checkpoints import tensors_checksum
from metazo.cli import main
from metazo.engine import ZeroOrderOptimizer
from metazo.errors import MetazoError
from metazo.policy import (
    FEATURE_SETS, SCHEMA_VERSION, PerturbationPolicy, PolicyConfig, RunState, block_features, format_card,
    normalizer,
)
from metazo.samplers import GaussianSampler, LearnedSampler, block_noise
from metazo.samplers.learned import UnseenRolesWarning


def randomised(policy: PerturbationPolicy, seed: int = 1, scale: float = 0.5) -> PerturbationPolicy:
    """The policy with a random output layer, so sigma differs between blocks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        policy.w2.copy_(torch.randn(policy.w2.shape, generator=generator) * scale)
        policy.b2.copy_(torch.randn(policy.b2.shape, generator=generator) * scale)
    return policy


def test_fresh_policy_is_mezo_step_for_step(task):
    """A constant policy (sigma = 1 everywhere) gives exactly the Gaussian sampler's steps."""
    model, tokenizer = tiny()
    reference, _ = tiny()
    scorer, batch = scorer_and_batch(model, tokenizer, task)
    ref_scorer, _ = scorer_and_batch(reference, tokenizer, task)
    policy = PerturbationPolicy.for_blocks(model_blocks(model))
    learned = ZeroOrderOptimizer(model, LearnedSampler(policy), lr=1e-2, eps=1e-3, num_directions=2, seed=3)
    mezo = ZeroOrderOptimizer(reference, GaussianSampler(), lr=1e-2, eps=1e-3, num_directions=2, seed=3)
    for _ in range(3):
        a = learned.step(lambda: scorer.loss(batch))
        b = mezo.step(lambda: ref_scorer.loss(batch))
        assert (a.loss_plus, a.loss_minus) == (b.loss_plus, b.loss_minus)
    assert learned.sampler.scales == [1.0] * len(learned.blocks)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_normalizer_keeps_mezo_norm_and_only_redistributes():
    numels = torch.tensor([10.0, 1000.0, 3.0, 250.0], dtype=torch.float64)
    sigma = torch.tensor([0.2, 3.0, 7.0, 1.0])
    nf = normalizer(sigma, numels)
    assert torch.isclose((numels * (nf * sigma.double()) ** 2).sum(), numels.sum())
    assert torch.isclose(normalizer(5 * sigma, numels) * 5, nf)  # only ratios matter
    assert float(normalizer(torch.ones(4), numels)) == 1.0


def test_learned_scales_follow_sigma_and_the_budget(task):
    model, tokenizer = tiny()
    sampler = LearnedSampler(randomised(PerturbationPolicy.for_blocks(model_blocks(model))))
    blocks = ZeroOrderOptimizer(model, sampler, lr=0.0).blocks
    sampler.begin_step(0)
    scales = torch.tensor(sampler.scales, dtype=torch.float64)
    numels = torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)
    assert scales.std() > 0.1  # the policy really distinguishes blocks
    assert torch.isclose((numels * scales**2).sum(), numels.sum())
    block = blocks[1]
    torch.testing.assert_close(block_noise(sampler, block, 5), block_noise(GaussianSampler(), block, 5) * scales[1].item())


def test_networks_are_shared_per_role_and_apply_to_another_family(tiny_tokenizer):
    llama, _ = tiny("tiny-llama")
    qwen, _ = tiny("tiny-qwen2")
    policy = randomised(PerturbationPolicy.for_blocks(model_blocks(llama)))
    assert set(policy.groups) == {b.role for b in model_blocks(llama)}
    assert policy.w1.shape[0] == len(policy.groups)  # one network per role, not per tensor
    qwen_blocks = model_blocks(qwen)
    index, unseen = policy.assign(qwen_blocks)
    assert unseen == [] and (index >= 0).all()
    # Blocks of one role share a network: same features give the same sigma.
    features = torch.zeros(len(qwen_blocks), len(FEATURE_SETS["scaled"]))
    sigma = policy(features, index)
    q_blocks = [i for i, b in enumerate(qwen_blocks) if b.role == "attn_q"]
    assert len(set(sigma[q_blocks].tolist())) == 1


def test_unseen_roles_are_reported_and_keep_sigma_one():
    llama, _ = tiny("tiny-llama")
    gpt2, _ = tiny("tiny-gpt2")  # fused qkv: a role Llama never has
    policy = randomised(PerturbationPolicy.for_blocks(model_blocks(llama)))
    sampler = LearnedSampler(policy)
    with pytest.warns(UnseenRolesWarning, match="attn_qkv"):
        ZeroOrderOptimizer(gpt2, sampler, lr=0.0)
    sigma = sampler.sigma()
    unseen = [i for i, b in enumerate(sampler.blocks) if b.role == "attn_qkv"]
    assert unseen and all(sigma[i] == 1.0 for i in unseen)


def test_per_tensor_policy_refuses_another_model():
    llama, _ = tiny("tiny-llama")
    qwen, _ = tiny("tiny-qwen2")
    policy = PerturbationPolicy.for_blocks(model_blocks(llama), PolicyConfig(sharing="tensor"))
    assert len(policy.groups) == len(model_blocks(llama))
    with pytest.raises(MetazoError, match="one network per tensor"):
        policy.assign(model_blocks(qwen))


def test_scaled_features_are_bounded_and_model_relative():
    model, _ = tiny()
    blocks = model_blocks(model)
    state = RunState(len(blocks))
    features = block_features("scaled", blocks, state)
    names = FEATURE_SETS["scaled"]
    assert features.shape == (len(blocks), len(names)) and torch.isfinite(features).all()
    column = dict(zip(names, features.T))
    assert column["weight_mean_over_rms"].abs().max() <= 1
    assert column["weight_log_rms_z"].abs().max() <= 3
    norms = [i for i, b in enumerate(blocks) if b.role == "norm"]
    assert torch.allclose(column["weight_mean_over_rms"][norms], torch.ones(len(norms)))  # norms start at 1
    # Losses enter as scale-free quantities: multiplying every loss by 10 changes nothing.
    small, large = RunState(len(blocks)), RunState(len(blocks))
    for factor, run in ((1.0, small), (10.0, large)):
        for plus, minus in ((0.70, 0.69), (0.60, 0.62), (0.50, 0.49)):
            run.observe(plus * factor, minus * factor, (plus - minus) * factor / 2e-3, torch.ones(len(blocks)))
    torch.testing.assert_close(block_features("scaled", blocks, small), block_features("scaled", blocks, large))
    assert not torch.equal(block_features("paper", blocks, small), block_features("paper", blocks, large))


# ------------------------------------------------------------------------------------ policy files


@pytest.fixture
def saved_policy(tmp_path):
    model, _ = tiny()
    policy = randomised(PerturbationPolicy.for_blocks(model_blocks(model)))
    path = policy.save_pretrained(tmp_path / "p.safetensors", card={"source_model": {"name": "tiny-llama"},
                                                                     "metrics": {"meta_loss": 0.5}})
    return policy, path


def test_policy_file_round_trip(saved_policy):
    policy, path = saved_policy
    loaded = PerturbationPolicy.from_pretrained(path)
    assert loaded.groups == policy.groups and loaded.config == policy.config
    for name in ("w1", "b1", "w2", "b2"):
        assert torch.equal(getattr(loaded, name), getattr(policy, name))
    assert loaded.card["source_model"] == {"name": "tiny-llama"} and loaded.card["metazo_version"]
    card = format_card(path)
    assert "one network per role" in card and "tiny-llama" in card and "meta_loss" in card


def _rewrite(path, tensors=None, **metadata_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        original = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update(metadata_changes)
    tensors = tensors if tensors is not None else original
    metadata["sha256"] = tensors_checksum(tensors)  # a well-formed file, so the check under test is reached
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if v is not None})


@pytest.mark.parametrize("damage,message", [
    ("truncate", "not a readable safetensors file"),
    ("text", "not a readable safetensors file"),
    ("newer", "newer than this metazo"),
    ("shape", "has shape"),
    ("features", "feature names"),
    ("nan", "NaN"),
    ("not-policy", "not a metazo policy"),
    ("json", "not valid JSON"),
])
def test_bad_policy_files_are_clear_errors(saved_policy, damage, message):
    policy, path = saved_policy
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "text":
        path.write_text("this is not a policy")
    elif damage == "newer":
        _rewrite(path, schema_version=str(SCHEMA_VERSION + 1))
    elif damage == "shape":
        _rewrite(path, tensors={"w1": torch.zeros(2, 3, 4), "b1": policy.b1.detach(), "w2": policy.w2.detach(), "b2": policy.b2.detach()})
    elif damage == "features":
        arch = json.loads(_metadata(path)["policy"])
        arch["feature_names"] = ["depth", "something_new"]
        _rewrite(path, policy=json.dumps(arch))
    elif damage == "nan":
        _rewrite(path, tensors={"w1": policy.w1.detach(), "b1": policy.b1.detach(), "w2": policy.w2.detach(),
                                "b2": torch.full_like(policy.b2.detach(), float("nan"))})
    elif damage == "not-policy":
        _rewrite(path, format=None)
    elif damage == "json":
        _rewrite(path, card="{not json")
    with pytest.raises(MetazoError, match=message):
        PerturbationPolicy.from_pretrained(path)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_cli_policy_show_and_bad_policy(saved_policy, tmp_path, capsys):
    _, path = saved_policy
    assert main(["policy", "show", str(path)]) == 0
    assert "features (scaled)" in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 7)
    output = tmp_path / "run"
    code = main(["finetune", "--model", "tiny-llama", "--policy", str(bad), "--steps", "1", "--output", str(output),
                 "--no-progress"])
    assert code == 2 and "not a readable safetensors file" in capsys.readouterr().err
    assert not output.exists()
    code = main(["finetune", "--model", "tiny-llama", "--policy", str(path), "--sampler", "lowrank", "--steps", "1"])
    assert code == 2 and "drop --sampler lowrank" in capsys.readouterr().err


def test_finetune_with_a_policy_file(saved_policy, tmp_path):
    _, path = saved_policy
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenRolesWarning)  # the same family: every role is known
        code = main(["finetune", "--model", "tiny-llama", "--policy", str(path), "--steps", "3", "--batch", "4",
                     "--eval-examples", "8", "--eval-every", "0", "--output", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["sampler"] == "learned" and summary["config"]["sampler_options"]["policy"] == str(path)
    assert summary["optimizer"]["sampler"]["state"]["run"]["observations"] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(tmp_path / "run")).Reload().Tags()["scalars"]
    assert {"sigma/norm", "sigma/attn_q", "sigma/max", "train/loss"} <= set(scalars)


def test_shipped_policies_load_with_their_cards_and_apply_to_a_new_model(tiny_tokenizer):
    """Every file in policies/ is a meta-trained policy whose card says how it was trained and how it
    did on tasks outside its mixture, and it drives a model of another size without retraining."""
    from pathlib import Path

    shipped = sorted((Path(__file__).parent.parent / "policies").glob("*.safetensors"))
    assert shipped, "policies/ holds no policy"
    model, _ = tiny("tiny-llama")
    for path in shipped:
        policy = PerturbationPolicy.from_pretrained(path)
        card = policy.card
        assert {"source_model", "tasks", "training", "metrics"} <= set(card), path
        assert card["training"]["steps"] > 0 and card["source_model"]["blocks"] > 0
        heldout = card.get("heldout", [])
        assert heldout and all(entry["task"] not in card["tasks"] for entry in heldout), path
        assert all({"mezo", "policy"} <= set(entry) for entry in heldout)
        sampler = LearnedSampler(policy)
        with pytest.warns(UnseenRolesWarning, match="role head"):  # tiny-llama's untied head; smollm2 ties it
            blocks = ZeroOrderOptimizer(model, sampler, lr=0.0).blocks
        sampler.begin_step(0)
        scales = torch.tensor(sampler.scales, dtype=torch.float64)
        numels = torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)
        assert torch.isfinite(scales).all() and scales.std() > 0.01, path  # trained: not MeZO's constant
        assert torch.isclose((numels * scales**2).sum(), numels.sum())
