"""Run checkpoints: everything a run needs to continue where it stopped, bitwise.

``<run>/checkpoints/step-000040.safetensors`` holds the run's tensors (the trained weights or
adapters and a sampler's buffers; for meta-training also the policy, the meta-optimizer's moments
and the trajectory's momentum) and, as JSON metadata, its state (step, engine and sampler state,
counters, the history so far). Nothing else is needed: directions are regenerated from the seed and
the step, and a step's batch is a pure function of the step (``metazo.trainer.training_batch``).

Files are written atomically with a checksum (``metazo.checkpoints``); the newest ``keep`` are kept.
On resume the newest checkpoint that reads back whole is used; a corrupt or partial one is skipped
with a warning. SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption) end the current step, write a
checkpoint and stop the run; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from metazo import __version__
from metazo.checkpoints import checked_schema_version, read_checked_tensors, safetensors_header, write_safetensors_atomic
from metazo.errors import MetazoError, RunInterrupted

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
FORMAT = "metazo-run-checkpoint"
SCHEMA_VERSION = 1


class ResumeWarning(UserWarning):
    """A checkpoint could not be used and an older one was taken instead."""


@dataclass
class RunCheckpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.safetensors"


def save_run_checkpoint(run_dir: Path, kind: str, step: int, tensors: dict[str, torch.Tensor],
                        state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep``."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "kind": kind, "step": str(step),
                "metazo_version": __version__, "state": json.dumps(state, sort_keys=True)}
    path = write_safetensors_atomic(checkpoint_path(run_dir, step), tensors, metadata)
    for old in sorted(folder.glob("step-*.safetensors"))[: -max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def read_run_checkpoint(path: Path, kind: str) -> RunCheckpoint:
    """One checkpoint file, fully checked: header, format, schema version, state, checksum."""
    path = Path(path)
    metadata = safetensors_header(path).get("__metadata__", {})
    checked_schema_version(path, metadata, FORMAT, SCHEMA_VERSION, "run checkpoint")
    try:
        step = int(metadata.get("step", ""))
    except ValueError:
        raise MetazoError(f"{path}: checkpoint step {metadata.get('step')!r} is not a number") from None
    if step < 0:
        raise MetazoError(f"{path}: checkpoint step {step} is not valid")
    if metadata.get("kind") != kind:
        raise MetazoError(f"{path} is a {metadata.get('kind')!r} checkpoint, not a {kind!r} one")
    try:
        state = json.loads(metadata.get("state", ""))
    except (json.JSONDecodeError, RecursionError):
        raise MetazoError(f"{path}: checkpoint state is not valid JSON") from None
    if not isinstance(state, dict) or state.get("step") != step:
        raise MetazoError(f"{path}: checkpoint state is malformed")
    tensors, _ = read_checked_tensors(path)
    return RunCheckpoint(path, step, tensors, state)


def load_run_checkpoint(run_dir: Path, kind: str) -> RunCheckpoint:
    """The newest usable checkpoint of a run; older ones stand in for corrupt ones, with a warning."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    candidates = sorted(folder.glob("step-*.safetensors"), reverse=True) if folder.is_dir() else []
    if not candidates:
        raise MetazoError(f"{run_dir} has no checkpoint to resume from (a completed run keeps none)")
    problems = []
    for path in candidates:
        try:
            checkpoint = read_run_checkpoint(path, kind)
        except MetazoError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            warnings.warn(f"skipped a checkpoint that cannot be used: {problem}; resuming from {path.name}", ResumeWarning, stacklevel=2)
        return checkpoint
    raise MetazoError(f"no usable checkpoint in {folder}: {problems[0]}")


def checkpoint_after_step(step: int, total_steps: int, every: int, signals: "StopSignals",
                          checkpoint: Callable[[int], None], resume_command: str) -> None:
    """The end of a training loop's step: a checkpoint if a signal came (then RunInterrupted, saying how
    to continue) or if ``every`` steps have passed; none after the last step, whose result is final."""
    if step >= total_steps:
        return
    if signals.received:
        checkpoint(step)
        raise RunInterrupted(f"{signals.received} at step {step}: checkpoint written; continue with `{resume_command}`")
    if every and step % every == 0:
        checkpoint(step)


def remove_run_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / CHECKPOINT_DIR, ignore_errors=True)


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start a run whose outputs cannot fit on the disk (checked, not reserved)."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise MetazoError(f"not enough disk space in {folder}: the run's checkpoints and weights need about "
                          f"{needed_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free space, "
                          "choose another --output, or lower --keep-checkpoints")


class StopSignals:
    """While active, SIGINT and SIGTERM only set ``received``; the training loop checks it between
    steps. A second SIGINT raises KeyboardInterrupt at once. Outside the main thread, or with
    ``active=False``, it does nothing."""

    def __init__(self, active: bool = True):
        self.active = active
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if self.active and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
