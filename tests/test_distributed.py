"""Two CPU processes with gloo: ZO across ranks equals one process, and the ranks agree bitwise.

Each test launches 2 ranks as subprocesses with the torchrun environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) set by hand, running WORKER below, or torchrun itself for the CLI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metazo
from metazo.checkpoints import load_tensors
from metazo.distributed import Distributed
from metazo.trainer import FinetuneConfig, finetune

from conftest import free_port, tiny

ROOT = Path(metazo.__file__).resolve().parents[1]
QPROJ = "model.layers.0.self_attn.q_proj.weight"

# argv: kind (finetune | meta-train), output folder, config as JSON, fault (none | nan-once | nan | die | hang).
# A fault acts on rank 1 through its scorer: NaN losses from the second step on (or in the second
# step only), or the process exiting (or going silent) in the middle of the second step.
WORKER = r"""
import json, os, sys, torch
from metazo.distributed import init_distributed
from metazo.errors import MetazoError
from metazo.models import load_model
from metazo.scoring import Scorer

kind, out, config_json, fault = sys.argv[1:5]
comm = init_distributed("gloo", timeout_s=float(os.environ["METAZO_TEST_TIMEOUT"]))
model, tokenizer = load_model("tiny-llama", device="cpu")
if comm.rank == 1 and fault != "none":
    calls = [0]
    loss_sum = Scorer.loss_sum
    def faulty(self, batch):
        calls[0] += 1
        if fault == "die" and calls[0] == 3:
            os._exit(3)
        if fault == "hang" and calls[0] == 3:
            import time; time.sleep(600)
        if (fault == "nan" and calls[0] > 2) or (fault == "nan-once" and calls[0] in (3, 4)):
            return loss_sum(self, batch) * float("nan")
        return loss_sum(self, batch)
    Scorer.loss_sum = faulty
trainers = []  # meta-training: keep the trainer, to save this rank's policy
if kind == "meta-train":
    import metazo.meta.trainer as meta
    init = meta.MetaTrainer.__init__
    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        trainers.append(self)
    meta.MetaTrainer.__init__ = recording
try:
    if kind == "finetune":
        from metazo.trainer import FinetuneConfig, finetune
        summary = finetune(FinetuneConfig(**json.loads(config_json)), (model, tokenizer), comm=comm)
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        from metazo.meta.trainer import MetaTrainConfig, meta_train
        summary = meta_train(MetaTrainConfig(**json.loads(config_json)), (model, tokenizer), comm=comm)
        state = {n: p.detach().clone() for n, p in trainers[0].policy.named_parameters()}
except MetazoError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
torch.save(state, os.path.join(out, f"rank{comm.rank}.pt"))
with open(os.path.join(out, f"summary{comm.rank}.json"), "w") as f:
    json.dump(summary, f, default=str)
comm.close()
"""


def environment(rank: int, port: int, timeout: float) -> dict:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "METAZO_TEST_TIMEOUT": str(timeout)}


def launch(kind: str, out: Path, config: dict, fault: str = "none", timeout: float = 60) -> list[subprocess.CompletedProcess]:
    """Run WORKER on 2 ranks; a hang fails the test (the ranks are killed) instead of blocking it."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, kind, str(out), json.dumps(config), fault],
                              env=environment(rank, port, timeout), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    results = []
    try:
        for proc in procs[:1] if fault == "hang" else procs:  # a silent rank is killed once rank 0 has stopped
            stdout, stderr = proc.communicate(timeout=4 * timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail("a rank hung past its timeout")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def finetune_settings(output: Path, **changes) -> dict:
    settings = dict(model="tiny-llama", task="rotten-tomatoes", steps=3, lr=1e-3, eps=1e-2, batch_size=5,
                    eval_every=0, eval_examples=8, max_train=64, device="cpu", output=str(output), progress=False)
    return {**settings, **changes}


def single_process(settings: dict, output: Path):
    model, tokenizer = tiny("tiny-llama")
    summary = finetune(FinetuneConfig(**{**settings, "output": str(output)}), (model, tokenizer))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, summary


def ok(results) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-3000:]}"


def test_data_parallel_equals_one_process_with_the_whole_batch(tmp_path):
    settings = finetune_settings(tmp_path / "run", batch_size=5, num_directions=2)  # shards of 3 and 2
    ok(launch("finetune", tmp_path, settings))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # bitwise, never compared or broadcast
    reference, summary = single_process(settings, tmp_path / "single")
    for name, tensor in reference.items():
        torch.testing.assert_close(ranks[0][name], tensor, rtol=0, atol=1e-6)
    initial = dict(tiny("tiny-llama")[0].named_parameters())
    assert not torch.equal(reference[QPROJ], initial[QPROJ])  # the steps moved the weights
    distributed = json.loads((tmp_path / "summary0.json").read_text())
    losses = [loss for _, loss in distributed["history"]]
    assert losses == pytest.approx([loss for _, loss in summary["history"]], rel=1e-6)
    # Only rank 0 writes; the file holds the weights both ranks have.
    assert torch.equal(load_tensors(tmp_path / "run" / "weights.safetensors")[QPROJ],
                       ranks[1][QPROJ])
    info = distributed["distributed"]
    assert info["bytes_sent_per_step"] == 4 * 16  # 4 forward passes, each one (sum, count) float64 pair
    assert info["ddp_bytes_sent_per_step"] > 10_000 * info["bytes_sent_per_step"]


