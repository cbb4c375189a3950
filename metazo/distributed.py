"""ZO across processes (torchrun): ranks exchange loss scalars and agree on seeds, never gradients.

Every rank can regenerate any direction from its seed, so a step needs only the losses: in data
parallel each rank scores its shard of the batch at the same +/- state and the per-rank loss sums
are exchanged; in direction parallel each rank scores its own directions on the whole batch and the
estimates' scalars are exchanged. Then every rank applies the same update by seed replay.

Every exchange is an ``all_gather`` of a few float64 numbers, combined in rank order on every rank:
unlike an all-reduce, whose summation order may depend on the algorithm, this gives all ranks the
same bits, so the weights stay bitwise identical without ever being compared or broadcast. Decisions
(skip a non-finite step, stop) are taken from the exchanged numbers, so every rank takes the same.

A rank that dies or stops answering: the others' next collective fails (at the latest after the
process group's timeout) and becomes a :class:`DistributedError` naming the rank, instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from metazo.errors import MetazoError

if TYPE_CHECKING:
    from metazo.engine import Estimate
    from metazo.scoring import Scorer

BACKENDS = ("gloo", "nccl")
PARALLEL_MODES = ("data", "directions")
DEFAULT_TIMEOUT_S = 600.0  # long enough for rank 0's evaluations, short enough not to hang a job for long


class DistributedError(MetazoError):
    """A collective failed: another rank died, raised, or did not answer within the timeout."""


def launched_by_torchrun() -> bool:
    """True when the environment names more than one rank (torchrun, or WORLD_SIZE/RANK set by hand)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Distributed:
    """This process's place in the group, the exchanges it makes, and the bytes they cost.

    ``bytes_sent`` counts what this rank puts on the network: an all_gather of k bytes per rank
    sends (W-1) k from each rank (ring or direct, either way every other rank needs its k bytes).
    """

    rank: int
    world_size: int
    local_rank: int = 0
    backend: str = "gloo"
    timeout_s: float = DEFAULT_TIMEOUT_S
    bytes_sent: int = 0
    collectives: int = 0
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"), repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` as a (world_size, k) float64 CPU tensor, row r from rank r."""
        import torch.distributed as dist

        local = torch.as_tensor(values, dtype=torch.float64).reshape(-1).to(self._device)
        rows = [torch.empty_like(local) for _ in range(self.world_size)]
        try:
            dist.all_gather(rows, local)
        except (RuntimeError, dist.DistError) as error:  # DistBackendError and gloo's errors are RuntimeErrors
            raise DistributedError(
                f"rank {self.rank}: lost contact with the other ranks ({_first_line(error)}); another rank "
                f"failed or did not answer within {self.timeout_s:g} s; see its output above"
            ) from None
        self.bytes_sent += (self.world_size - 1) * local.numel() * local.element_size()
        self.collectives += 1
        return torch.stack(rows).cpu()

    def sum_in_rank_order(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``values`` (float64), added in rank order: the same bits on every rank."""
        rows = self.gather(values)
        total = rows[0].clone()
        for row in rows[1:]:
            total += row
        return total

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        return bool(self.gather([float(flag)]).sum() > 0)

    def check_same(self, value: float, what: str) -> None:
        """Stop on every rank when the ranks disagree about ``value`` (e.g. a fingerprint of the weights)."""
        values = self.gather([value])[:, 0]
        if not torch.equal(values, values[:1].expand_as(values)):
            raise MetazoError(f"the ranks disagree about {what} ({values.tolist()}); every rank must start from the "
                              "same model, data and settings")

    def shard(self, items: Sequence) -> Sequence:
        """This rank's contiguous part of ``items`` (the first ranks take one more when it does not divide)."""
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return items[start:start + size + (self.rank < extra)]

    def directions(self, num_directions: int) -> list[int]:
        """The directions this rank scores: r, r + W, r + 2W, ..."""
        return list(range(self.rank, num_directions, self.world_size))

    def mean_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over ranks of each tensor (e.g. the policy's meta-gradients), sent as one flat float64
        vector and summed in rank order; returned in the tensors' own dtypes and devices."""
        flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
        mean = self.sum_in_rank_order(flat) / self.world_size
        out, offset = [], 0
        for t in tensors:
            out.append(mean[offset:offset + t.numel()].view_as(t).to(t.dtype).to(t.device))
            offset += t.numel()
        return out

    def mean_loss(self, loss_sum: torch.Tensor | float, count: int) -> float:
        """Data parallel: the batch mean from every rank's loss sum over its shard. A NaN on one rank
        is a NaN on all, so every rank skips (or stops) the same."""
        total, examples = self.sum_in_rank_order([float(loss_sum), float(count)]).tolist()
        return total / examples

    def exchange_estimates(self, local: Sequence["Estimate"], num_directions: int,
                           seed_of: Callable[[int], int]) -> list["Estimate"]:
        """Direction parallel: every rank's estimates (direction, L+, L-, c), all q in direction order;
        seeds are rebuilt from the direction index (``seed_of``), so only 4 numbers per direction travel."""
        from metazo.engine import Estimate

        per_rank = -(-num_directions // self.world_size)
        rows = torch.full((per_rank, 4), -1.0, dtype=torch.float64)
        for row, e in zip(rows, local):
            row[:] = torch.tensor([e.direction, e.loss_plus, e.loss_minus, e.projected_grad], dtype=torch.float64)
        gathered = self.gather(rows).view(-1, 4)
        by_direction = {int(r[0]): r.tolist() for r in gathered if r[0] >= 0}
        if sorted(by_direction) != list(range(num_directions)):
            raise DistributedError(f"rank {self.rank}: the ranks scored directions {sorted(by_direction)}, "
                                   f"not 0..{num_directions - 1}; all ranks must run with the same --directions")
        return [Estimate(seed_of(d), by_direction[d][1], by_direction[d][2], by_direction[d][3], d)
                for d in range(num_directions)]

    def evaluate(self, scorer: "Scorer", examples: Sequence, batch_size: int = 32) -> dict[str, float]:
        """``Scorer.evaluate`` with the examples split over the ranks; the same result on every rank."""
        part = self.shard(examples)
        result = scorer.evaluate(part, batch_size) if part else {"loss": 0.0, "accuracy": 0.0}
        loss_sum, correct, count = self.sum_in_rank_order(
            [result["loss"] * len(part), result["accuracy"] * len(part), len(part)]).tolist()
        return {"loss": loss_sum / count, "accuracy": round(correct) / count}

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> Distributed:
    """Join the process group that torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): gloo on CPU, nccl when CUDA is available, unless ``backend`` says."""
    import torch.distributed as dist

    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise MetazoError(f"--distributed needs the torchrun environment ({', '.join(missing)} not set); launch with "
                          "`torchrun --nproc_per_node N -m metazo ...`")
    if not dist.is_available():
        raise MetazoError("this PyTorch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in BACKENDS:
        raise MetazoError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    timeout_s = float(os.environ.get("METAZO_DIST_TIMEOUT", DEFAULT_TIMEOUT_S) if timeout_s is None else timeout_s)
    if not timeout_s > 0:
        raise MetazoError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise MetazoError("the nccl backend needs CUDA GPUs; use --backend gloo on CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, dist.DistError) as error:
            raise DistributedError(f"rank {rank}: cannot join the process group ({_first_line(error)})") from None
    return Distributed(rank, world_size, local_rank, backend, timeout_s, _device=device)


def run_device(comm: Distributed | None, device: str) -> str:
    """The device a rank runs on: with nccl, 'auto' and 'cuda' become this rank's GPU (cuda:LOCAL_RANK)."""
    if comm is not None and comm.backend == "nccl" and device in ("auto", "cuda"):
        return f"cuda:{comm.local_rank}"
    return device


def all_reduce_bytes(num_bytes: int, world_size: int) -> int:
    """What one rank sends in a ring all-reduce of ``num_bytes`` (DDP's gradient bucket): 2 (W-1)/W of it."""
    return 2 * (world_size - 1) * num_bytes // world_size


def gradient_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The size of a gradient of ``tensors`` in their own dtypes: what DDP all-reduces every step."""
    return sum(t.numel() * t.element_size() for t in tensors)


def describe(info: dict) -> str:
    """One line on a run's ranks and its traffic against DDP's (``info``: a summary's "distributed")."""
    line = (f"{info['world_size']} ranks ({info['backend']}), {info.get('parallel', 'meta-training')}: "
            f"{info['bytes_sent_per_step']} bytes sent per rank per step; DDP would all-reduce a "
            f"{info['ddp_gradient_bytes'] / 2**20:.2f} MiB gradient, sending {info['ddp_bytes_sent_per_step'] / 2**20:.2f} MiB "
            f"per rank per step")
    return line


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
