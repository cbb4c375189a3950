"""`metazo` command line: parse, call the library, print. Errors a user can cause end in one line."""

from __future__ import annotations

import argparse
import json
import sys

from metazo import __version__
from metazo.errors import MetazoError



def _task_options(args) -> dict:
    from metazo.tasks import parse_label_words

    options = {}
    if args.text_column:
        options["text_column"] = args.text_column
    if args.label_column:
        options["label_column"] = args.label_column
    if args.label_words:
        options["label_words"] = parse_label_words(args.label_words)
    if args.template:
        options["template"] = args.template
    return options


def _add_task_arguments(parser: argparse.ArgumentParser, task_default: str | None) -> None:
    parser.add_argument("--task", default=task_default, required=task_default is None,
                        help="built-in task name (see `metazo tasks`), a .jsonl/.csv file, or hf:NAME[:CONFIG]"
                             + (f" (default: {task_default})" if task_default else ""))
    parser.add_argument("--text-column", help="text column of a user file (default: text)")
    parser.add_argument("--label-column", help="label column of a user file (default: label)")
    parser.add_argument("--label-words", help='label value to word, e.g. "pos=great,neg=terrible" (one token each)')
    parser.add_argument("--template", help='prompt template of a user task, e.g. "{text} It was"')


def _add_run_arguments(parser: argparse.ArgumentParser, d, modes, schedules, eval_every: int | None = None) -> None:
    """Settings shared by every command that fine-tunes (finetune, compare)."""
    parser.add_argument("--model", default=d.model, help=f"named model (see `metazo models`), HF folder or id, or .gguf file (default: {d.model})")
    _add_task_arguments(parser, d.task)
    parser.add_argument("--mode", default=d.mode, choices=modes, help=f"train all parameters or LoRA adapters only (default: {d.mode})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default: {d.lr}; MeZO LoRA: 1e-4)")
    parser.add_argument("--eps", type=float, default=d.eps, help=f"perturbation size (default: {d.eps}; MeZO LoRA: 1e-2)")
    parser.add_argument("--batch", type=int, default=d.batch_size, dest="batch_size", help=f"examples per step (default: {d.batch_size})")
    parser.add_argument("--micro-batch", type=int, default=None, dest="micro_batch_size", help="score each step in micro-batches of this size (gradient accumulation)")
    parser.add_argument("--directions", type=int, default=d.num_directions, dest="num_directions", help="directions averaged per step, q (default: 1)")
    parser.add_argument("--schedule", default=d.schedule, choices=schedules, help=f"lr schedule (default: {d.schedule})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay, not on norms and biases (default: 0)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of directions and data order (default: {d.seed})")
    eval_every = d.eval_every if eval_every is None else eval_every
    parser.add_argument("--eval-every", type=int, default=eval_every, help=f"dev evaluation every N steps, 0 = never (default: {eval_every})")
    parser.add_argument("--eval-examples", type=int, default=d.eval_examples, help=f"held-out examples per evaluation (default: {d.eval_examples})")
    parser.add_argument("--max-train", type=int, default=d.max_train, help=f"cap on training examples (default: {d.max_train})")
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default: {d.lora_rank})")
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default: {d.lora_alpha})")
    parser.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from metazo.engine import SCHEDULES
    from metazo.samplers import SAMPLERS
    from metazo.trainer import MODES, FinetuneConfig

    d = FinetuneConfig()
    parser = argparse.ArgumentParser(prog="metazo", description="Zeroth-order fine-tuning of language models with forward passes only.")
    parser.add_argument("--version", action="version", version=f"metazo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ft = sub.add_parser("finetune", help="fine-tune a model on a task with ZO steps (defaults: the embedded demo)",
                        description="Fine-tune with forward passes only. With no arguments: smollm2-135m on rotten-tomatoes, "
                                    "zero-shot vs fine-tuned held-out accuracy, TensorBoard under artifacts/runs/.")
    ft.add_argument("--sampler", default=d.sampler, choices=sorted(SAMPLERS), help=f"perturbation sampler (default: {d.sampler})")
    ft.add_argument("--sampler-option", action="append", metavar="KEY=VALUE", dest="sampler_options",
                    help="sampler setting, repeatable, e.g. rank=4 (see the sampler's docstring)")
    ft.add_argument("--steps", type=int, default=d.steps, help=f"ZO steps (default: {d.steps})")
    ft.add_argument("--output", help="run folder (default: artifacts/runs/<model>-<task>-<sampler>-<mode>-<time>)")
    _add_run_arguments(ft, d, MODES, SCHEDULES)

    cmp = sub.add_parser("compare", help="several samplers, same model, task, seed and forward-pass budget",
                         description="Fine-tune once per sampler with the same forward-pass budget; writes compare.md, "
                                     "compare.json and loss.png (loss vs forward passes) into the output folder.")
    cmp.add_argument("--sampler", action="append", dest="samplers", metavar="SPEC",
                     help="repeatable: NAME or NAME:key=value,key=value with run settings (lr, eps, mode, lora_rank) "
                          "or sampler options, e.g. --sampler gaussian --sampler ar1-zo:lr=1e-4,eps=1e-2 "
                          "(default: gaussian and rademacher)")
    cmp.add_argument("--budget", type=int, default=300, help="forward passes per sampler (default: 300)")
    cmp.add_argument("--output", help="comparison folder (default: artifacts/compare/<model>-<task>-<time>)")
    _add_run_arguments(cmp, d, MODES, SCHEDULES, eval_every=0)

    ev = sub.add_parser("eval", help="held-out loss and accuracy, zero-shot or of a saved checkpoint")
    ev.add_argument("--model", help="model (default: the checkpoint's)")
    ev.add_argument("--checkpoint", help="run folder or weights.safetensors written by `metazo finetune`")
    _add_task_arguments(ev, None)
    ev.add_argument("--split", default="test", choices=("train", "dev", "test"))
    ev.add_argument("--limit", type=int, help="evaluate the first N examples only")
    ev.add_argument("--batch", type=int, default=32, dest="batch_size")
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("tasks", help="list built-in tasks")
    sub.add_parser("models", help="list named models")
    return parser