def test_direction_parallel_through_torchrun_equals_one_process_bitwise(tmp_path):
    settings = finetune_settings(tmp_path / "run", num_directions=3)  # rank 0 scores 0 and 2, rank 1 scores 1
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "metazo", "finetune", "--model", "tiny-llama", "--steps", "3", "--lr", "1e-3", "--eps", "1e-2",
               "--batch", "5", "--directions", "3", "--eval-every", "0", "--eval-examples", "8", "--max-train", "64",
               "--device", "cpu", "--output", settings["output"], "--no-progress", "--parallel", "directions",
               "--dist-timeout", "60"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks (gloo), directions: 64 bytes sent per rank per step" in result.stdout
    reference, _ = single_process(settings, tmp_path / "single")
    written = load_tensors(Path(settings["output"]) / "weights.safetensors")
    for name, tensor in written.items():
        assert torch.equal(tensor, reference[name]), name


def test_meta_training_across_ranks_keeps_one_policy(tmp_path):
    settings = dict(model="tiny-llama", tasks="rotten-tomatoes,sms-spam", steps=3, horizon=2, batch_size=4, max_train=64,
                    probe_every=0, heldout_task=None, device="cpu", output=str(tmp_path / "meta"), progress=False)
    ok(launch("meta-train", tmp_path, settings))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert ranks[0]["w2"].abs().sum() > 0  # the policy learned (w2 starts at zero)
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(2)]
    # Different tasks or batches per rank, yet one policy: the ranks' own ZO losses differ.
    assert [h["loss_plus"] for h in summaries[0]["history"]] != [h["loss_plus"] for h in summaries[1]["history"]]
    assert sorted(p.name for p in (tmp_path / "meta").iterdir() if not p.name.startswith("events")) == \
        ["config.json", "policy.safetensors", "summary.json"]
    written = load_tensors(tmp_path / "meta" / "policy.safetensors")
    assert torch.equal(written["w2"], ranks[1]["w2"].float())


def test_nan_on_one_rank_is_skipped_by_both(tmp_path):
    settings = finetune_settings(tmp_path / "run", steps=3)
    ok(launch("finetune", tmp_path, settings, fault="nan-once"))
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(2)]
    assert [s["skipped_steps"] for s in summaries] == [1, 1]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])


def test_nan_on_one_rank_stops_both_and_leaves_no_weights(tmp_path):
    settings = finetune_settings(tmp_path / "run", steps=5, max_nonfinite=2)
    results = launch("finetune", tmp_path, settings, fault="nan")
    for result in results:
        assert result.returncode == 2
        assert "the loss was not finite for 2 steps in a row" in result.stderr
    assert not (tmp_path / "run" / "weights.safetensors").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"].startswith("failed at step 3")


def test_a_dead_rank_stops_the_other_with_a_clear_message(tmp_path):
    settings = finetune_settings(tmp_path / "run", steps=5)
    results = launch("finetune", tmp_path, settings, fault="die", timeout=20)
    assert results[1].returncode == 3
    assert results[0].returncode == 2
    assert "error: rank 0: lost contact with the other ranks" in results[0].stderr
    assert not (tmp_path / "run" / "weights.safetensors").exists()


def test_a_silent_rank_stops_the_other_at_the_timeout(tmp_path):
    settings = finetune_settings(tmp_path / "run", steps=5)
    rank0, = launch("finetune", tmp_path, settings, fault="hang", timeout=5)
    assert rank0.returncode == 2
    assert "error: rank 0: lost contact with the other ranks" in rank0.stderr
    assert "did not answer within 5 s" in rank0.stderr


def test_bad_layouts_are_refused_before_anything_is_written(tmp_path):
    comm = Distributed(rank=0, world_size=4)
    with pytest.raises(metazo.errors.MetazoError, match="--batch 2 is smaller than 4 ranks"):
        finetune(FinetuneConfig(**finetune_settings(tmp_path / "a", batch_size=2)), comm=comm)
    with pytest.raises(metazo.errors.MetazoError, match="--directions 2 is fewer than 4 ranks"):
        finetune(FinetuneConfig(**finetune_settings(tmp_path / "b", parallel="directions", num_directions=2)), comm=comm)
    with pytest.raises(metazo.errors.MetazoError, match="use --parallel directions"):
        finetune(FinetuneConfig(**finetune_settings(tmp_path / "c", sampler="agzo")), comm=comm)
    assert not any(tmp_path.iterdir())


def test_shards_and_directions_cover_everything_once():
    items = list(range(7))
    shards = [Distributed(rank=r, world_size=3).shard(items) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert [Distributed(rank=r, world_size=3).directions(5) for r in range(3)] == [[0, 3], [1, 4], [2]]
