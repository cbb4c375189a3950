"""The ZO step: seed replay, exact perturbation, update.

A step scores the model at theta + eps*u and theta - eps*u, turns the loss difference into a
projected gradient c = (L+ - L-) / (2 eps), and moves theta by -lr * c * u. The direction u is
regenerated from a seed whenever it is needed (never stored), chunk by chunk.

Exactness: the weights are never written while scoring. MeZO adds +eps*u, -2eps*u, +eps*u in
place; in fp16/bf16 (and, by an ulp, in fp32) that round trip does not restore theta and long runs
drift. Here a :class:`PerturbedView` presents each trained tensor as theta + eps*u only at the
moment an operation reads it, so theta changes only in the update, and a step with lr 0 leaves
every weight bitwise identical. The view materialises one tensor at a time (an embedding table
only for the rows a batch reads), so peak memory stays that of inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from metazo.blocks import Block, model_blocks
from metazo.errors import MetazoError
from metazo.samplers import Sampler, chunk_noise, chunk_rows, make_sampler, mix_seed, row_noise

SCHEDULES = ("constant", "linear", "cosine")


class NonFiniteLossError(MetazoError):
    """Raised after too many steps in a row whose loss was NaN or infinite."""


def scheduled_lr(base_lr: float, step: int, total_steps: int | None, schedule: str, warmup_steps: int = 0) -> float:
    """Learning rate at ``step`` (0-based) for a constant, linear-decay or cosine-decay schedule."""
    if schedule not in SCHEDULES:
        raise MetazoError(f"unknown lr schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class PerturbedView(TorchFunctionMode):
    """While active, every operation that reads a trained tensor reads theta + scale * u instead.

    ``F.embedding`` of a trained table gathers the perturbed rows it needs and nothing else; the
    scorer reads the LM head's label rows through ``F.embedding`` for the same reason.
    """

    def __init__(self, blocks: Iterable[Block], sampler: Sampler, seed: int, scale: float):
        super().__init__()
        self.blocks = {id(block.param): block for block in blocks if sampler.active(block)}
        self.sampler = sampler
        self.seed = seed
        self.scale = scale

    def perturbed(self, block: Block) -> torch.Tensor:
        param = block.param.detach()
        out = torch.empty_like(param)
        flat_out, flat_param = (out, param) if param.dim() else (out.view(1), param.view(1))
        for chunk, rows in chunk_rows(block):
            z = chunk_noise(self.sampler, block, self.seed, chunk, rows)
            # One pass: the add runs in float32 (the type promotion of theta and z) and rounds once into
            # the output's dtype, as (theta.float() + scale * z).to(dtype) would, without the two copies.
            torch.add(flat_param[rows], z.view_as(flat_param[rows]), alpha=self.scale, out=flat_out[rows])
        return out

    def perturbed_rows(self, block: Block, row_ids: torch.Tensor) -> torch.Tensor:
        param = block.param.detach()
        z = row_noise(self.sampler, block, self.seed, row_ids)
        return torch.add(param[row_ids].float(), z, alpha=self.scale).to(param.dtype)

    def _swap(self, value: Any) -> Any:
        # Every operation of every forward passes through here, so this is kept cheap: a dict lookup
        # by id (a trained tensor is alive, so no other live object shares its id) instead of
        # isinstance(value, nn.Parameter), whose metaclass check runs Python code.
        block = self.blocks.get(id(value))
        if block is not None:
            return self.perturbed(block)
        if type(value) in (list, tuple) and any(id(v) in self.blocks for v in value):
            return type(value)(self._swap(v) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        blocks = self.blocks
        if not any(id(a) in blocks or type(a) in (list, tuple) for a in args) and not any(
            id(v) in blocks or type(v) in (list, tuple) for v in kwargs.values()
        ):
            return func(*args, **kwargs)  # the common case: the operation reads no trained tensor
        if getattr(func, "__name__", None) == "__get__":  # attribute reads (.shape, .dtype): no copy
            return func(*args, **kwargs)
        if func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            block = self.blocks.get(id(weight))
            if block is not None:
                ids = args[0] if args else kwargs.pop("input")
                kwargs = {k: v for k, v in kwargs.items() if k not in ("weight", "padding_idx")}
                unique_ids, inverse = torch.unique(ids, return_inverse=True)
                # padding_idx only affects gradients, and the compact table has no such row.
                return F.embedding(inverse, self.perturbed_rows(block, unique_ids), None, *args[3:], **kwargs)
        args = tuple(self._swap(a) for a in args)
        kwargs = {k: self._swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@dataclass
class Estimate:
    seed: int              # the direction's seed
    loss_plus: float       # L(theta + eps u)
    loss_minus: float      # L(theta - eps u), or L(theta) for a one-sided estimate
    projected_grad: float  # c = (L+ - L-) / (2 eps), or (L+ - L0) / eps


@dataclass
class StepResult:
    loss: float            # loss at theta: mean of L+ and L- (two-point) or the base pass (one-sided)
    loss_plus: float
    loss_minus: float
    projected_grad: float  # mean over directions of the finite-difference estimate c
    lr: float
    skipped: bool          # True when a loss was non-finite and no update was made


class ZeroOrderOptimizer:
    """A zeroth-order optimizer with the feel of ``torch.optim``.

    >>> opt = ZeroOrderOptimizer(model, sampler="gaussian", lr=1e-6, eps=1e-3)
    >>> result = opt.step(lambda: scorer.loss(batch))

    ``params`` is a model or its blocks (``metazo.blocks.model_blocks``); samplers that hook
    layers (AGZO) need the model, passed as ``model=`` when blocks are given.

    ``closure`` returns the loss at whatever parameter state is active when it runs; it is called
    2q times per step (q = ``num_directions``), or q + 1 times for a one-sided sampler. For gradient
    accumulation let the closure score its batch in micro-batches (``Scorer.loss`` does).

    Update (MeZO): theta <- theta - lr * ((1/q) sum_j c_j u_j + weight_decay * theta), weight decay
    only on blocks with ``decays`` (not norms, not biases).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Block],
        sampler: str | Sampler = "gaussian",
        *,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        num_directions: int = 1,
        schedule: str = "constant",
        total_steps: int | None = None,
        warmup_steps: int = 0,
        seed: int = 0,
        max_nonfinite: int = 5,
        model: nn.Module | None = None,
    ):
        if isinstance(params, nn.Module):
            model = params
        self.blocks = model_blocks(params) if isinstance(params, nn.Module) else list(params)
        if not self.blocks:
            raise MetazoError("nothing to train: the model has no trainable tensors")
        if not eps > 0:
            raise MetazoError(f"eps must be positive, got {eps}")
        if lr < 0:
            raise MetazoError(f"lr must be >= 0, got {lr}")
        if num_directions < 1:
            raise MetazoError(f"num_directions must be >= 1, got {num_directions}")
        scheduled_lr(lr, 0, total_steps, schedule)  # validates the schedule name
        self.sampler = make_sampler(sampler) if isinstance(sampler, str) else sampler
        self.sampler.bind(self.blocks, model)
        self.base_lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.num_directions, self.schedule = num_directions, schedule
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.seed, self.max_nonfinite = seed, max_nonfinite
        self.step_count = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0

    @property
    def lr(self) -> float:
        return scheduled_lr(self.base_lr, self.step_count, self.total_steps, self.schedule, self.warmup_steps)

    def direction_seed(self, step: int, direction: int) -> int:
        return mix_seed(self.seed, step, direction)

    def perturbed(self, seed: int, scale: float) -> PerturbedView:
        """The model as theta + scale * u(seed), for the duration of a ``with`` block."""
        return PerturbedView(self.blocks, self.sampler, seed, scale)

    def _score(self, closure: Callable[[], torch.Tensor | float], view: PerturbedView | None) -> float:
        with torch.inference_mode():
            if view is None:
                return float(closure())
            with view:
                return float(closure())

    @torch.no_grad()
    def estimate(self, closure: Callable[[], torch.Tensor | float], step: int | None = None) -> list[Estimate]:
        """The finite-difference estimates of one step (one per direction), without any update.

        The direction of an estimate is ``u = block_noise(sampler, block, estimate.seed)`` per
        block, so sum_j c_j u_j / q is the step's gradient estimate (``metazo.diagnostics``).
        """
        step = self.step_count if step is None else step
        self.sampler.begin_step(step)
        base_loss = None
        if self.sampler.one_sided:
            with self.sampler.base_pass():
                base_loss = self._score(closure, None)
        estimates = []
        for direction in range(self.num_directions):
            seed = self.direction_seed(step, direction)
            loss_plus = self._score(closure, self.perturbed(seed, self.eps))
            if base_loss is None:
                loss_minus = self._score(closure, self.perturbed(seed, -self.eps))
                grad = (loss_plus - loss_minus) / (2 * self.eps)
            else:
                loss_minus = base_loss
                grad = (loss_plus - base_loss) / self.eps
            estimates.append(Estimate(seed, loss_plus, loss_minus, grad))
        return estimates

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float]) -> StepResult:
        lr = self.lr
        estimates = self.estimate(closure)
        self.step_count += 1
        count = len(estimates)
        plus = sum(e.loss_plus for e in estimates) / count
        minus = sum(e.loss_minus for e in estimates) / count
        mean_grad = sum(e.projected_grad for e in estimates) / count
        loss = minus if self.sampler.one_sided else (plus + minus) / 2
        if not all(math.isfinite(v) for e in estimates for v in (e.loss_plus, e.loss_minus, e.projected_grad)):
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= self.max_nonfinite:
                raise NonFiniteLossError(
                    f"the loss was not finite for {self.nonfinite_in_row} steps in a row (step {self.step_count}); "
                    "lower the learning rate or eps, or use --dtype float32"
                )
            return StepResult(loss, plus, minus, mean_grad, lr, skipped=True)
        self.nonfinite_in_row = 0
        for e in estimates:
            self.sampler.observe(e.loss_plus, e.loss_minus, e.projected_grad)
        self.update([(e.seed, e.projected_grad / count) for e in estimates], lr)
        return StepResult(loss, plus, minus, mean_grad, lr, skipped=False)

    @torch.no_grad()
    def update(self, coefficients: list[tuple[int, float]], lr: float) -> None:
        """theta <- theta - lr * (sum_k a_k u(seed_k) + weight_decay * theta), chunk by chunk."""
        if lr == 0:
            return
        for block in self.blocks:
            if not self.sampler.active(block):
                continue
            param = block.param.detach()
            flat = param if param.dim() else param.view(1)
            decay = self.weight_decay if block.decays else 0.0
            for chunk, rows in chunk_rows(block):
                delta = None
                for seed, coefficient in coefficients:
                    z = chunk_noise(self.sampler, block, seed, chunk, rows)
                    delta = z.mul_(coefficient) if delta is None else delta.add_(z, alpha=coefficient)
                if delta is not None and not decay:
                    # In place in one pass: float32 arithmetic rounded once into the weights' dtype,
                    # the same as the general path below without its copies.
                    flat[rows].sub_(delta.view_as(flat[rows]), alpha=lr)
                    continue
                current = flat[rows].float()
                if delta is None:  # weight decay alone
                    delta = torch.zeros_like(current)
                if decay:
                    delta = delta.view_as(current).add_(current, alpha=decay)
                flat[rows] = current.sub_(delta.view_as(current), alpha=lr).to(param.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "seed": self.seed,
            "base_lr": self.base_lr,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "num_directions": self.num_directions,
            "schedule": self.schedule,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "sampler": {"name": self.sampler.name, "state": self.sampler.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sampler"]["name"] != self.sampler.name:
            raise MetazoError(
                f"optimizer state is for sampler '{state['sampler']['name']}', not '{self.sampler.name}'"
            )
        self.step_count = int(state["step"])
        self.seed = int(state["seed"])
        self.base_lr, self.eps = float(state["base_lr"]), float(state["eps"])
        self.weight_decay = float(state["weight_decay"])
        self.num_directions = int(state["num_directions"])
        self.schedule = state["schedule"]
        self.total_steps, self.warmup_steps = state["total_steps"], int(state["warmup_steps"])
        self.nonfinite_in_row = int(state["nonfinite_in_row"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.sampler.load_state_dict(state["sampler"]["state"])
