"""Does the finite-difference signal of a LoRA query fade as the LoRA rank grows? AR1-ZO vs all atoms.

For each LoRA rank, at two parameter states, many directions u of each sampler are queried on one
fixed training batch, and the script reports:

- signal: the root mean square over directions of the projected gradient c = (L+ - L-) / (2 eps),
  i.e. of the directional derivative the step acts on. The loss difference L+ - L- = 2 eps c has to
  stand above float rounding; ``FD res.`` is the smallest loss difference float32 resolves (one ulp
  of the loss) divided by 2 eps, so signal / FD res. is the signal-to-rounding ratio.
- cos: cosine between the mean of the directions' estimates c u and the true LoRA gradient
  (autograd), over all LoRA coordinates: how well the same number of queries points downhill.

Samplers: AR1-ZO (one atom per step, B's noise x r), AR1-ZO with ``rescale=none`` (one atom, the
usual alpha/r), and the all-atom query (Gaussian noise on every LoRA tensor, as MeZO-LoRA).
States: ``init`` (LoRA's start, B = 0) and ``warm`` (B random, sized so that the adapter's update
(alpha/r) B A has the same size at every rank, as after some training; ``--warm-size`` sets it).

    python scripts/ar1_signal.py                      # SmolLM2-135M (a few minutes on CPU)
    python scripts/ar1_signal.py --model tiny-llama   # seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metazo.blocks import model_blocks  # noqa: E402
from metazo.diagnostics import cosine, true_gradient  # noqa: E402
from metazo.engine import ZeroOrderOptimizer  # noqa: E402
from metazo.lora import add_lora  # noqa: E402
from metazo.models import load_model  # noqa: E402
from metazo.samplers import GaussianSampler, block_noise  # noqa: E402
from metazo.samplers.ar1 import AR1Sampler  # noqa: E402
from metazo.scoring import Scorer  # noqa: E402
from metazo.tasks import get_task  # noqa: E402

SAMPLERS = {
    "AR1-ZO": lambda: AR1Sampler(rescale="rank"),
    "AR1-ZO no rescale": lambda: AR1Sampler(rescale="none"),
    "all-atom": GaussianSampler,
}


def set_warm_state(model, alpha: float, rank: int, size: float, seed: int) -> None:
    """B ~ N(0, tau^2) with tau = size * sqrt(r) / alpha, so each entry of (alpha/r) B A has the
    same spread at every rank: var = (alpha/r)^2 * r * tau^2 * var(A) = size^2 * var(A)."""
    generator = torch.Generator().manual_seed(seed)
    tau = size * math.sqrt(rank) / alpha
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator).mul_(tau).to(param.device))


def query(model, scorer, batch, sampler, directions: int, eps: float, seed: int):
    """(rms of c over the directions, mean estimate sum_j c_j u_j / n as {block name: tensor})."""
    blocks = model_blocks(model)
    optimizer = ZeroOrderOptimizer(blocks, sampler, lr=0.0, eps=eps, seed=seed, model=model)
    closure = lambda: scorer.loss(batch)  # noqa: E731
    mean = {b.name: torch.zeros(b.shape, device=b.param.device) for b in blocks}
    squares = 0.0
    for step in range(directions):
        (estimate,) = optimizer.estimate(closure, step=step)
        squares += estimate.projected_grad ** 2
        for block in blocks:
            mean[block.name].add_(block_noise(sampler, block, estimate.seed), alpha=estimate.projected_grad / directions)
    return math.sqrt(squares / directions), mean


def measure(args) -> list[dict]:
    task = get_task(args.task)
    rows = []
    for rank in args.ranks:
        for state in args.states:
            torch.manual_seed(args.seed)
            model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
            add_lora(model, rank=rank, alpha=args.alpha, targets=tuple(args.targets))
            if state == "warm":
                set_warm_state(model, args.alpha, rank, args.warm_size, args.seed)
            scorer = Scorer(model, tokenizer, task.label_token_ids(tokenizer))
            batch = scorer.encode(task.train[: args.examples])
            blocks = model_blocks(model)
            grad = true_gradient(blocks, lambda: scorer.loss(batch))
            with torch.no_grad():
                loss = scorer.loss(batch).float()
            ulp = float(torch.nextafter(loss, torch.tensor(math.inf, device=loss.device)) - loss)
            row = {"rank": rank, "state": state, "fd_resolution": ulp / (2 * args.eps),
                   "grad_norm": math.sqrt(sum(float(g.pow(2).sum()) for g in grad.values()))}
            for label, make in SAMPLERS.items():
                signal, mean = query(model, scorer, batch, make(), args.directions, args.eps, args.seed)
                row[label] = (signal, cosine(mean, grad))
            rows.append(row)
            print(f"rank {rank} {state}: done", file=sys.stderr)
    return rows


def markdown(rows: list[dict], state: str) -> str:
    labels = list(SAMPLERS)
    header = ["rank"] + [f"{label} signal" for label in labels] + ["FD res."] + [f"cos {label}" for label in labels]
    lines = [f"state: {state}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in (r for r in rows if r["state"] == state):
        cells = [str(row["rank"])] + [f"{row[label][0]:.3g}" for label in labels] + [f"{row['fd_resolution']:.2g}"]
        cells += [f"{row[label][1]:.3f}" for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="rotten-tomatoes")
    parser.add_argument("--ranks", default="4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--targets", default="attn_q,mlp_up", type=lambda s: s.split(","),
                        help="LoRA targets; the default is wide enough for rank 64 even in the tiny models")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--directions", type=int, default=64, help="directions (steps) per sampler, rank and state")
    parser.add_argument("--examples", type=int, default=16, help="examples in the fixed batch")
    parser.add_argument("--eps", type=float, default=1e-2, help="MeZO's LoRA eps")
    parser.add_argument("--states", default="init,warm", type=lambda s: s.split(","), help="init and/or warm")
    parser.add_argument("--warm-size", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    started = time.time()
    rows = measure(args)
    print(f"model {args.model}, task {args.task}, LoRA alpha {args.alpha:g} on {','.join(args.targets)}, "
          f"eps {args.eps:g}, {args.directions} directions, batch {args.examples}\n")
    for state in args.states:
        print(markdown(rows, state) + "\n")
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
