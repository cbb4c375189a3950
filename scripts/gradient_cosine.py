"""Cosine between each sampler's ZO gradient estimate and the true gradient (autograd), on one
real model and one batch.

    .venv/bin/python scripts/gradient_cosine.py [--model smollm2-135m] [--task rotten-tomatoes]
        [--sampler gaussian --sampler agzo ...] [--draws 20] [--batch 16]

For each sampler: the mean cosine of single estimates c*u over --draws directions, and the cosine
of their average. Each sampler is measured in its own parameter space (all weights; LoRA adapters
for ar1-zo; ZO-Act's coefficients), at the model's initial state, on the same batch.
"""

import argparse
import dataclasses

import torch

from metazo.blocks import model_blocks
from metazo.compare import parse_contender
from metazo.diagnostics import cosine, estimated_gradient, true_gradient
from metazo.engine import ZeroOrderOptimizer
from metazo.samplers import SAMPLERS
from metazo.trainer import FinetuneConfig, prepare, training_batch


def measure(base: FinetuneConfig, spec: str, draws: int) -> dict:
    contender = parse_contender(spec)
    config = dataclasses.replace(base, sampler=contender.sampler, sampler_options=contender.sampler_options,
                                 **contender.overrides)
    model, task, scorer, sampler = prepare(config)
    batch = scorer.encode(training_batch(task.train, 0, config.batch_size, config.seed))
    optimizer = ZeroOrderOptimizer(model_blocks(model), sampler, eps=config.eps, seed=config.seed, model=model)
    exact = true_gradient(optimizer.blocks, lambda: scorer.loss(batch))
    singles = []
    total = None
    for draw in range(draws):
        estimate = estimated_gradient(optimizer, lambda: scorer.loss(batch), steps=1, first_step=draw)
        singles.append(cosine(exact, estimate))
        total = estimate if total is None else {k: total[k] + estimate[k] for k in total}
    return {"sampler": contender.label, "mode": config.mode, "params": sum(b.numel for b in optimizer.blocks),
            "single": sum(singles) / len(singles), "averaged": cosine(exact, total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="rotten-tomatoes")
    parser.add_argument("--sampler", action="append", dest="samplers")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = FinetuneConfig(model=args.model, task=args.task, batch_size=args.batch, eps=args.eps, seed=args.seed, device="auto")
    print(f"{args.model} on {args.task}, batch {args.batch}, eps {args.eps}, {args.draws} directions per sampler")
    print("| sampler | mode | trained params | mean cosine of one estimate | cosine of the mean of all |")
    print("| --- | --- | --- | --- | --- |")
    for spec in args.samplers or list(SAMPLERS):
        r = measure(base, spec, args.draws)
        print(f"| {r['sampler']} | {r['mode']} | {r['params']:,} | {r['single']:.4f} | {r['averaged']:.4f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
