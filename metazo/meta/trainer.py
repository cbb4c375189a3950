"""Meta-training: learn a perturbation policy across a distribution of tasks (the outer loop).

Each meta-step draws a task from the mixture (``metazo.meta.mixture``) and, with the default horizon 1
(the paper's one-step lookahead):

1. the policy gives sigma per block; a two-point ZO estimate c is taken along u = nf sigma z at the
   current weights theta (the engine's ``estimate``, the deployment sampler itself);
2. the lookahead meta-loss L(theta - lr_update c u) on the same batch (``metazo.meta.objective``) is
   differentiated in the policy's weights and the meta-optimizer steps;
3. theta moves along a trajectory so the policy sees the states of real fine-tuning runs: first-order
   SGD with momentum (the paper's), ZO steps with the current policy, or none; and every
   ``reset_every`` meta-steps theta returns to its initial weights (the paper's resets), the
   trajectory lr decaying linearly within each period. The first-order trajectory uses the gradient
   at theta' that the meta-loss's backward computes anyway (theta' is one lookahead step of size
   lr_update from theta), instead of a second backward at theta.

A one-step lookahead is greedy: it rewards putting the perturbation where this step's loss falls
most, and cannot see the noise that such a policy piles up over many steps (the short-horizon bias
of learned optimizers). With ``horizon`` K > 1 a meta-step instead takes K real ZO steps of the
policy at lr_update (they are the trajectory), then scores the model on a fresh batch of the same
task and differentiates that loss in the sigma of all K steps, the c's held constant as in the
paper. One backward serves K steps; the noise of every step is regenerated from its seed.

Across ranks (torchrun, ``metazo.distributed``) every rank takes its own task and batches per
meta-step and its own model trajectory; the policy's meta-gradients are averaged over the ranks (the
policy is small) and non-finite steps are agreed on, so every rank keeps the same policy, bitwise.
Only rank 0 writes the run folder and the policy file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from metazo.blocks import Block, model_blocks
from metazo.diagnostics import cosine, estimated_gradient, expected_cosine, true_gradient
from metazo.distributed import Distributed, run_device
from metazo.engine import SCHEDULES, Estimate, ZeroOrderOptimizer, scheduled_lr
from metazo.errors import MetazoError, RunInterrupted
from metazo.meta.mixture import check_mixture, parse_mixture, task_for_step
from metazo.meta.objective import loss_at, lookahead_parameters
from metazo.models import load_model
from metazo.policy import PerturbationPolicy, PolicyConfig, normalizer
from metazo.resume import (CONFIG_FILE, StopSignals, check_free_space, checkpoint_after_step, load_run_checkpoint,
                           remove_run_checkpoints, save_run_checkpoint)
from metazo.runtime.memory import read_peak_memory, reset_peak_memory
from metazo.samplers import LearnedSampler, mix_seed
from metazo.scoring import Scorer
from metazo.tasks import Task, get_task
from metazo.tracking import NullTracker, Tracker, create_run_dir, write_json_atomic
from metazo.trainer import training_batch

TRAJECTORIES = ("first-order", "zo", "none")
META_OPTIMIZERS = ("adam", "sgd")
DEFAULT_TASKS = "rotten-tomatoes,tweets,sms-spam,trec"
POLICY_FILE = "policy.safetensors"
PROBE_SEED_OFFSET = 1 << 40  # probe directions never reuse a meta-step's seeds


class NonFiniteMetaLossError(MetazoError):
    """Raised after too many meta-steps in a row whose loss or meta-gradient was NaN or infinite."""


@dataclass
class MetaTrainConfig:
    """Everything a meta-training run depends on; saved in its summary and in the policy's card."""

    model: str = "smollm2-135m"
    tasks: str = DEFAULT_TASKS          # mixture: "name[:weight],..."
    steps: int = 4                      # the main job's CPU budget; policies/ was trained with 30
    epochs: float | None = None         # instead of steps: passes over the mixture's training examples
    batch_size: int = 8
    num_directions: int = 1             # q ZO directions per meta-step, their lookahead step averaged
    eps: float = 1e-3
    lr_update: float = 5e-5             # the ZO step size trained for (5e-5 is finetune's lr): the lookahead's,
                                        # and with horizon > 1 that of the unrolled steps
    horizon: int = 10                   # ZO steps unrolled per meta-update; 1 = the paper's one-step lookahead
    meta_optimizer: str = "adam"
    meta_lr: float = 3e-3
    meta_schedule: str = "constant"
    clip: float = 1.0                   # meta-gradient norm clip, 0 = none
    trajectory: str = "zo"              # with horizon 1 the paper uses "first-order"
    trajectory_lr: float = 1e-3
    momentum: float = 0.8
    reset_every: int = 5                # meta-steps between resets of theta, 0 = never
    detach_normalizer: bool = False     # True: nf is a constant in the meta-gradient, as in the paper
    features: str = "scaled"
    sharing: str = "role"
    hidden: int = 64
    sigma_activation: str = "exp"
    log_sigma_bound: float = 3.0
    probe_every: int = 10               # 0 = never; the last meta-step is always probed
    probe_examples: int = 16
    probe_directions: int = 4
    max_train: int | None = 1000
    max_length: int = 256
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    max_nonfinite: int = 5
    checkpoint_every: int = 10          # meta-steps between run checkpoints (and on SIGINT/SIGTERM); 0 = only on a signal
    keep_checkpoints: int = 2
    output: str | None = None
    overwrite: bool = False
    progress: bool = True
    # After meta-training: the policy against MeZO on a task outside the mixture, same budget.
    heldout_task: str | None = None
    heldout_steps: int = 30
    heldout_lr: float = 5e-5
    heldout_batch_size: int = 16
    heldout_eval_examples: int = 200

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(self.features, self.sharing, self.hidden, self.sigma_activation, self.log_sigma_bound)

    def validate(self) -> None:
        if self.steps <= 0:
            raise MetazoError(f"steps must be > 0, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise MetazoError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise MetazoError(f"batch size must be > 0, got {self.batch_size}")
        if self.num_directions < 1:
            raise MetazoError(f"directions must be >= 1, got {self.num_directions}")
        if self.horizon < 1:
            raise MetazoError(f"horizon must be >= 1, got {self.horizon}")
        if self.horizon > 1 and self.trajectory != "zo":
            raise MetazoError(f"a horizon of {self.horizon} unrolls ZO steps of the policy, and those are the trajectory: "
                              "pass --trajectory zo")
        for name in ("eps", "lr_update", "meta_lr"):
            if not getattr(self, name) > 0:
                raise MetazoError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("trajectory_lr", "clip", "reset_every", "probe_every"):
            if getattr(self, name) < 0:
                raise MetazoError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise MetazoError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.trajectory not in TRAJECTORIES:
            raise MetazoError(f"unknown trajectory '{self.trajectory}'; choose one of: {', '.join(TRAJECTORIES)}")
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise MetazoError(f"unknown meta-optimizer '{self.meta_optimizer}'; choose one of: {', '.join(META_OPTIMIZERS)}")
        if self.meta_schedule not in SCHEDULES:
            raise MetazoError(f"unknown meta lr schedule '{self.meta_schedule}'; choose one of: {', '.join(SCHEDULES)}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise MetazoError(f"checkpoint-every must be >= 0 and keep-checkpoints >= 1, got {self.checkpoint_every} and {self.keep_checkpoints}")
        if self.probe_every and (self.probe_examples < 1 or self.probe_directions < 1):
            raise MetazoError("probe examples and probe directions must be >= 1")
        if self.heldout_task and (self.heldout_steps <= 0 or self.heldout_batch_size <= 0):
            raise MetazoError("held-out steps and batch size must be > 0")
        self.policy_config().validate()


@dataclass
class MetaStepResult:
    step: int
    task: str
    loss_plus: float
    loss_minus: float
    projected_grad: float
    meta_loss: float          # L(theta'), the lookahead loss
    improvement: float        # (L+ + L-) / 2 - L(theta'): how much the lookahead step gained
    meta_grad_norm: float     # before clipping
    meta_lr: float
    skipped: bool             # non-finite loss or meta-gradient: nothing was updated
    reset: bool               # theta was reset to its initial weights before this step

    @property
    def zo_loss(self) -> float:
        return (self.loss_plus + self.loss_minus) / 2


class MetaTrainer:
    """The outer loop as an object: ``meta_step()`` does one meta-step (see the module docstring).

    ``scorers`` are one per task of the mixture (their label words differ); ``weights`` their
    sampling weights. The model's trained tensors move along the trajectory; their initial values
    are kept (on the CPU) for the resets. With ``comm`` (more than one rank) this rank draws its own
    tasks, batches and ZO seeds, and the meta-gradient is averaged over the ranks.
    """

    def __init__(self, model: torch.nn.Module, tasks: Sequence[Task], scorers: Sequence[Scorer],
                 config: MetaTrainConfig, weights: Sequence[float] | None = None,
                 policy: PerturbationPolicy | None = None, comm: Distributed | None = None):
        config.validate()
        self.comm = comm if comm is not None and comm.world_size > 1 else None
        self.rank, self.world_size = (self.comm.rank, self.comm.world_size) if self.comm else (0, 1)
        if not tasks:
            raise MetazoError("meta-training needs at least one task")
        check_mixture(tasks, config.batch_size)
        self.model, self.tasks, self.scorers, self.config = model, list(tasks), list(scorers), config
        self.weights = list(weights) if weights is not None else [1.0] * len(tasks)
        self.blocks: list[Block] = model_blocks(model)
        if not self.blocks:
            raise MetazoError("nothing to meta-train on: the model has no trainable tensors")
        self.policy = policy or PerturbationPolicy.for_blocks(self.blocks, config.policy_config(), seed=config.seed)
        self.sampler = LearnedSampler(self.policy)
        # Rank 0 keeps the run's seed (one rank = the single-process run); the others walk their own directions.
        zo_seed = config.seed if self.rank == 0 else mix_seed(config.seed, self.rank, 0xD157)
        self.engine = ZeroOrderOptimizer(self.blocks, self.sampler, lr=0.0, eps=config.eps, seed=zo_seed,
                                         num_directions=config.num_directions, model=model)
        self.numels = self.sampler.numels
        parameters = list(self.policy.parameters())
        if config.meta_optimizer == "adam":
            self.meta_optimizer = torch.optim.Adam(parameters, lr=config.meta_lr)
        else:
            self.meta_optimizer = torch.optim.SGD(parameters, lr=config.meta_lr)
        self.initial = {b.name: b.param.detach().to("cpu", copy=True) for b in self.blocks}
        self.momentum: dict[str, torch.Tensor] = {}
        self.task_steps = [0] * len(tasks)
        self.step_count = 0
        self.zo_step_count = 0  # ZO steps taken (directions' seeds count them)
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        probe_examples = (self.tasks[0].dev or self.tasks[0].train)[: config.probe_examples]
        self.probe_batch = self.scorers[0].encode(probe_examples)

    # -- the model's trajectory ---------------------------------------------------------------------

    @torch.no_grad()
    def reset_model(self) -> None:
        """theta back to its initial weights; the trajectory's momentum and the policy's run memory cleared."""
        for block in self.blocks:
            block.param.copy_(self.initial[block.name].to(block.param.device))
        self.momentum.clear()
        self.sampler.reset_run()

    def trajectory_lr(self, step: int) -> float:
        period = self.config.reset_every or self.config.steps
        return self.config.trajectory_lr * (1.0 - (step % period) / period)

    @torch.no_grad()
    def move_first_order(self, gradients: Sequence[torch.Tensor], lr: float) -> None:
        for block, gradient in zip(self.blocks, gradients):
            buffer = self.momentum.get(block.name)
            if buffer is None:
                buffer = self.momentum[block.name] = gradient.detach().float().clone()
            else:
                buffer.mul_(self.config.momentum).add_(gradient.detach().float())
            block.param.sub_((lr * buffer).to(block.param.dtype))

    # -- one meta-step ------------------------------------------------------------------------------

    def next_batch(self, index: int):
        task, scorer = self.tasks[index], self.scorers[index]
        # Ranks take consecutive batches of the same shuffle: disjoint data, as one bigger batch would be.
        position = self.task_steps[index] * self.world_size + self.rank
        batch = scorer.encode(training_batch(task.train, position, self.config.batch_size, self.config.seed))
        self.task_steps[index] += 1
        return batch

    def differentiable_scales(self) -> torch.Tensor:
        """nf * sigma of the step the sampler just began, with grad into the policy's weights."""
        sigma = self.sampler.sigma(self.sampler.step_features)
        nf = normalizer(sigma, self.numels)
        return sigma.double() * (nf.detach() if self.config.detach_normalizer else nf)

    def meta_step(self) -> MetaStepResult:
        """One meta-update. Horizon 1 (the paper): a ZO estimate at theta, the meta-loss at the lookahead
        theta - lr_update c u on the same batch, then the trajectory moves theta. Horizon K: K real ZO
        steps of the policy at lr_update from theta (they are the trajectory), then the meta-loss on a
        fresh batch of the same task, differentiated in the sigma of all K steps (c held constant)."""
        config, step = self.config, self.step_count
        reset = bool(step and config.reset_every and step % config.reset_every == 0)
        if reset:
            self.reset_model()
        index = task_for_step(self.weights, step * self.world_size + self.rank, config.seed)
        task, scorer = self.tasks[index], self.scorers[index]
        unrolled = config.horizon > 1
        steps: list[tuple[int, float, torch.Tensor]] = []
        first: list[Estimate] = []
        for k in range(config.horizon):
            batch = self.next_batch(index)
            estimates = self.engine.estimate(lambda: scorer.loss(batch), step=self.zo_step_count)
            self.zo_step_count += 1
            first = first or estimates
            scales = self.differentiable_scales()
            q = len(estimates)
            # An applied step enters the meta-loss by its gradient only (see lookahead_parameters).
            steps += [(e.seed, config.lr_update * e.projected_grad / q, scales - scales.detach() if unrolled else scales)
                      for e in estimates]
            if unrolled:
                if not all(math.isfinite(e.projected_grad) for e in estimates):
                    break  # the non-finite check below skips this meta-step
                self.observe(estimates)
                self.engine.update([(e.seed, e.projected_grad / q) for e in estimates], config.lr_update)
        if unrolled:
            batch = self.next_batch(index)
        q = len(first)
        loss_plus = sum(e.loss_plus for e in first) / q
        loss_minus = sum(e.loss_minus for e in first) / q
        projected_grad = sum(e.projected_grad for e in first) / q
        lookahead = lookahead_parameters(self.blocks, steps)
        meta_loss = loss_at(scorer, lookahead, batch)
        policy_parameters = list(self.policy.parameters())
        wrt = policy_parameters + (list(lookahead.values()) if config.trajectory == "first-order" else [])
        gradients = torch.autograd.grad(meta_loss, wrt)
        del lookahead, steps
        policy_gradients, model_gradients = gradients[: len(policy_parameters)], gradients[len(policy_parameters):]
        if self.comm is not None:  # the ranks' mean, the same bits on every rank
            policy_gradients = self.comm.mean_tensors(policy_gradients)
        grad_norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in policy_gradients)))
        meta_loss = float(meta_loss.detach())
        meta_lr = scheduled_lr(config.meta_lr, step, config.steps, config.meta_schedule)
        result = MetaStepResult(step, task.name, loss_plus, loss_minus, projected_grad, meta_loss,
                                (loss_plus + loss_minus) / 2 - meta_loss, grad_norm, meta_lr, skipped=False, reset=reset)
        self.step_count += 1
        finite = all(math.isfinite(v) for v in (loss_plus, loss_minus, projected_grad, meta_loss, grad_norm))
        finite = finite and all(bool(torch.isfinite(g).all()) for g in model_gradients)
        if self.comm is not None:  # a non-finite rank makes every rank skip, so the policies stay equal
            finite = not self.comm.any(not finite)
        if not finite:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= config.max_nonfinite:
                raise NonFiniteMetaLossError(
                    f"the meta-loss or its gradient was not finite for {self.nonfinite_in_row} meta-steps in a row "
                    f"(step {self.step_count}); lower --lr-update, --meta-lr or --trajectory-lr")
            result.skipped = True
            return result
        self.nonfinite_in_row = 0

        for parameter, gradient in zip(policy_parameters, policy_gradients):
            parameter.grad = gradient
        if config.clip and grad_norm > config.clip:
            for parameter in policy_parameters:
                parameter.grad.mul_(config.clip / grad_norm)
        for group in self.meta_optimizer.param_groups:
            group["lr"] = meta_lr
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

        if not unrolled:
            self.observe(first)
            lr = self.trajectory_lr(step)
            if config.trajectory == "first-order":
                self.move_first_order(model_gradients, lr)
            elif config.trajectory == "zo":
                self.engine.update([(e.seed, e.projected_grad / q) for e in first], lr)
        return result

    def observe(self, estimates: Sequence[Estimate]) -> None:
        for e in estimates:
            self.sampler.observe(e.loss_plus, e.loss_minus, e.projected_grad)

    # -- checkpoints (metazo.resume) ----------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON state) that continue meta-training bitwise: the model on its trajectory, the
        policy, the meta-optimizer's moments, the momentum, the counters and the policy's run memory."""
        tensors = {f"model.{b.name}": b.param for b in self.blocks}
        tensors |= {f"policy.{name}": p for name, p in self.policy.named_parameters()}
        tensors |= {f"momentum.{name}": t for name, t in self.momentum.items()}
        optimizer = self.meta_optimizer.state_dict()
        for index, moments in optimizer["state"].items():
            tensors |= {f"meta_optimizer.{index}.{key}": torch.as_tensor(value) for key, value in moments.items()}
        state = {"step_count": self.step_count, "zo_step_count": self.zo_step_count, "task_steps": self.task_steps,
                 "nonfinite_in_row": self.nonfinite_in_row, "nonfinite_total": self.nonfinite_total,
                 "engine": self.engine.state_dict(), "meta_optimizer_groups": optimizer["param_groups"]}
        return tensors, state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        def take(prefix: str) -> dict[str, torch.Tensor]:
            return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}

        model, policy = take("model."), take("policy.")
        if set(model) != {b.name for b in self.blocks} or set(policy) != {n for n, _ in self.policy.named_parameters()}:
            raise MetazoError("the checkpoint is of another model or policy architecture")
        with torch.no_grad():
            for block in self.blocks:
                block.param.copy_(model[block.name])
            for name, parameter in self.policy.named_parameters():
                parameter.copy_(policy[name])
        self.momentum = {name: t.to(self.blocks[0].param.device) for name, t in take("momentum.").items()}
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in take("meta_optimizer.").items():
            index, key = name.split(".", 1)
            moments.setdefault(int(index), {})[key] = tensor
        self.meta_optimizer.load_state_dict({"state": moments, "param_groups": state["meta_optimizer_groups"]})
        self.engine.load_state_dict(state["engine"])
        self.step_count, self.zo_step_count = int(state["step_count"]), int(state["zo_step_count"])
        self.task_steps = [int(n) for n in state["task_steps"]]
        self.nonfinite_in_row, self.nonfinite_total = int(state["nonfinite_in_row"]), int(state["nonfinite_total"])

    # -- what the policy does now -------------------------------------------------------------------

    def current_sigma(self) -> torch.Tensor:
        with torch.no_grad():
            return self.sampler.sigma().float()

    def probe(self) -> dict[str, float]:
        """On the fixed probe batch: the true gradient by autograd, and how well the current policy's
        directions point at it (expected cosine, noise-free), against MeZO's; plus the measured
        cosine of the mean of ``probe_directions`` of the policy's estimates."""
        scorer, batch = self.scorers[0], self.probe_batch
        closure = lambda: scorer.loss(batch)  # noqa: E731
        truth = true_gradient(self.blocks, closure)
        grad_sq = torch.tensor([float(truth[b.name].double().pow(2).sum()) for b in self.blocks], dtype=torch.float64)
        sigma = self.current_sigma().double()
        scales = normalizer(sigma, self.numels) * sigma
        policy_cosine = expected_cosine(scales, grad_sq, self.numels)
        mezo_cosine = expected_cosine(torch.ones_like(scales), grad_sq, self.numels)
        estimate = estimated_gradient(self.engine, closure, self.config.probe_directions,
                                      first_step=PROBE_SEED_OFFSET + self.step_count * self.config.probe_directions)
        return {"expected_cosine": policy_cosine, "expected_cosine_mezo": mezo_cosine,
                "expected_cosine_gain": policy_cosine / mezo_cosine if mezo_cosine else float("nan"),
                "measured_cosine": cosine(estimate, truth)}

    def sigma_by_role(self, sigma: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
        """Mean sigma of each role in the first, middle and last third of the depth."""
        sigma = self.current_sigma() if sigma is None else sigma
        table: dict[str, dict[str, list[float]]] = {}
        for block, value in zip(self.blocks, sigma.tolist()):
            third = "early" if block.depth < 1 / 3 else "middle" if block.depth < 2 / 3 else "late"
            table.setdefault(block.role, {}).setdefault(third, []).append(value)
        return {role: {k: sum(v) / len(v) for k, v in thirds.items()} for role, thirds in table.items()}


# -- the command: load, meta-train, track, save, evaluate on a held-out task ---------------------------


def sigma_figure(blocks: Sequence[Block], sigma: torch.Tensor, title: str):
    """log sigma as an image: roles (rows) by relative depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = sorted({b.role for b in blocks}, key=lambda r: [b.role for b in blocks].index(r))
    depths = sorted({round(b.depth, 4) for b in blocks})
    grid = torch.full((len(roles), len(depths)), float("nan"))
    for block, value in zip(blocks, sigma.tolist()):
        grid[roles.index(block.role), depths.index(round(block.depth, 4))] = math.log(value)
    bound = max(0.1, float(grid.nan_to_num(0).abs().max()))
    figure, axes = plt.subplots(figsize=(max(4.0, 0.25 * len(depths) + 2), 0.35 * len(roles) + 1.2))
    image = axes.imshow(grid.numpy(), aspect="auto", cmap="coolwarm", vmin=-bound, vmax=bound, interpolation="nearest")
    axes.set_yticks(range(len(roles)), roles)
    axes.set_xlabel("relative depth (0 = embeddings / first layer, 1 = last)")
    step = max(1, len(depths) // 8)
    axes.set_xticks(range(0, len(depths), step), [f"{d:.2f}" for d in depths[::step]])
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="log sigma")
    figure.tight_layout()
    return figure


def source_model_card(model_name: str, model: torch.nn.Module, blocks: Sequence[Block]) -> dict[str, Any]:
    config = getattr(model, "config", None)
    roles: dict[str, int] = {}
    for block in blocks:
        roles[block.role] = roles.get(block.role, 0) + 1
    return {"name": model_name, "architecture": getattr(config, "model_type", type(model).__name__),
            "layers": getattr(config, "num_hidden_layers", None), "hidden_size": getattr(config, "hidden_size", None),
            "trained_parameters": sum(b.numel for b in blocks), "blocks": len(blocks), "roles": roles}


def meta_train(config: MetaTrainConfig, model_and_tokenizer=None, comm: Distributed | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Meta-train a policy (and, with ``heldout_task``, test it against MeZO); returns the summary
    also written to ``<output>/summary.json``. The policy is ``<output>/policy.safetensors``. With
    ``resume``, continue the run in ``config.output`` from its newest checkpoint (``resume_meta_config``).

    With ``comm`` (more than one rank) every rank runs this function on its own tasks and batches and
    the meta-gradients are averaged; rank 0 alone writes the folder and the policy, and runs the
    held-out comparison. Such a run writes no checkpoints (each rank's model is on its own trajectory,
    and rank 0's alone could not resume the others)."""
    started = time.time()
    config.validate()
    comm = comm if comm is not None and comm.world_size > 1 else None
    if comm is not None:
        config = dataclasses.replace(config, device=run_device(comm, config.device))
    mixture = parse_mixture(config.tasks)
    tasks = [get_task(entry.spec, max_train=config.max_train) for entry in mixture]
    check_mixture(tasks, config.batch_size)
    heldout = None
    if config.heldout_task:
        if config.heldout_task in {entry.spec for entry in mixture} | {task.name for task in tasks}:
            raise MetazoError(f"held-out task '{config.heldout_task}' is in the meta-training mixture; choose another")
        heldout = get_task(config.heldout_task)
    model, tokenizer = model_and_tokenizer or load_model(config.model, dtype=config.dtype, device=config.device)
    scorers = [Scorer(model, tokenizer, task.label_token_ids(tokenizer), max_length=config.max_length) for task in tasks]
    if heldout is not None:
        heldout.label_token_ids(tokenizer)  # a bad label word fails now, not after meta-training
    if config.epochs is not None:
        examples = sum(len(task.train) for task in tasks)
        config = dataclasses.replace(config, steps=max(1, math.ceil(config.epochs * examples / config.batch_size)))
    trainer = MetaTrainer(model, tasks, scorers, config, weights=[entry.weight for entry in mixture], comm=comm)
    main = comm is None or comm.is_main
    if comm is not None:  # the same policy at the start, or the ranks would average unrelated gradients
        comm.check_same(sum(float(p.detach().double().sum()) for p in trainer.policy.parameters()), "the initial policy")

    results: list[MetaStepResult] = []
    probes: list[dict[str, float]] = []
    run_dir = Path(config.output or default_meta_run_name(config))
    if resume:
        if comm is not None:
            raise MetazoError("a meta-training run across ranks cannot be resumed (it writes no checkpoints); "
                              "resume single-process runs only")
        checkpoint = load_run_checkpoint(run_dir, "meta-train")
        trainer.load_state_dict(checkpoint.tensors, checkpoint.state["trainer"])
        results = [MetaStepResult(**row) for row in checkpoint.state["results"]]
        probes = checkpoint.state["probes"]
    elif main:
        run_dir = create_run_dir(run_dir, config.overwrite)
    start = trainer.step_count
    tracker = Tracker(run_dir, config.steps, config.progress, start_step=start) if main else NullTracker()
    summary: dict[str, Any] = {"config": asdict(config), "run_dir": str(run_dir), "policy": str(run_dir / POLICY_FILE),
                               "tasks": [{"task": e.spec, "weight": e.weight, "train_examples": len(t.train)}
                                         for e, t in zip(mixture, tasks)]}

    def checkpoint(at: int) -> None:
        if comm is not None:
            return
        tensors, state = trainer.state_dict()
        save_run_checkpoint(run_dir, "meta-train", at, tensors, {"step": at, "trainer": state, "probes": probes,
                            "results": [asdict(r) for r in results]}, config.keep_checkpoints)

    step = start
    try:
        if main:
            write_json_atomic(run_dir / CONFIG_FILE, asdict(config))
            checkpoint_bytes = sum(t.numel() * t.element_size() for t in trainer.state_dict()[0].values())
            check_free_space(run_dir, checkpoint_bytes * (config.keep_checkpoints + 1))
        tracker.message(f"meta-training a policy on {config.model} over {len(tasks)} tasks "
                        f"({', '.join(t.name for t in tasks)}), {config.steps} meta-steps"
                        + (f", resumed at meta-step {start}" if start else ""))
        reset_peak_memory(scorers[0].device)
        with StopSignals(active=comm is None) as signals:
            for step in range(start + 1, config.steps + 1):
                tick, sent = time.perf_counter(), comm.bytes_sent if comm is not None else 0
                result = trainer.meta_step()
                elapsed = time.perf_counter() - tick
                results.append(result)
                if result.skipped:
                    tracker.message(f"meta-step {step}: non-finite meta-loss, skipped ({trainer.nonfinite_total} so far)")
                sigma = trainer.sampler.sigma_now
                tracker.scalars(step, {
                    "meta/loss": result.meta_loss, "meta/improvement": result.improvement,
                    "meta/grad_norm": result.meta_grad_norm, "meta/lr": result.meta_lr, "train/zo_loss": result.zo_loss,
                    "train/projected_grad": result.projected_grad, "train/step_time_s": elapsed,
                    **trainer.sampler.diagnostics(), **({"dist/bytes_sent": comm.bytes_sent - sent} if comm else {}),
                })
                if main and config.probe_every and (step % config.probe_every == 0 or step == config.steps):
                    probe = trainer.probe()
                    probes.append({"step": step, **probe})
                    tracker.scalars(step, {f"probe/{k}": v for k, v in probe.items()})
                    for role in sorted({b.role for b in trainer.blocks}):
                        values = torch.tensor([float(s) for b, s in zip(trainer.blocks, sigma) if b.role == role])
                        tracker.histogram(step, f"sigma_histogram/{role}", values)
                    tracker.figure(step, "sigma/role_by_depth", sigma_figure(trainer.blocks, sigma, f"log sigma, meta-step {step}"))
                tracker.advance(result.meta_loss)
                checkpoint_after_step(step, config.steps, config.checkpoint_every, signals, checkpoint,
                                      f"metazo meta-train --resume {run_dir}")
        peak_memory = read_peak_memory(scorers[0].device)
    except BaseException as error:
        tracker.close()
        if not main:
            raise
        if step <= 1 and not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        status = "interrupted" if isinstance(error, RunInterrupted) else "failed"
        summary.update(status=f"{status} at meta-step {step}: {error}" if str(error) else f"{status} at meta-step {step}: {type(error).__name__}",
                       wall_time_s=time.time() - started)
        write_json_atomic(run_dir / "summary.json", summary)
        raise
    tracker.close()

    done = [r for r in results if not r.skipped]
    tail = done[-max(1, len(done) // 10):] if done else []
    metrics = {
        "meta_steps": config.steps, "skipped_steps": trainer.nonfinite_total,
        "meta_loss_last_10pct": _mean([r.meta_loss for r in tail]),
        "improvement_mean": _mean([r.improvement for r in done]),
        "zo_loss_first": done[0].zo_loss if done else None, "zo_loss_last_10pct": _mean([r.zo_loss for r in tail]),
        "peak_memory_bytes": peak_memory, "meta_train_wall_time_s": time.time() - started,
    }
    if probes:
        metrics.update({f"final_probe_{k}": v for k, v in probes[-1].items() if k != "step"})
    if comm is not None:
        policy_bytes = sum(p.numel() for p in trainer.policy.parameters()) * 8  # float64 on the wire
        summary["distributed"] = {"world_size": comm.world_size, "backend": comm.backend, "timeout_s": comm.timeout_s,
                                  "policy_gradient_bytes": policy_bytes,
                                  "bytes_sent_per_meta_step": (comm.world_size - 1) * (policy_bytes + 8),
                                  "bytes_sent_total": comm.bytes_sent}
    if not main:
        summary.update(status="completed", metrics=metrics, history=[asdict(r) for r in results])
        return summary
    card = {
        "source_model": source_model_card(config.model, model, trainer.blocks),
        "tasks": {e.spec: e.weight for e in mixture},
        "training": {k: v for k, v in asdict(config).items()
                     if k not in ("output", "overwrite", "progress", "device", "tasks") and not k.startswith("heldout")},
        "metrics": metrics,
        "sigma_on_source": trainer.sigma_by_role(),
    }
    policy_path = trainer.policy.save_pretrained(run_dir / POLICY_FILE, card)
    summary.update(status="completed", metrics=metrics, probes=probes, sigma_on_source=card["sigma_on_source"],
                   history=[asdict(r) for r in results])
    write_json_atomic(run_dir / "summary.json", summary)

    if heldout is not None:
        del trainer, model, scorers  # the held-out runs load the model afresh, at its initial weights
        summary["heldout"] = evaluate_heldout(config, policy_path, run_dir / "heldout")
        card["heldout"] = [summary["heldout"]]
        PerturbationPolicy.from_pretrained(policy_path).save_pretrained(policy_path, card)
    remove_run_checkpoints(run_dir)  # the policy file is the run's result now
    summary["wall_time_s"] = time.time() - started
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def resume_meta_config(run_dir: str | Path, **overrides: Any) -> MetaTrainConfig:
    """The settings of the meta-training run in ``run_dir`` (its config.json), for ``meta_train(..., resume=True)``."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise MetazoError(f"{run_dir} is not a metazo run folder (no {CONFIG_FILE})")
    try:
        return MetaTrainConfig(**{**json.loads(path.read_text()), **overrides, "output": str(run_dir)})
    except (json.JSONDecodeError, TypeError) as error:
        raise MetazoError(f"{path} is not a meta-training run's settings ({error})") from None


def evaluate_heldout(config: MetaTrainConfig, policy_path: Path, output: Path) -> dict[str, Any]:
    """The policy against MeZO on ``config.heldout_task``: same model, seed, lr, eps, batch and
    forward-pass budget (``metazo.compare``)."""
    from metazo.compare import Contender, compare
    from metazo.trainer import FinetuneConfig

    base = FinetuneConfig(model=config.model, task=config.heldout_task, lr=config.heldout_lr, eps=config.eps,
                          batch_size=config.heldout_batch_size, seed=config.seed, eval_every=0,
                          eval_examples=config.heldout_eval_examples, dtype=config.dtype, device=config.device,
                          max_train=config.max_train, max_length=config.max_length, progress=config.progress)
    contenders = [Contender("mezo", "gaussian", {}, {}),
                  Contender("policy", "learned", {}, {"policy": str(policy_path)})]
    rows = compare(base, contenders, 2 * config.heldout_steps, output, overwrite=True)
    return {"task": config.heldout_task, "forward_passes": 2 * config.heldout_steps, "seed": config.seed,
            "lr": config.heldout_lr, "eps": config.eps, "batch_size": config.heldout_batch_size,
            "eval_examples": config.heldout_eval_examples, "zero_shot_accuracy": rows[0]["zero_shot_accuracy"],
            **{row["sampler"]: {"accuracy": row["heldout_accuracy"], "loss": row["heldout_loss"],
                                "final_train_loss": row["final_train_loss"]} for row in rows}}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def default_meta_run_name(config: MetaTrainConfig) -> str:
    return f"artifacts/meta/{Path(config.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
