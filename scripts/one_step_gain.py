"""What one ZO step of a policy buys against one of MeZO, at the same weights, batch and lr.

    .venv/bin/python scripts/one_step_gain.py --policy FILE [--task sst-snippets] [--lr 5e-5] [--directions 16]

From the model's initial weights and one batch of the task, it takes a single step with each sampler
for each of --directions seeds (restoring the weights after each) and prints the mean and spread of
the loss drop L(theta) - L(theta after the step), the policy's scale per role, and the noise-free
expected cosine of each sampler's estimate to the autograd gradient on that batch. One step is what
the paper's lookahead objective rewards; the fine-tuning runs of scripts/policy_evidence.py show what
many steps make of it.
"""

import argparse
import statistics

import torch

from metazo.blocks import model_blocks
from metazo.diagnostics import expected_cosine, true_gradient
from metazo.engine import ZeroOrderOptimizer
from metazo.models import load_model
from metazo.samplers import GaussianSampler, LearnedSampler
from metazo.scoring import Scorer
from metazo.tasks import get_task
from metazo.trainer import training_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst-snippets")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    task = get_task(args.task)
    scorer = Scorer(model, tokenizer, task.label_token_ids(tokenizer))
    batch = scorer.encode(training_batch(task.train, 0, args.batch, 0))
    blocks = model_blocks(model)
    start = {b.name: b.param.detach().clone() for b in blocks}
    with torch.inference_mode():
        initial_loss = float(scorer.loss(batch))
    truth = true_gradient(blocks, lambda: scorer.loss(batch))
    grad_sq = torch.tensor([float(truth[b.name].double().pow(2).sum()) for b in blocks], dtype=torch.float64)
    numels = torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)
    print(f"{args.model} on {args.task}, one batch of {args.batch}, lr {args.lr:g}, eps {args.eps:g}, "
          f"{args.directions} directions; initial loss {initial_loss:.4f}")
    print("| sampler | mean loss drop | sd | expected cosine to the gradient |\n| --- | --- | --- | --- |")
    for name, sampler in (("mezo", GaussianSampler()), ("policy", LearnedSampler(args.policy))):
        optimizer = ZeroOrderOptimizer(blocks, sampler, lr=args.lr, eps=args.eps, seed=0, model=model)
        sampler.begin_step(0)
        scales = torch.tensor([sampler.block_scale(b) for b in blocks], dtype=torch.float64)
        drops = []
        for direction in range(args.directions):
            optimizer.step_count = direction  # a fresh direction from the same state
            if name == "policy":
                sampler.reset_run()
            optimizer.step(lambda: scorer.loss(batch))
            with torch.inference_mode():
                drops.append(initial_loss - float(scorer.loss(batch)))
            with torch.no_grad():
                for b in blocks:
                    b.param.copy_(start[b.name])
        print(f"| {name} | {statistics.fmean(drops):.4f} | {statistics.stdev(drops):.4f} | "
              f"{expected_cosine(scales, grad_sq, numels):.3g} |")
        if name == "policy":
            by_role: dict[str, list[float]] = {}
            for block, scale in zip(blocks, scales.tolist()):
                by_role.setdefault(block.role, []).append(scale)
            print("policy scale nf * sigma per role (mean): " + ", ".join(
                f"{role} {statistics.fmean(values):.2f}" for role, values in by_role.items()))


if __name__ == "__main__":
    main()
