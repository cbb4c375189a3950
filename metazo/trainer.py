"""A small fine-tuning loop built from the engine: the library behind ``metazo finetune``.

Order of work: load and validate everything (model, task, label words, settings) before the run
folder is created, so a bad input leaves nothing behind; then zero-shot evaluation on held-out
data, ZO steps with periodic dev evaluation, final held-out evaluation, weights and summary.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from metazo.blocks import model_blocks
from metazo.checkpoints import WEIGHTS_FILE, load_tensors, load_weights, read_weights_info, save_weights
from metazo.engine import ZeroOrderOptimizer, scheduled_lr
from metazo.errors import MetazoError
from metazo.lora import DEFAULT_TARGETS, add_lora
from metazo.models import load_model
from metazo.runtime.memory import read_peak_memory, reset_peak_memory
from metazo.samplers import SAMPLERS, make_sampler, mix_seed
from metazo.scoring import Scorer
from metazo.tasks import Example, get_task
from metazo.tracking import Tracker, create_run_dir, write_json_atomic

MODES = ("full", "lora")
RUNS_DIR = Path("artifacts/runs")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; saved in the run's summary."""

    model: str = "smollm2-135m"
    task: str = "rotten-tomatoes"
    sampler: str = "gaussian"
    sampler_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"rank": 4} for low-rank samplers
    mode: str = "full"
    steps: int = 150
    lr: float = 5e-5
    eps: float = 1e-3
    batch_size: int = 16
    micro_batch_size: int | None = None
    paired: bool = False  # score both signs in one forward over [batch || batch] (two-point samplers)
    num_directions: int = 1
    schedule: str = "constant"
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 50
    eval_examples: int | None = 400
    dtype: str = "float32"
    device: str = "auto"
    max_length: int = 256
    max_train: int | None = 1000
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    max_nonfinite: int = 5
    output: str | None = None
    overwrite: bool = False
    progress: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)  # user files: columns, label words, template

    def validate(self) -> None:
        if self.steps <= 0:
            raise MetazoError(f"steps must be > 0, got {self.steps}")
        if self.batch_size <= 0:
            raise MetazoError(f"batch size must be > 0, got {self.batch_size}")
        if self.eval_every < 0:
            raise MetazoError(f"eval-every must be >= 0, got {self.eval_every}")
        if self.mode not in MODES:
            raise MetazoError(f"unknown mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        scheduled_lr(self.lr, 0, self.steps, self.schedule)
        make_sampler(self.sampler, **self.sampler_options)


def training_batch(train: Sequence[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The examples of ``step``: consecutive slices of seeded per-epoch shuffles (a pure function
    of step and seed, so a resumed run sees the same data)."""
    n = len(train)
    start = step * batch_size
    batch = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n)
        order = _epoch_order(n, seed, epoch)
        batch.append(train[order[offset]])
    return batch


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        order = list(range(n))
        random.Random(mix_seed(seed, epoch)).shuffle(order)
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = order
    return _ORDER_CACHE[key]


def prepare(config: FinetuneConfig, model_and_tokenizer=None):
    """Model (with LoRA if asked, reparametrised if the sampler wants), task, scorer and sampler:
    everything that can fail on bad input, before anything is written."""
    config.validate()
    sampler = make_sampler(config.sampler, run_seed=config.seed, **config.sampler_options)
    if sampler.requires_mode not in (None, config.mode):
        raise MetazoError(f"sampler '{sampler.name}' works in {sampler.requires_mode} mode only; pass --mode {sampler.requires_mode}")
    task = get_task(config.task, max_train=config.max_train, **config.task_options)
    model, tokenizer = model_and_tokenizer or load_model(config.model, dtype=config.dtype, device=config.device)
    label_ids = task.label_token_ids(tokenizer)
    if config.mode == "lora":
        add_lora(model, config.lora_rank, config.lora_alpha, tuple(config.lora_targets))
    scorer = Scorer(model, tokenizer, label_ids, max_length=config.max_length, micro_batch_size=config.micro_batch_size)

    def calibrate(n_examples: int) -> None:
        with torch.inference_mode():
            examples = task.train[:n_examples]
            for start in range(0, len(examples), config.batch_size):
                scorer.loss(scorer.encode(examples[start:start + config.batch_size]))

    sampler.prepare_model(model, calibrate)
    return model, task, scorer, sampler


def held_out(examples: Sequence[Example], limit: int | None) -> Sequence[Example]:
    return examples[:limit] if limit else examples


def finetune(config: FinetuneConfig, model_and_tokenizer=None) -> dict[str, Any]:
    """Run ZO fine-tuning; returns the summary also written to ``<run>/summary.json``."""
    started = time.time()
    model, task, scorer, sampler = prepare(config, model_and_tokenizer)
    optimizer = ZeroOrderOptimizer(
        model_blocks(model), sampler, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay,
        num_directions=config.num_directions, schedule=config.schedule, total_steps=config.steps,
        seed=config.seed, max_nonfinite=config.max_nonfinite, model=model,
    )
    test = held_out(task.test, config.eval_examples)
    dev = held_out(task.dev, config.eval_examples)
    run_dir = create_run_dir(Path(config.output or default_run_name(config)), config.overwrite)
    tracker = Tracker(run_dir, config.steps, config.progress)
    summary: dict[str, Any] = {"config": asdict(config), "run_dir": str(run_dir), "task_source": task.source}
    step = 0
    try:
        zero_shot = scorer.evaluate(test)
        tracker.scalars(0, {"test/loss": zero_shot["loss"], "test/accuracy": zero_shot["accuracy"]})
        tracker.message(f"zero-shot on {len(test)} held-out examples: accuracy {zero_shot['accuracy']:.3f}, loss {zero_shot['loss']:.4f}")
        summary["zero_shot"] = zero_shot
        train_losses = []
        history = []  # (forward passes so far, train loss) per step
        per_step = forward_passes(optimizer, 1)
        reset_peak_memory(scorer.device)
        for step in range(1, config.steps + 1):
            batch = scorer.encode(training_batch(task.train, step - 1, config.batch_size, config.seed))
            tick = time.perf_counter()
            paired = (lambda: scorer.paired_loss(batch)) if config.paired else None
            result = optimizer.step(lambda: scorer.loss(batch), paired_closure=paired)
            step_time = time.perf_counter() - tick
            if result.skipped:
                tracker.message(f"step {step}: non-finite loss, update skipped ({optimizer.nonfinite_total} so far)")
            else:
                train_losses.append(result.loss)
            history.append((per_step * step, result.loss))
            tracker.scalars(step, {
                "train/loss": result.loss, "train/projected_grad": result.projected_grad,
                "train/lr": result.lr, "train/step_time_s": step_time, **sampler.diagnostics(),
            })
            tracker.advance(result.loss)
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                metrics = scorer.evaluate(dev)
                tracker.scalars(step, {"dev/loss": metrics["loss"], "dev/accuracy": metrics["accuracy"]})
        peak_memory = read_peak_memory(scorer.device)
        final = scorer.evaluate(test)
        tracker.scalars(config.steps, {"test/loss": final["loss"], "test/accuracy": final["accuracy"]})
        save_weights(run_dir / WEIGHTS_FILE, optimizer.blocks, checkpoint_info(config), sampler.checkpoint_tensors(model))
        window = train_losses[-max(1, len(train_losses) // 10):] if train_losses else [float("nan")]
        summary.update(
            status="completed", final=final, steps=config.steps, skipped_steps=optimizer.nonfinite_total,
            first_train_loss=train_losses[0] if train_losses else None,
            final_train_loss=sum(window) / len(window), forward_passes=forward_passes(optimizer, config.steps),
            peak_memory_bytes=peak_memory, history=history, optimizer=optimizer.state_dict(),
        )
    except BaseException as error:
        tracker.close()
        if step <= 1:  # nothing worth keeping: leave no half-written folder
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        summary.update(status=f"failed at step {step}: {error}" if str(error) else f"failed at step {step}: {type(error).__name__}")
        summary["wall_time_s"] = time.time() - started
        write_json_atomic(run_dir / "summary.json", summary)
        raise
    tracker.close()
    summary["wall_time_s"] = time.time() - started
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def passes_per_step(one_sided: bool, num_directions: int) -> int:
    """Forward passes of one step: 2 per direction, or 1 per direction plus the shared base pass."""
    return num_directions + 1 if one_sided else 2 * num_directions


def forward_passes(optimizer: ZeroOrderOptimizer, steps: int) -> int:
    return passes_per_step(optimizer.sampler.one_sided, optimizer.num_directions) * steps


def checkpoint_info(config: FinetuneConfig) -> dict[str, Any]:
    info = {"model": config.model, "mode": config.mode, "task": config.task, "dtype": config.dtype,
            "sampler": config.sampler, "sampler_options": config.sampler_options}
    if config.mode == "lora":
        info.update(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_targets=list(config.lora_targets))
    return info


def default_run_name(config: FinetuneConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{Path(config.model).name}-{Path(config.task).stem}-{config.sampler}-{config.mode}-{stamp}"
    return str(RUNS_DIR / name)


def evaluate(
    model_name: str | None, task_spec: str, *, checkpoint: str | None = None, split: str = "test",
    limit: int | None = None, dtype: str = "float32", device: str = "auto", batch_size: int = 32,
    max_length: int = 256, task_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Loss and accuracy of a model (zero-shot, or with a saved checkpoint) on a task split."""
    info = read_weights_info(Path(checkpoint)) if checkpoint else {}
    model_name = model_name or info.get("model")
    if model_name is None:
        raise MetazoError("give --model (or a --checkpoint that names its model)")
    if info and info.get("model") != model_name:
        raise MetazoError(f"checkpoint {checkpoint} was trained on '{info.get('model')}', not '{model_name}'")
    if split not in ("train", "dev", "test"):
        raise MetazoError(f"unknown split '{split}'; choose train, dev or test")
    task = get_task(task_spec, **(task_options or {}))
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    label_ids = task.label_token_ids(tokenizer)
    if info.get("mode") == "lora":
        add_lora(model, int(info["lora_rank"]), float(info["lora_alpha"]), tuple(info["lora_targets"]))
    if checkpoint:
        sampler_class = SAMPLERS.get(info.get("sampler", "gaussian"))
        if sampler_class is None:
            raise MetazoError(f"checkpoint {checkpoint} was trained with sampler '{info.get('sampler')}', unknown to this metazo")
        sampler_class.restore_model(model, load_tensors(Path(checkpoint)), info.get("sampler_options", {}))
        load_weights(model, Path(checkpoint))
    scorer = Scorer(model, tokenizer, label_ids, max_length=max_length)
    examples = held_out(getattr(task, split), limit)
    return {"model": model_name, "task": task.name, "split": split, "examples": len(examples),
            "checkpoint": checkpoint, **scorer.evaluate(examples, batch_size)}
