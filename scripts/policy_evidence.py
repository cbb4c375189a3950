"""The learned policy against MeZO on tasks outside its meta-training mixture, several seeds.

For each (model, task, seed) it fine-tunes twice with the same forward-pass budget, lr, eps, batch,
data order and held-out examples: once with MeZO's Gaussian directions, once with the policy. Prints
a markdown table (mean and standard deviation over seeds of held-out accuracy and loss) and writes
it with every run's numbers to <output>/evidence.{md,json}. Runs already finished in <output> are
reused, so an interrupted sweep continues where it stopped.

    .venv/bin/python scripts/policy_evidence.py --policy policies/smollm2-135m-mixture.safetensors \
        --tasks sst-snippets,amazon,nyt,bbc-news --seeds 0,1,2 --steps 150
    .venv/bin/python scripts/policy_evidence.py --policy ... --model gemma-3-270m --tasks sst-snippets  # transfer
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from metazo.errors import MetazoError
from metazo.meta.mixture import parse_mixture
from metazo.policy import PerturbationPolicy
from metazo.trainer import FinetuneConfig, finetune


def run(config: FinetuneConfig) -> dict:
    summary_path = Path(config.output) / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "completed":
            return summary
    config.overwrite = True
    return finetune(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="sst-snippets,amazon,nyt,bbc-news")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150, help="two-point steps per run (2 forward passes each)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--output", default=None, help="default: artifacts/evidence/<model>")
    parser.add_argument("--record", action="store_true",
                        help="write the per-task means into the policy file's card (its 'heldout' entries)")
    args = parser.parse_args(argv)

    policy = PerturbationPolicy.from_pretrained(args.policy)
    mixture = set(policy.card.get("tasks", {}))
    tasks = [entry.spec for entry in parse_mixture(args.tasks)]
    if mixture & set(tasks):
        raise MetazoError(f"tasks {sorted(mixture & set(tasks))} are in the policy's meta-training mixture, not held out")
    seeds = [int(s) for s in args.seeds.split(",")]
    output = Path(args.output or f"artifacts/evidence/{Path(args.model).name}")
    contenders = {"mezo": ("gaussian", {}), "policy": ("learned", {"policy": args.policy})}
    runs = []
    for task in tasks:
        for seed in seeds:
            for name, (sampler, options) in contenders.items():
                config = FinetuneConfig(model=args.model, task=task, sampler=sampler, sampler_options=options,
                                        steps=args.steps, lr=args.lr, eps=args.eps, batch_size=args.batch, seed=seed,
                                        eval_every=0, eval_examples=args.eval_examples, progress=False,
                                        output=str(output / task / f"seed{seed}" / name))
                summary = run(config)
                runs.append({"task": task, "seed": seed, "contender": name, "accuracy": summary["final"]["accuracy"],
                             "loss": summary["final"]["loss"], "zero_shot_accuracy": summary["zero_shot"]["accuracy"],
                             "final_train_loss": summary["final_train_loss"], "forward_passes": summary["forward_passes"],
                             "wall_time_s": summary["wall_time_s"]})
                print(f"{task} seed {seed} {name}: accuracy {runs[-1]['accuracy']:.3f} loss {runs[-1]['loss']:.4f}",
                      file=sys.stderr, flush=True)
    table = markdown(runs, args, tasks, seeds)
    output.mkdir(parents=True, exist_ok=True)
    (output / "evidence.md").write_text(table)
    (output / "evidence.json").write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2))
    print(table, end="")
    if args.record:
        record_in_card(args, runs, tasks, seeds)
    return 0


def record_in_card(args, runs: list[dict], tasks: list[str], seeds: list[int]) -> None:
    """Replace the card's held-out entries for (model, task) with this sweep's means."""
    policy = PerturbationPolicy.from_pretrained(args.policy)
    entries = [e for e in policy.card.get("heldout", []) if (e.get("model"), e.get("task")) not in
               {(args.model, task) for task in tasks}]
    for task in tasks:
        mean = {name: {key: statistics.fmean(r[key] for r in runs if r["task"] == task and r["contender"] == name)
                       for key in ("accuracy", "loss")} for name in ("mezo", "policy")}
        entries.append({"model": args.model, "task": task, "seeds": seeds, "forward_passes": 2 * args.steps,
                        "lr": args.lr, "eps": args.eps, "batch_size": args.batch, "eval_examples": args.eval_examples,
                        "zero_shot_accuracy": next(r["zero_shot_accuracy"] for r in runs if r["task"] == task), **mean})
    policy.save_pretrained(args.policy, {**policy.card, "heldout": entries})


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def markdown(runs: list[dict], args, tasks: list[str], seeds: list[int]) -> str:
    lines = [f"{args.model}, {args.steps} steps ({2 * args.steps} forward passes) per run, lr {args.lr:g}, eps {args.eps:g}, "
             f"batch {args.batch}, {args.eval_examples} held-out test examples, seeds {', '.join(map(str, seeds))} "
             f"(mean ± sd over seeds); policy {args.policy}", "",
             "| task | zero-shot acc | MeZO acc | policy acc | MeZO loss | policy loss | policy - MeZO acc (per seed) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for task in tasks:
        rows = {name: [r for r in runs if r["task"] == task and r["contender"] == name] for name in ("mezo", "policy")}
        diffs = [p["accuracy"] - m["accuracy"] for m, p in zip(rows["mezo"], rows["policy"])]
        lines.append(f"| {task} | {rows['mezo'][0]['zero_shot_accuracy']:.3f} | {_mean_sd([r['accuracy'] for r in rows['mezo']])} "
                     f"| {_mean_sd([r['accuracy'] for r in rows['policy']])} | {_mean_sd([r['loss'] for r in rows['mezo']])} "
                     f"| {_mean_sd([r['loss'] for r in rows['policy']])} | {' / '.join(f'{d:+.3f}' for d in diffs)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MetazoError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
