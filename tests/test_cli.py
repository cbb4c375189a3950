"""`metazo` end to end on tiny models, and every bad input a user can cause: one line, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from metazo.cli import main

TINY_RUN = ["--model", "tiny-llama", "--task", "rotten-tomatoes", "--eval-examples", "16", "--no-progress"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_finetune_then_eval_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune", *TINY_RUN, "--steps", "4", "--eval-every", "2", "--output", str(run))
    assert code == 0, err
    assert "held-out accuracy: zero-shot" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["forward_passes"] == 8
    assert list(run.glob("events.out.tfevents.*"))
    with safe_open(str(run / "weights.safetensors"), framework="pt") as f:
        assert "model.embed_tokens.weight" in f.keys()
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(run), "--task", "rotten-tomatoes", "--limit", "16", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["accuracy"] == pytest.approx(summary["final"]["accuracy"])
    assert result["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


def test_lora_run_saves_adapters_only_and_reloads(tmp_path, capsys):
    run = tmp_path / "lora"
    code, _, err = run_cli(capsys, "finetune", *TINY_RUN, "--mode", "lora", "--lr", "1e-2", "--eps", "1e-2",
                           "--steps", "3", "--eval-every", "0", "--output", str(run))
    assert code == 0, err
    with safe_open(str(run / "weights.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
    summary = json.loads((run / "summary.json").read_text())
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(run), "--task", "rotten-tomatoes", "--limit", "16", "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


def test_existing_output_folder_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "finetune", *TINY_RUN, "--steps", "1", "--output", str(run))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (run / "keep.txt").exists()
    code, _, err = run_cli(capsys, "finetune", *TINY_RUN, "--steps", "1", "--eval-every", "0", "--output", str(run), "--overwrite")
    assert code == 0, err
    assert not (run / "keep.txt").exists() and (run / "summary.json").exists()


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("case", ["unknown-model", "unknown-task", "missing-file", "no-column", "empty",
                                  "multi-token-word", "zero-steps", "zero-batch"])
def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path, capsys, case):
    good_csv = write_csv(tmp_path / "good.csv", "text,label", ["nice film,pos", "dull film,neg"] * 10)
    args = {
        "unknown-model": (["--model", "no-such-model"], ["no-such-model"]),
        "unknown-task": (["--task", "no-such-task"], ["no-such-task"]),
        "missing-file": (["--task", str(tmp_path / "absent.jsonl")], ["absent.jsonl"]),
        "no-column": (["--task", str(good_csv), "--text-column", "review", "--label-words", "pos=great,neg=terrible"], ["review"]),
        "empty": (["--task", str(write_csv(tmp_path / "empty.csv", "text,label", [])), "--label-words", "pos=great,neg=terrible"], []),
        "multi-token-word": (["--task", str(good_csv), "--label-words", "pos=extraordinarily-wonderful,neg=terrible"], ["extraordinarily-wonderful"]),
        "zero-steps": (["--steps", "0"], ["steps"]),
        "zero-batch": (["--batch", "0"], ["batch"]),
    }[case]
    extra, fragments = args
    run = tmp_path / "run"
    base = ["--model", "tiny-llama", "--task", "rotten-tomatoes", "--steps", "2", "--no-progress", "--output", str(run)]
    code, _, err = run_cli(capsys, "finetune", *base, *extra)
    assert_one_line_error(code, err, *fragments)
    assert not run.exists()


def test_non_finite_loss_stops_the_run_with_a_clear_message(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", *TINY_RUN, "--dtype", "float16", "--lr", "1e30", "--steps", "20",
                           "--eval-every", "0", "--output", str(run))
    assert code == 2
    assert "not finite" in err and "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("failed")


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "metazo", "eval", "--checkpoint", str(tmp_path / "nothing"),
                             "--task", "rotten-tomatoes"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no checkpoint" in result.stderr


def test_tasks_and_models_lists(capsys):
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and "rotten-tomatoes" in out and "trec" in out
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "tiny-llama" in out


@pytest.mark.parametrize("sampler,extra", [
    ("lowrank", ["--sampler-option", "rank=2"]), ("agzo", []), ("zo-act", ["--sampler-option", "rank=4"]),
    ("ar1-zo", ["--mode", "lora", "--lr", "1e-3", "--eps", "1e-2"]),
])
def test_every_sampler_fine_tunes_and_its_checkpoint_reloads(tmp_path, capsys, sampler, extra):
    run = tmp_path / sampler
    code, _, err = run_cli(capsys, "finetune", *TINY_RUN, "--sampler", sampler, *extra, "--lr", "1e-3",
                           "--steps", "3", "--eval-every", "0", "--output", str(run))
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["forward_passes"] == 6  # two-point: 2 per step; one-sided AGZO: 1 base + 1 perturbed
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(run), "--task", "rotten-tomatoes", "--limit", "16", "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


@pytest.mark.parametrize("extra,fragments", [
    (["--sampler", "ar1-zo"], ["ar1-zo", "--mode lora"]),
    (["--sampler", "lowrank", "--sampler-option", "rank=100000"], ["rank"]),
    (["--sampler", "gaussian", "--sampler-option", "rank=2"], ["gaussian"]),
    (["--sampler", "lowrank", "--sampler-option", "rank"], ["KEY=VALUE"]),
])
def test_bad_sampler_settings_are_one_line(tmp_path, capsys, extra, fragments):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", *TINY_RUN, "--steps", "2", "--output", str(run), *extra)
    assert_one_line_error(code, err, *fragments)
    assert not run.exists()
