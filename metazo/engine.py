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

    def _may_read_trained(self, args: tuple, kwargs: dict) -> bool:
        """False for the common case, an operation that reads no trained tensor (cheap: id lookups;
        lists and tuples are looked into by the caller)."""
        blocks = self.blocks
        return any(id(a) in blocks or type(a) in (list, tuple) for a in args) or any(
            id(v) in blocks or type(v) in (list, tuple) for v in kwargs.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._may_read_trained(args, kwargs):
            return func(*args, **kwargs)
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


class PairedView(PerturbedView):
    """Both signs in ONE forward over [batch || batch]: the first half of the batch reads theta + eps*u,
    the second half theta - eps*u (arXiv 2605.28760's batched scoring).

    Each direction's noise is generated once for both signs. An operation that reads a trained tensor
    runs once per half, except a linear layer under a low-rank sampler (one exposing ``factors``):
    that runs once over the whole doubled batch on the shared base weights, plus the rank-r
    correction +-eps (x V) U^T per half, so no perturbed weight is ever built. The batch size of the
    pair is that of the first operation that reads a trained tensor (the token embedding); an
    operation that reads a trained tensor but no tensor of that batch size is an error, never a
    guess, so a model this cannot split fails loudly and is scored in two passes instead.
    """

    def __init__(self, blocks: Iterable[Block], sampler: Sampler, seed: int, scale: float):
        super().__init__(blocks, sampler, seed, scale)
        self.pair_size: int | None = None
        self.split_any = False
        self.factored = getattr(sampler, "factors", None)

    def perturbed_pair(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        param = block.param.detach()
        plus, minus = torch.empty_like(param), torch.empty_like(param)
        flat = [t if t.dim() else t.view(1) for t in (param, plus, minus)]
        for chunk, rows in chunk_rows(block):
            z = chunk_noise(self.sampler, block, self.seed, chunk, rows).view_as(flat[0][rows])
            torch.add(flat[0][rows], z, alpha=self.scale, out=flat[1][rows])
            torch.add(flat[0][rows], z, alpha=-self.scale, out=flat[2][rows])
        return plus, minus

    def _halves(self, value: Any, func, pairs: dict | None = None) -> tuple[Any, Any]:
        """(what the + half reads, what the - half reads) for one argument of ``func``."""
        pairs = pairs or {}
        if id(value) in pairs:
            return pairs[id(value)]
        if isinstance(value, nn.Parameter):  # a frozen weight: shared by both halves
            return value, value
        if isinstance(value, torch.Tensor):
            # Batch-major: (2B, ...) or flattened (2B * T, ...) as OPT's and GPT-2's layers pass it.
            if value.dim() == 0 or value.shape[0] % self.pair_size:
                raise MetazoError(
                    f"paired scoring: {getattr(func, '__name__', func)} reads a trained tensor and a tensor of "
                    f"shape {tuple(value.shape)}, not one of the paired batch ({self.pair_size} rows): score the "
                    "two signs in separate passes (paired=False)")
            self.split_any = True
            half = value.shape[0] // 2
            return value[:half], value[half:]
        if type(value) in (list, tuple) and any(isinstance(v, torch.Tensor) for v in value):
            parts = [self._halves(v, func, pairs) for v in value]
            return type(value)(p for p, _ in parts), type(value)(m for _, m in parts)
        return value, value

    def _first_batch_dim(self, args: tuple, kwargs: dict) -> int | None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.dim():
                return value.shape[0]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._may_read_trained(args, kwargs):
            return func(*args, **kwargs)
        blocks = self.blocks
        if getattr(func, "__name__", None) == "__get__":
            return func(*args, **kwargs)
        read = [blocks[id(v)] for v in (*args, *kwargs.values()) if id(v) in blocks]
        read += [blocks[id(x)] for v in (*args, *kwargs.values()) if type(v) in (list, tuple) for x in v if id(x) in blocks]
        if not read:
            return func(*args, **kwargs)
        if self.pair_size is None:
            self.pair_size = self._first_batch_dim(args, kwargs)
            if self.pair_size is None or self.pair_size % 2:
                raise MetazoError(f"paired scoring: the first operation reading a trained tensor "
                                  f"({getattr(func, '__name__', func)}) reads no even-sized batch")
        if func is F.linear and self.factored is not None:
            return self._low_rank_linear(*args, **kwargs)
        if func is F.embedding:
            ids = args[0] if args else kwargs.pop("input")
            weight = args[1] if len(args) > 1 else kwargs.pop("weight")
            block = blocks.get(id(weight))
            if block is not None:
                if ids.dim() and ids.shape[0] % 2 == 0:
                    self.pair_size = ids.shape[0]  # a forward starts with its token lookup (micro-batches differ)
                kwargs = {k: v for k, v in kwargs.items() if k != "padding_idx"}
                ids_plus, ids_minus = self._halves(ids, func)
                unique_ids, inverse = torch.unique(torch.cat([ids_plus, ids_minus]), return_inverse=True)
                param = weight.detach()
                z = row_noise(self.sampler, block, self.seed, unique_ids)
                rows = param[unique_ids].float()
                half = ids_plus.numel()
                inverse = inverse.view(-1)
                out = [F.embedding(inv.view_as(i), torch.add(rows, z, alpha=sign * self.scale).to(param.dtype),
                                   None, *args[3:], **kwargs)
                       for inv, i, sign in ((inverse[:half], ids_plus, 1.0), (inverse[half:], ids_minus, -1.0))]
                return torch.cat(out)
        pairs = {id(block.param): self.perturbed_pair(block) for block in read}
        self.split_any = False
        halves = [self._halves(a, func, pairs) for a in args]
        kw_halves = {key: self._halves(value, func, pairs) for key, value in kwargs.items()}
        if not self.split_any:  # e.g. weight.float(): its result would have to carry both signs
            raise MetazoError(f"paired scoring: {getattr(func, '__name__', func)} reads trained tensor "
                              f"{read[0].name} without the batch: score the two signs in separate passes (paired=False)")
        plus = func(*(p for p, _ in halves), **{k: p for k, (p, _) in kw_halves.items()})
        minus = func(*(m for _, m in halves), **{k: m for k, (_, m) in kw_halves.items()})
        return torch.cat([plus, minus])

    def _low_rank_linear(self, input, weight, bias=None):
        """y = x W^T + b over the whole doubled batch, then +-eps (x V) U^T per half: one GEMM on the
        shared base weights and two thin ones, no perturbed copy of W."""
        w_block, b_block = self.blocks.get(id(weight)), self.blocks.get(id(bias)) if bias is not None else None
        if w_block is None or len(w_block.shape) != 2:  # a non-matrix block read by F.linear: the general path
            return self._split_linear(input, weight, bias)
        x_plus, x_minus = self._halves(input, F.linear)
        out = F.linear(input, weight.detach(), None if b_block is not None else bias)
        u, v = self.factored(w_block, self.seed)  # u (out x r, scaled), v (in x r), float32
        half = x_plus.shape[0]
        for part, x, sign in ((out[:half], x_plus, 1.0), (out[half:], x_minus, -1.0)):
            part.add_(F.linear(F.linear(x, v.T.to(x.dtype)), u.to(x.dtype)), alpha=sign * self.scale)
        if b_block is not None:
            b_plus, b_minus = self.perturbed_pair(b_block)
            out[:half] += b_plus
            out[half:] += b_minus
        return out

    def _split_linear(self, input, weight, bias):
        pairs = {id(t): self.perturbed_pair(self.blocks[id(t)]) for t in (weight, bias) if id(t) in self.blocks}
        (x_plus, x_minus), (w_plus, w_minus), (b_plus, b_minus) = (self._halves(t, F.linear, pairs) for t in (input, weight, bias))
        return torch.cat([F.linear(x_plus, w_plus, b_plus), F.linear(x_minus, w_minus, b_minus)])


@dataclass
class Estimate:
    seed: int              # the direction's seed
    loss_plus: float       # L(theta + eps u)
    loss_minus: float      # L(theta - eps u), or L(theta) for a one-sided estimate
    projected_grad: float  # c = (L+ - L-) / (2 eps), or (L+ - L0) / eps
    direction: int = 0     # its index j in the step (seed = direction_seed(step, j))


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
    def estimate(
        self,
        closure: Callable[[], torch.Tensor | float],
        step: int | None = None,
        directions: Iterable[int] | None = None,
        paired_closure: Callable[[], torch.Tensor] | None = None,
    ) -> list[Estimate]:
        """The finite-difference estimates of one step (one per direction), without any update.

        With ``paired_closure`` (two-point samplers only), each direction is scored in ONE forward:
        ``paired_closure()`` scores [batch || batch] under a :class:`PairedView` and returns the two
        halves' losses (``Scorer.paired_loss``); ``closure`` is then not called.

        The direction of an estimate is ``u = block_noise(sampler, block, estimate.seed)`` per
        block, so sum_j c_j u_j / q is the step's gradient estimate (``metazo.diagnostics``).
        ``directions`` (default: all q) scores only those of the step's directions: a process's share
        in direction parallel (``metazo.distributed``).
        """
        step = self.step_count if step is None else step
        self.sampler.begin_step(step)
        base_loss = None
        if self.sampler.one_sided:
            with self.sampler.base_pass():
                base_loss = self._score(closure, None)
        estimates = []
        for direction in range(self.num_directions) if directions is None else directions:
            seed = self.direction_seed(step, direction)
            if paired_closure is not None and base_loss is None:
                with torch.inference_mode(), PairedView(self.blocks, self.sampler, seed, self.eps):
                    losses = paired_closure()
                loss_plus, loss_minus = torch.as_tensor(losses).tolist()  # one read-back for both signs
                estimates.append(Estimate(seed, loss_plus, loss_minus, (loss_plus - loss_minus) / (2 * self.eps)))
                continue
            loss_plus = self._score(closure, self.perturbed(seed, self.eps))
            if base_loss is None:
                loss_minus = self._score(closure, self.perturbed(seed, -self.eps))
                grad = (loss_plus - loss_minus) / (2 * self.eps)
            else:
                loss_minus = base_loss
                grad = (loss_plus - base_loss) / self.eps
            estimates.append(Estimate(seed, loss_plus, loss_minus, grad, direction))
        return estimates

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], torch.Tensor | float],
        directions: Iterable[int] | None = None,
        exchange: Callable[[list[Estimate]], list[Estimate]] | None = None,
        paired_closure: Callable[[], torch.Tensor] | None = None,
    ) -> StepResult:
        """One step. Direction parallel (``metazo.distributed``): score only ``directions``, and let
        ``exchange`` turn this process's estimates into all q of the step, in direction order; the
        rest (non-finite check, sampler state, update by seed replay) is the same on every process.
        ``paired_closure``: see :meth:`estimate`."""
        lr = self.lr
        estimates = self.estimate(closure, directions=directions, paired_closure=paired_closure)
        if exchange is not None:
            estimates = exchange(estimates)
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
        factors = getattr(self.sampler, "factors", None)
        for block in self.blocks:
            if not self.sampler.active(block):
                continue
            param = block.param.detach()
            flat = param if param.dim() else param.view(1)
            decay = self.weight_decay if block.decays else 0.0
            if factors is not None and len(block.shape) == 2 and coefficients and not decay:
                # A low-rank direction: sum_k a_k U_k V_k^T as ONE matmul into the weights, no noise built.
                pairs = [factors(block, seed) for seed, _ in coefficients]
                u = torch.cat([u * a for (u, _), (_, a) in zip(pairs, coefficients)], dim=1).to(param.dtype)
                v = torch.cat([v for _, v in pairs], dim=1).to(param.dtype)
                param.addmm_(u, v.T, alpha=-lr)
                continue
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
