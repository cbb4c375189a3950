"""A small fine-tuning loop built from the engine: the library behind ``metazo finetune``.

Order of work: load and validate everything (model, task, label words, settings) before the run
folder is created, so a bad input leaves nothing behind; then zero-shot evaluation on held-out
data, ZO steps with periodic dev evaluation, final held-out evaluation, weights and summary.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from metazo.blocks import model_blocks
from metazo.checkpoints import WEIGHTS_FILE, copy_into_model, load_tensors, load_weights, read_weights_info, save_weights
from metazo.distributed import PARALLEL_MODES, Distributed, all_reduce_bytes, describe, gradient_bytes, run_device
from metazo.engine import ZeroOrderOptimizer, scheduled_lr
from metazo.errors import MetazoError, RunInterrupted
from metazo.lora import DEFAULT_TARGETS, add_lora
from metazo.models import load_model
from metazo.resume import (CONFIG_FILE, StopSignals, check_free_space, checkpoint_after_step, load_run_checkpoint,
                           remove_run_checkpoints, save_run_checkpoint)
from metazo.runtime.memory import read_peak_memory, reset_peak_memory
from metazo.samplers import SAMPLERS, make_sampler, mix_seed
from metazo.scoring import Scorer
from metazo.tasks import Example, get_task
from metazo.tracking import NullTracker, Tracker, create_run_dir, write_json_atomic

MODES = ("full", "lora")
BATCH_DEPENDENT_SAMPLERS = ("agzo",)  # directions depend on the scored batch: not shardable
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
    checkpoint_every: int = 50  # steps between run checkpoints (and on SIGINT/SIGTERM); 0 = only on a signal
    keep_checkpoints: int = 2
    output: str | None = None
    overwrite: bool = False
    progress: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)  # user files: columns, label words, template
    parallel: str = "data"  # across ranks (metazo.distributed): split each batch ("data") or the q directions

    def validate(self) -> None:
        if self.steps <= 0:
            raise MetazoError(f"steps must be > 0, got {self.steps}")
        if self.batch_size <= 0:
            raise MetazoError(f"batch size must be > 0, got {self.batch_size}")
        if self.eval_every < 0:
            raise MetazoError(f"eval-every must be >= 0, got {self.eval_every}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise MetazoError(f"checkpoint-every must be >= 0 and keep-checkpoints >= 1, got {self.checkpoint_every} and {self.keep_checkpoints}")
        if self.mode not in MODES:
            raise MetazoError(f"unknown mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        if self.parallel not in PARALLEL_MODES:
            raise MetazoError(f"unknown parallel mode '{self.parallel}'; choose one of: {', '.join(PARALLEL_MODES)}")
        scheduled_lr(self.lr, 0, self.steps, self.schedule)
        make_sampler(self.sampler, **self.sampler_options)

    def validate_ranks(self, world_size: int) -> None:
        """What a run across ``world_size`` ranks needs on top of :meth:`validate`."""
        if self.parallel == "data" and self.batch_size < world_size:
            raise MetazoError(f"data parallel splits each batch over the ranks: --batch {self.batch_size} is smaller "
                              f"than {world_size} ranks")
        if self.parallel == "directions" and self.num_directions < world_size:
            raise MetazoError(f"direction parallel gives each rank its own directions: --directions {self.num_directions} "
                              f"is fewer than {world_size} ranks")
        if self.parallel == "data" and self.paired:
            raise MetazoError("--paired scores whole batches; with data parallel use --parallel directions or drop --paired")
        if self.parallel == "data" and self.sampler in BATCH_DEPENDENT_SAMPLERS:
            raise MetazoError(f"sampler '{self.sampler}' builds its directions from the batch's activations, which differ "
                              "between the ranks' shards; use --parallel directions")


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
        with torch.random.fork_rng():  # the adapters' random init follows the run's seed: a run is reproducible,
            torch.manual_seed(mix_seed(config.seed, 0x10A))  # and every rank of a distributed run starts alike
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


def finetune(config: FinetuneConfig, model_and_tokenizer=None, comm: Distributed | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run ZO fine-tuning; returns the summary also written to ``<run>/summary.json``.

    With ``resume``, continue the run in ``config.output`` from its newest checkpoint (``resume_config``
    reads its settings). With ``comm`` (``metazo.distributed.init_distributed``, more than one rank)
    every rank runs this function: ``config.parallel`` "data" splits each batch over the ranks,
    "directions" the q directions; only scalars are exchanged, every rank applies the same update, and
    only rank 0 writes the run folder (a resumed distributed run needs it on a shared file system).
    """
    started = time.time()
    comm = comm if comm is not None and comm.world_size > 1 else None
    if comm is not None:
        config.validate()
        config.validate_ranks(comm.world_size)
        config = replace(config, device=run_device(comm, config.device))
    model, task, scorer, sampler = prepare(config, model_and_tokenizer)
    optimizer = ZeroOrderOptimizer(
        model_blocks(model), sampler, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay,
        num_directions=config.num_directions, schedule=config.schedule, total_steps=config.steps,
        seed=config.seed, max_nonfinite=config.max_nonfinite, model=model,
    )
    test = held_out(task.test, config.eval_examples)
    dev = held_out(task.dev, config.eval_examples)
    evaluate_split = scorer.evaluate if comm is None else lambda examples: comm.evaluate(scorer, examples)
    if comm is not None:  # ranks that start apart would never meet: a cheap fingerprint of the weights
        comm.check_same(sum(float(b.param.detach().double().sum()) for b in optimizer.blocks), "the initial weights")
    main = comm is None or comm.is_main
    state: dict[str, Any] = {"step": 0, "train_losses": [], "history": [], "elapsed_s": 0.0}
    run_dir = Path(config.output or default_run_name(config))
    if resume:
        checkpoint = load_run_checkpoint(run_dir, "finetune")
        copy_into_model(model, checkpoint.tensors, checkpoint.path)
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        state = checkpoint.state
    elif main:
        run_dir = create_run_dir(run_dir, config.overwrite)
    start = state["step"]
    tracker = Tracker(run_dir, config.steps, config.progress, start_step=start) if main else NullTracker()
    summary: dict[str, Any] = {"config": asdict(config), "run_dir": str(run_dir), "task_source": task.source}
    step = start
    try:
        if main:
            write_json_atomic(run_dir / CONFIG_FILE, asdict(config))
            trained_bytes = sum(b.param.numel() * b.param.element_size() for b in optimizer.blocks)
            check_free_space(run_dir, trained_bytes * (config.keep_checkpoints + 2))

        def checkpoint(at: int) -> None:
            state.update(step=at, optimizer=optimizer.state_dict(), elapsed_s=elapsed + time.time() - started)
            if main:
                tensors = {b.name: b.param for b in optimizer.blocks} | sampler.checkpoint_tensors(model)
                save_run_checkpoint(run_dir, "finetune", at, tensors, state, config.keep_checkpoints)

        elapsed = state["elapsed_s"]
        if comm is not None:
            summary["distributed"] = distributed_info(comm, config, optimizer)
            tracker.message(describe(summary["distributed"]))
            tracker.scalars(0, {"dist/ddp_bytes_sent": summary["distributed"]["ddp_bytes_sent_per_step"]})
        if start == 0:
            zero_shot = evaluate_split(test)
            tracker.scalars(0, {"test/loss": zero_shot["loss"], "test/accuracy": zero_shot["accuracy"]})
            tracker.message(f"zero-shot on {len(test)} held-out examples: accuracy {zero_shot['accuracy']:.3f}, loss {zero_shot['loss']:.4f}")
            state["zero_shot"] = zero_shot
        else:
            tracker.message(f"resumed {run_dir} at step {start} of {config.steps}")
        summary["zero_shot"] = state["zero_shot"]
        train_losses, history = state["train_losses"], state["history"]  # history: (forward passes so far, train loss)
        step_times = []
        per_step = forward_passes(optimizer, 1)
        reset_peak_memory(scorer.device)
        # Across ranks a signal could reach them between different steps; they stop as torchrun stops them,
        # and resume from the last periodic checkpoint.
        with StopSignals(active=comm is None) as signals:
            for step in range(start + 1, config.steps + 1):
                examples = training_batch(task.train, step - 1, config.batch_size, config.seed)
                sent = comm.bytes_sent if comm is not None else 0
                tick = time.perf_counter()
                result = distributed_step(optimizer, scorer, examples, comm, config.parallel, config.paired)
                step_time = time.perf_counter() - tick
                step_times.append(step_time)
                if result.skipped:
                    tracker.message(f"step {step}: non-finite loss, update skipped ({optimizer.nonfinite_total} so far)")
                else:
                    train_losses.append(result.loss)
                history.append((per_step * step, result.loss))
                tracker.scalars(step, {
                    "train/loss": result.loss, "train/projected_grad": result.projected_grad,
                    "train/lr": result.lr, "train/step_time_s": step_time, **sampler.diagnostics(),
                    **({"dist/bytes_sent": comm.bytes_sent - sent} if comm is not None else {}),
                })
                tracker.advance(result.loss)
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    metrics = evaluate_split(dev)
                    tracker.scalars(step, {"dev/loss": metrics["loss"], "dev/accuracy": metrics["accuracy"]})
                checkpoint_after_step(step, config.steps, config.checkpoint_every, signals, checkpoint,
                                      f"metazo finetune --resume {run_dir}")
        peak_memory = read_peak_memory(scorer.device)
        final = evaluate_split(test)
        tracker.scalars(config.steps, {"test/loss": final["loss"], "test/accuracy": final["accuracy"]})
        if main:
            save_weights(run_dir / WEIGHTS_FILE, optimizer.blocks, checkpoint_info(config), sampler.checkpoint_tensors(model))
        if comm is not None:
            summary["distributed"]["bytes_sent_total"] = comm.bytes_sent
        window = train_losses[-max(1, len(train_losses) // 10):] if train_losses else [float("nan")]
        summary.update(
            status="completed", final=final, steps=config.steps, skipped_steps=optimizer.nonfinite_total,
            first_train_loss=train_losses[0] if train_losses else None,
            final_train_loss=sum(window) / len(window), forward_passes=forward_passes(optimizer, config.steps),
            peak_memory_bytes=peak_memory, history=history, optimizer=optimizer.state_dict(),
            step_time_s=sum(step_times[1:] or step_times) / len(step_times[1:] or step_times),  # the first warms up
            resumed_from_step=start or None,
        )
    except BaseException as error:
        tracker.close()
        if not main:
            raise
        if step <= 1 and not resume:  # nothing worth keeping: leave no half-written folder
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        status = "interrupted" if isinstance(error, RunInterrupted) else "failed"
        summary.update(status=f"{status} at step {step}: {error}" if str(error) else f"{status} at step {step}: {type(error).__name__}")
        summary["wall_time_s"] = time.time() - started
        write_json_atomic(run_dir / "summary.json", summary)
        raise
    tracker.close()
    summary["wall_time_s"] = elapsed + time.time() - started
    if main:
        remove_run_checkpoints(run_dir)  # the weights file is the run's result now
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


def resume_config(run_dir: str | Path, **overrides: Any) -> FinetuneConfig:
    """The settings of the run in ``run_dir`` (its config.json), for ``finetune(..., resume=True)``."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise MetazoError(f"{run_dir} is not a metazo run folder (no {CONFIG_FILE})")
    try:
        saved = json.loads(path.read_text())
        config = FinetuneConfig(**{**saved, "lora_targets": tuple(saved["lora_targets"]), **overrides, "output": str(run_dir)})
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise MetazoError(f"{path} is not a fine-tuning run's settings ({error})") from None
    return config


def distributed_step(optimizer: ZeroOrderOptimizer, scorer: Scorer, examples: Sequence[Example],
                     comm: Distributed | None, parallel: str, paired: bool = False):
    """One ZO step over ``examples`` (the whole batch of the step), alone or as one of the ranks;
    ``paired``: both signs of a direction in one forward (``Scorer.paired_loss``)."""
    if comm is None:
        batch = scorer.encode(examples)
        return optimizer.step(lambda: scorer.loss(batch), paired_closure=(lambda: scorer.paired_loss(batch)) if paired else None)
    if parallel == "data":  # this rank's shard at the same +/- state; the mean over all shards decides
        shard = scorer.encode(comm.shard(examples))
        return optimizer.step(lambda: comm.mean_loss(scorer.loss_sum(shard), len(shard)))
    batch = scorer.encode(examples)  # directions: the whole batch, this rank's directions
    seed_of = partial(optimizer.direction_seed, optimizer.step_count)
    return optimizer.step(lambda: scorer.loss(batch), directions=comm.directions(optimizer.num_directions),
                          exchange=lambda local: comm.exchange_estimates(local, optimizer.num_directions, seed_of),
                          paired_closure=(lambda: scorer.paired_loss(batch)) if paired else None)


def distributed_info(comm: Distributed, config: FinetuneConfig, optimizer: ZeroOrderOptimizer) -> dict[str, Any]:
    """The run's layout and what DDP would send per step for the same trained tensors."""
    trained = [b.param for b in optimizer.blocks if optimizer.sampler.active(b)]
    one_sided = optimizer.sampler.one_sided
    if config.parallel == "data":  # per forward pass one (sum, count) pair of float64
        exchanged = 16 * passes_per_step(one_sided, config.num_directions)
    else:  # per rank ceil(q/W) rows of 4 float64 (direction, L+, L-, c)
        exchanged = 32 * -(-config.num_directions // comm.world_size)
    grad_bytes = gradient_bytes(trained)
    return {"world_size": comm.world_size, "backend": comm.backend, "parallel": config.parallel,
            "timeout_s": comm.timeout_s, "bytes_sent_per_step": (comm.world_size - 1) * exchanged,
            "ddp_gradient_bytes": grad_bytes, "ddp_bytes_sent_per_step": all_reduce_bytes(grad_bytes, comm.world_size)}


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
