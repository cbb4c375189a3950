"""Resumable runs, checkpoint integrity, numerical and resource faults (README: Reliability)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, scorer_and_batch, tiny
from metazo.checkpoints import write_safetensors_atomic
from metazo.cli import main
from metazo.errors import MetazoError
from metazo.resume import ResumeWarning, load_run_checkpoint, save_run_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ["finetune", "--model", "tiny-llama", "--task", "rotten-tomatoes", "--batch", "4", "--eval-every", "0",
            "--eval-examples", "16", "--max-train", "64", "--device", "cpu", "--no-progress"]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _start(args, output):
    return subprocess.Popen([sys.executable, "-m", "metazo", *args, "--output", str(output)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(process, folder, minimum=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted((folder / "checkpoints").glob("step-*.safetensors")) if (folder / "checkpoints").is_dir() else []
        if len(found) >= minimum:
            return found
        if process.poll() is not None:
            pytest.fail(f"the run ended before writing a checkpoint: {process.stderr.read()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no checkpoint appeared")


def _reference_and_killed(args, tmp_path, checkpoint_every):
    """(folder of an uninterrupted run of ``args``, folder of the same run SIGKILLed after its first checkpoint)."""
    reference = tmp_path / "reference"
    assert main([*args, "--checkpoint-every", "0", "--output", str(reference)]) == 0
    output = tmp_path / "run"
    process = _start([*args, "--checkpoint-every", str(checkpoint_every)], output)
    _wait_for_checkpoint(process, output)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return reference, output


def _same_tensors(a: Path, b: Path):
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 200-step run that nothing interrupts: the reference every resumed run must equal bitwise."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert main([*FINETUNE, "--steps", "200", "--checkpoint-every", "0", "--output", str(output)]) == 0
    return output


def test_finetune_killed_and_resumed_equals_an_uninterrupted_run(uninterrupted, tmp_path, capsys):
    output = tmp_path / "run"
    process = _start([*FINETUNE, "--steps", "200", "--checkpoint-every", "10"], output)
    _wait_for_checkpoint(process, output)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / "weights.safetensors").exists()  # it really died mid-run
    assert main(["finetune", "--resume", str(output), "--no-progress"]) == 0
    _same_tensors(output / "weights.safetensors", uninterrupted / "weights.safetensors")
    summary = json.loads((output / "summary.json").read_text())
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] > 0
    assert summary["history"] == reference["history"]  # losses of every step, before and after the kill
    assert not (output / "checkpoints").exists()  # a completed run keeps its weights, not its checkpoints


def test_sigterm_checkpoints_and_stops_and_a_corrupt_checkpoint_falls_back(uninterrupted, tmp_path):
    output = tmp_path / "run"
    process = _start([*FINETUNE, "--steps", "200", "--checkpoint-every", "5", "--keep-checkpoints", "3"], output)
    _wait_for_checkpoint(process, output, minimum=2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "SIGTERM at step" in stderr and "--resume" in stderr
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"].startswith("interrupted at step")
    checkpoints = sorted((output / "checkpoints").glob("step-*.safetensors"))
    assert 2 <= len(checkpoints) <= 3  # keep-last-K
    newest = checkpoints[-1]
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the tensors
    newest.write_bytes(bytes(data))
    with pytest.warns(ResumeWarning, match="checksum"):
        assert main(["finetune", "--resume", str(output), "--no-progress"]) == 0
    _same_tensors(output / "weights.safetensors", uninterrupted / "weights.safetensors")


def test_resume_refuses_other_settings_and_folders_without_checkpoints(uninterrupted, tmp_path, capsys):
    assert main(["finetune", "--resume", str(uninterrupted), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(uninterrupted)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(tmp_path)]) == 2
    assert "not a metazo run folder" in capsys.readouterr().err


def test_newer_checkpoint_schema_is_refused(tmp_path):
    save_run_checkpoint(tmp_path, "finetune", 3, {"w": torch.ones(2)}, {"step": 3}, keep=2)
    path = next((tmp_path / "checkpoints").iterdir())
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata["schema_version"] = "99"
    write_safetensors_atomic(path, tensors, metadata)
    with pytest.raises(MetazoError, match="no usable checkpoint.*newer than this metazo"):
        load_run_checkpoint(tmp_path, "finetune")


def test_a_full_disk_leaves_no_partial_file_and_says_so(tmp_path, monkeypatch):
    import metazo.checkpoints as checkpoints

    path = tmp_path / "policy.safetensors"
    write_safetensors_atomic(path, {"w": torch.ones(3)}, {})
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    with pytest.raises(MetazoError, match="disk is full"):
        write_safetensors_atomic(path, {"w": torch.zeros(3)}, {})
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["policy.safetensors"]  # no temporary file left


def test_not_enough_disk_space_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr("metazo.resume.shutil.disk_usage", lambda path: usage._replace(free=1024))
    output = tmp_path / "run"
    assert main([*FINETUNE, "--steps", "3", "--output", str(output)]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not output.exists()


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main([*FINETUNE, "--steps", "3", "--output", str(blocker / "run")]) == 2
    assert "cannot create output folder" in capsys.readouterr().err


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_loss(task, monkeypatch):
    model, tokenizer = tiny()
    reference_scorer, batch = scorer_and_batch(model, tokenizer, task, n=8, micro_batch_size=2)
    expected = reference_scorer.loss(batch)
    scorer, _ = scorer_and_batch(model, tokenizer, task, n=8)
    real = scorer.label_logits

    def limited(part):
        if len(part) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(part)

    monkeypatch.setattr(scorer, "label_logits", limited)
    with pytest.warns(UserWarning, match="out of memory.*micro-batch 4"):
        loss = scorer.loss(batch)
    assert scorer.micro_batch_size == 2
    assert torch.equal(loss, expected)  # gradient accumulation keeps the effective batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no new warning: the smaller size is kept
        assert scorer.evaluate(task.test[:8])["loss"] > 0


def test_out_of_memory_at_micro_batch_one_is_a_clear_error(task, monkeypatch):
    model, tokenizer = tiny()
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=2)

    def never(part):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(scorer, "label_logits", never)
    with pytest.warns(UserWarning), pytest.raises(MetazoError, match="out of memory with a micro-batch of 1"):
        scorer.loss(batch)


META_TRAIN = ["meta-train", "--model", "tiny-llama", "--tasks", "rotten-tomatoes,sms-spam", "--steps", "6", "--horizon", "2",
              "--batch", "4", "--max-train", "64", "--probe-every", "3", "--heldout-task", "none", "--device", "cpu",
              "--no-progress"]


def test_meta_train_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    reference, output = _reference_and_killed(META_TRAIN, tmp_path, checkpoint_every=2)
    assert not (output / "policy.safetensors").exists()
    assert main(["meta-train", "--resume", str(output), "--no-progress"]) == 0
    _same_tensors(output / "policy.safetensors", reference / "policy.safetensors")
    resumed, uninterrupted = (json.loads((folder / "summary.json").read_text()) for folder in (output, reference))
    assert [row["meta_loss"] for row in resumed["history"]] == [row["meta_loss"] for row in uninterrupted["history"]]
    assert resumed["probes"] == uninterrupted["probes"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_losses_are_float32_so_their_difference_cannot_overflow(task, dtype):
    """The engine takes L+ - L- of Python floats (float64) from losses the scorer accumulates in float32."""
    model, tokenizer = tiny(dtype=dtype)
    scorer, batch = scorer_and_batch(model, tokenizer, task, n=4, micro_batch_size=2)
    assert scorer.loss(batch).dtype == torch.float32


def test_a_killed_run_resumes_across_ranks(tmp_path):
    """Direction parallel equals one process bitwise, so a run killed alone and resumed by torchrun on 2
    ranks (every rank loads the checkpoint, rank 0 writes) must end as an uninterrupted single process."""
    run = [*FINETUNE, "--steps", "60", "--directions", "2", "--parallel", "directions", "--eps", "1e-2", "--lr", "1e-3"]
    reference, output = _reference_and_killed(run, tmp_path, checkpoint_every=5)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "-m", "metazo", "finetune", "--resume", str(output), "--no-progress",
                             "--dist-timeout", "60"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks (gloo), directions" in result.stdout
    _same_tensors(output / "weights.safetensors", reference / "weights.safetensors")


@pytest.mark.parametrize("extra", [
    ["--sampler", "ar1-zo", "--mode", "lora", "--lr", "1e-3", "--eps", "1e-2"],  # adapters, a per-step atom schedule
    ["--sampler", "zo-act", "--sampler-option", "rank=4"],                       # calibrated bases in the model
], ids=["ar1-zo-lora", "zo-act"])
def test_stateful_samplers_and_lora_resume_bitwise(tmp_path, extra):
    run = [*FINETUNE, "--steps", "80", *extra]
    reference, output = _reference_and_killed(run, tmp_path, checkpoint_every=5)
    assert main(["finetune", "--resume", str(output), "--no-progress"]) == 0
    _same_tensors(output / "weights.safetensors", reference / "weights.safetensors")