def _run_config(args, **fields):
    from metazo.trainer import FinetuneConfig

    return FinetuneConfig(
        model=args.model, task=args.task, mode=args.mode, lr=args.lr, eps=args.eps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, num_directions=args.num_directions, schedule=args.schedule,
        weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every, eval_examples=args.eval_examples,
        max_train=args.max_train, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, dtype=args.dtype,
        device=args.device, overwrite=args.overwrite, progress=not args.no_progress, task_options=_task_options(args),
        **fields,
    )


def _finetune(args) -> int:
    from metazo.samplers import parse_sampler_options
    from metazo.trainer import finetune

    config = _run_config(args, sampler=args.sampler, sampler_options=parse_sampler_options(args.sampler_options),
                         steps=args.steps, output=args.output)
    summary = finetune(config)
    zero, final = summary["zero_shot"], summary["final"]
    print(f"run: {summary['run_dir']}  (tensorboard --logdir {summary['run_dir']})")
    print(f"train loss: {summary['first_train_loss']:.4f} -> {summary['final_train_loss']:.4f} over {summary['steps']} steps "
          f"({summary['forward_passes']} forward passes, {summary['wall_time_s']:.0f} s)")
    print(f"held-out accuracy: zero-shot {zero['accuracy']:.3f} -> fine-tuned {final['accuracy']:.3f} "
          f"(loss {zero['loss']:.4f} -> {final['loss']:.4f})")
    return 0


def _compare(args) -> int:
    import time
    from pathlib import Path

    from metazo.compare import compare, parse_contender

    contenders = [parse_contender(spec) for spec in args.samplers or ["gaussian", "rademacher"]]
    base = _run_config(args)
    output = Path(args.output or f"artifacts/compare/{Path(args.model).name}-{Path(args.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    compare(base, contenders, args.budget, output, overwrite=args.overwrite)
    print((output / "compare.md").read_text(), end="")
    print(f"written: {output}/compare.md, compare.json, loss.png")
    return 0


def _eval(args) -> int:
    from metazo.trainer import evaluate

    result = evaluate(args.model, args.task, checkpoint=args.checkpoint, split=args.split, limit=args.limit,
                      dtype=args.dtype, device=args.device, batch_size=args.batch_size, task_options=_task_options(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} on {result['task']} ({result['split']}, {result['examples']} examples"
              f"{', checkpoint ' + result['checkpoint'] if result['checkpoint'] else ', zero-shot'}): "
              f"accuracy {result['accuracy']:.3f}, loss {result['loss']:.4f}")
    return 0


def _tasks(args) -> int:
    from metazo.tasks import list_tasks

    for name, description in list_tasks().items():
        print(f"{name:<18} {description}")
    return 0


def _models(args) -> int:
    from metazo.models import MODELS

    for name, description in MODELS.items():
        print(f"{name:<18} {description}")
    print("(or a Hugging Face id, a local model folder, or a .gguf file)")
    return 0


COMMANDS = {"finetune": _finetune, "compare": _compare, "eval": _eval, "tasks": _tasks, "models": _models}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except MetazoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
