"""Time and peak memory of one meta-step: metazo's against the paper's way, and against the
inference forward and the first-order training step they should be compared with.

    .venv/bin/python scripts/meta_cost.py [--model smollm2-135m] [--batch 8] [--device auto] [--repeats 3]

Kinds, each in its own fresh process on the same model, task and batch:

- forward:      one inference forward of the scorer
- first-order:  one SGD training step (forward, backward, update with momentum 0.8)
- meta:         metazo's meta-step in the paper's setting (``MetaTrainer.meta_step``, horizon 1, first-order
                trajectory): ZO estimate through the perturbed view, lookahead through
                ``torch.func.functional_call`` with z regenerated in backward, the trajectory moved with
                the lookahead's gradient
- unrolled:     metazo's default meta-step: 10 ZO steps of the policy, then one backward
- paper:        the paper's way, reimplemented: MeZO's in-place +eps/-2eps/+eps estimate, a deep copy of
                the model whose tensors are replaced by theta - lr_update c nf sigma z (autograd keeps each z),
                backward into the policy, then a separate forward and backward at theta for the trajectory

CPU: peak resident set while the work runs; CUDA: max allocated bytes. Time: median over --repeats.
"""

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time


def measure(kind: str, model_name: str, batch_size: int, device: str, repeats: int) -> None:
    import torch

    from metazo.blocks import model_blocks
    from metazo.meta import MetaTrainConfig, MetaTrainer
    from metazo.models import load_model
    from metazo.policy import normalizer
    from metazo.runtime.memory import peak_memory_bytes
    from metazo.samplers import GaussianSampler, block_noise
    from metazo.scoring import Scorer
    from metazo.tasks import get_task
    from metazo.trainer import training_batch

    model, tokenizer = load_model(model_name, device=device)
    with torch.no_grad():  # ordinary memory, not pages mapped from the cached file (see measure_memory.py)
        for param in model.parameters():
            param.data = param.data.clone()
    task = get_task("rotten-tomatoes", max_train=1000)
    scorer = Scorer(model, tokenizer, task.label_token_ids(tokenizer))
    batch = scorer.encode(training_batch(task.train, 0, batch_size, 0))
    # The paper's setting (one-step lookahead, first-order trajectory) for the side-by-side; "unrolled"
    # is metazo's default, 10 ZO steps per meta-update.
    config = MetaTrainConfig(model=model_name, tasks="rotten-tomatoes", batch_size=batch_size, reset_every=0,
                             probe_every=0, horizon=1, trajectory="first-order")
    blocks = model_blocks(model)

    if kind == "forward":
        def work():
            with torch.inference_mode():
                scorer.loss(batch)
    elif kind == "first-order":
        momentum = {}

        def work():
            grads = torch.autograd.grad(scorer.loss(batch), [b.param for b in blocks])
            with torch.no_grad():
                for block, grad in zip(blocks, grads):
                    buffer = momentum.setdefault(block.name, torch.zeros_like(grad)).mul_(0.8).add_(grad)
                    block.param.sub_(buffer, alpha=1e-4)
    elif kind in ("meta", "unrolled"):
        if kind == "unrolled":
            config = MetaTrainConfig(model=model_name, tasks="rotten-tomatoes", batch_size=batch_size, reset_every=0,
                                     probe_every=0)
        trainer = MetaTrainer(model, [task], [scorer], config)

        def work():
            trainer.meta_step()
    else:
        trainer = MetaTrainer(model, [task], [scorer], config)  # for its policy, features and meta-optimizer
        noise, momentum = GaussianSampler(), {}

        def work():
            sampler = trainer.sampler
            sigma = sampler.sigma()
            scales = (sigma.double() * normalizer(sigma.detach(), sampler.numels)).float()  # nf detached, as the paper
            losses = []
            with torch.no_grad():
                for sign in (1.0, -2.0, 1.0):  # theta + eps u, theta - eps u, back
                    for i, block in enumerate(blocks):
                        block.param.add_(block_noise(noise, block, 7), alpha=sign * config.eps * float(scales[i]))
                    if len(losses) < 2:
                        losses.append(float(scorer.loss(batch)))
            c = (losses[0] - losses[1]) / (2 * config.eps)
            shadow = copy.deepcopy(model)  # the paper's lookahead model
            named = dict(shadow.named_parameters(remove_duplicate=False))
            by_tensor = {}
            for name, param in named.items():
                by_tensor.setdefault(id(param), []).append(name)
            for i, block in enumerate(blocks):
                new = block.param.detach() - config.lr_update * c * scales[i] * block_noise(noise, block, 7)
                for name in by_tensor[id(named[block.name])]:
                    module_name, _, attr = name.rpartition(".")
                    module = shadow.get_submodule(module_name)
                    delattr(module, attr)
                    setattr(module, attr, new)
            shadow_scorer = Scorer(shadow, tokenizer, task.label_token_ids(tokenizer))
            meta_loss = shadow_scorer.loss(batch)
            trainer.meta_optimizer.zero_grad()
            meta_loss.backward()
            trainer.meta_optimizer.step()
            del shadow, shadow_scorer, meta_loss
            grads = torch.autograd.grad(scorer.loss(batch), [b.param for b in blocks])  # the trajectory's own backward
            with torch.no_grad():
                for block, grad in zip(blocks, grads):
                    buffer = momentum.setdefault(block.name, torch.zeros_like(grad)).mul_(0.8).add_(grad)
                    block.param.sub_(buffer, alpha=1e-4)

    work()  # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        peaks.append(peak_memory_bytes(work, scorer.device))
        times.append(time.perf_counter() - start)
    print(json.dumps({"kind": kind, "peak_bytes": max(peaks), "seconds": statistics.median(times),
                      "device": str(scorer.device), "tokens": list(batch.input_ids.shape),
                      "parameters": sum(b.numel for b in blocks)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kind", choices=["forward", "first-order", "meta", "paper", "unrolled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind:
        return measure(args.kind, args.model, args.batch, args.device, args.repeats)
    results = {}
    for kind in ("forward", "first-order", "meta", "paper", "unrolled"):
        out = subprocess.run([sys.executable, __file__, "--kind", kind, "--model", args.model, "--batch", str(args.batch),
                              "--device", args.device, "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    first = results["meta"]
    print(f"model {args.model} ({first['parameters']:,} trained parameters), float32, batch {args.batch} "
          f"(tokens {first['tokens']}), device {first['device']}, median of {args.repeats}")
    print("| work | time s | peak MiB | peak / first-order step |\n| --- | --- | --- | --- |")
    labels = {"forward": "inference forward", "first-order": "first-order SGD step",
              "meta": "metazo meta-step, horizon 1", "paper": "paper's meta-step (deep copy), horizon 1",
              "unrolled": "metazo meta-step, horizon 10 (10 ZO steps)"}
    for kind, label in labels.items():
        r = results[kind]
        print(f"| {label} | {r['seconds']:.2f} | {r['peak_bytes'] / 2**20:.0f} | "
              f"{r['peak_bytes'] / results['first-order']['peak_bytes']:.2f} |")
    print(f"metazo / paper: time {results['meta']['seconds'] / results['paper']['seconds']:.2f}x, "
          f"peak memory {results['meta']['peak_bytes'] / results['paper']['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
