"""`metazo` command line: parse, call the library, print. Errors a user can cause end in one line."""

from __future__ import annotations

import argparse
import json
import sys

from metazo import __version__
from metazo.errors import MetazoError, RunInterrupted


# -- distributed (torchrun): options and the process group, shared by finetune and meta-train ----------

def _add_distributed_arguments(parser: argparse.ArgumentParser, parallel: bool) -> None:
    group = parser.add_argument_group("distributed (launch with torchrun; on by itself when WORLD_SIZE > 1)")
    group.add_argument("--distributed", action="store_true", help="join the torchrun process group even with one rank")
    if parallel:
        group.add_argument("--parallel", default="data", choices=("data", "directions"),
                           help="split each batch over the ranks, or the --directions (default: data)")
    group.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl with CUDA, else gloo")
    group.add_argument("--dist-timeout", type=float, help="seconds before a rank gives up on a silent one (default: 600)")


def _distributed(args):
    from metazo.distributed import init_distributed, launched_by_torchrun

    if not (args.distributed or launched_by_torchrun()):
        return None
    return init_distributed(args.backend, args.dist_timeout)


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
    parser.add_argument("--paired", action="store_true", help="score both signs in ONE forward over [batch || batch] (faster; see `metazo bench`)")
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


def _add_checkpoint_arguments(parser: argparse.ArgumentParser, every: int, keep: int, command: str) -> None:
    parser.add_argument("--resume", metavar="RUN", help=f"continue the run in folder RUN from its newest checkpoint, with the "
                                                        f"settings it was started with (e.g. metazo {command} --resume RUN)")
    parser.add_argument("--checkpoint-every", type=int, default=every,
                        help=f"steps between run checkpoints; SIGINT/SIGTERM also write one; 0 = only then (default: {every})")
    parser.add_argument("--keep-checkpoints", type=int, default=keep, help=f"newest checkpoints kept (default: {keep})")


def _resume_overrides(args, command: str) -> dict:
    """--resume takes the run's own settings: any other option given is refused, except --no-progress and
    the launch options (--distributed, --backend, --dist-timeout)."""
    defaults = vars(build_parser().parse_args([command]))
    changed = [key for key, value in vars(args).items()
               if key not in ("resume", "no_progress", "distributed", "backend", "dist_timeout") and value != defaults.get(key)]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise MetazoError(f"--resume continues {args.resume} with the settings it was started with; drop {flag}")
    return {"progress": not args.no_progress}


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
    ft.add_argument("--policy", metavar="FILE", help="a learned perturbation policy (.safetensors from `metazo meta-train`); "
                                                     "implies --sampler learned")
    ft.add_argument("--steps", type=int, default=d.steps, help=f"ZO steps (default: {d.steps})")
    ft.add_argument("--output", help="run folder (default: artifacts/runs/<model>-<task>-<sampler>-<mode>-<time>)")
    _add_checkpoint_arguments(ft, d.checkpoint_every, d.keep_checkpoints, "finetune")
    _add_run_arguments(ft, d, MODES, SCHEDULES)
    _add_distributed_arguments(ft, parallel=True)

    cmp = sub.add_parser("compare", help="several samplers, same model, task, seed and forward-pass budget",
                         description="Fine-tune once per sampler with the same forward-pass budget; writes compare.md, "
                                     "compare.json and loss.png (loss vs forward passes) into the output folder.")
    cmp.add_argument("--sampler", action="append", dest="samplers", metavar="SPEC",
                     help="repeatable: NAME or NAME:key=value,key=value with run settings (lr, eps, mode, lora_rank) "
                          "or sampler options, e.g. --sampler gaussian --sampler ar1-zo:lr=1e-4,eps=1e-2 "
                          "(default: gaussian and rademacher)")
    cmp.add_argument("--policy", action="append", dest="policies", metavar="FILE",
                     help="repeatable: a learned policy to compare beside the samplers (same as --sampler learned:policy=FILE)")
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

    _add_meta_train_parser(sub)

    pol = sub.add_parser("policy", help="inspect policy files")
    pol_sub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    show = pol_sub.add_parser("show", help="print a policy file's card: architecture, source model, training, metrics")
    show.add_argument("file", help="a .safetensors policy file")

    sub.add_parser("tasks", help="list built-in tasks")
    sub.add_parser("models", help="list named models")
    _add_bench_parser(sub, sorted(SAMPLERS))
    return parser


def _add_bench_parser(sub, samplers) -> None:
    from metazo.bench import SHAPES, BenchConfig

    b = BenchConfig()
    bn = sub.add_parser("bench", help="time a ZO step against MeZO's reference step and two scoring forwards",
                        description="One process, one model, one synthetic batch: the MeZO reference step, metazo's step and "
                                    "the floor (two scoring forwards), with median ms, tokens/s, peak memory and ratios.")
    bn.add_argument("--model", default=b.model, help=f"a named shape with random weights ({', '.join(SHAPES)}), "
                                                     f"a named model, HF folder or id (default: {b.model})")
    bn.add_argument("--dtype", default=b.dtype, help=f"float32, bfloat16 or float16 (default: {b.dtype})")
    bn.add_argument("--batch", type=int, default=b.batch_size, dest="batch_size", help=f"(default: {b.batch_size})")
    bn.add_argument("--seq-len", type=int, default=b.seq_len, help=f"tokens per example (default: {b.seq_len})")
    bn.add_argument("--sampler", default=b.sampler, choices=samplers, help=f"metazo's sampler (default: {b.sampler})")
    bn.add_argument("--sampler-option", action="append", metavar="KEY=VALUE", dest="sampler_options")
    bn.add_argument("--device", default=b.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    bn.add_argument("--repeats", type=int, default=b.repeats, help=f"timed steps per arm (default: {b.repeats})")
    bn.add_argument("--warmup", type=int, default=b.warmup, help=f"untimed steps first (default: {b.warmup})")
    bn.add_argument("--paired", action="store_true", help="metazo scores both signs in ONE forward over [batch || batch]")
    bn.add_argument("--arms", default=",".join(b.arms), help="which of reference,metazo,floor to run (default: all)")
    bn.add_argument("--json", action="store_true", help="print JSON")


def _bench(args) -> int:
    from metazo.bench import BenchConfig, format_report, run_bench
    from metazo.samplers import parse_sampler_options

    result = run_bench(BenchConfig(
        model=args.model, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len, sampler=args.sampler,
        sampler_options=parse_sampler_options(args.sampler_options), device=args.device, repeats=args.repeats,
        warmup=args.warmup, paired=args.paired, arms=tuple(a.strip() for a in args.arms.split(",") if a.strip())))
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _add_meta_train_parser(sub) -> None:
    from metazo.engine import SCHEDULES
    from metazo.meta.trainer import META_OPTIMIZERS, TRAJECTORIES, MetaTrainConfig
    from metazo.policy.features import FEATURE_SETS
    from metazo.policy.network import SHARINGS, SIGMA_ACTIVATIONS

    m = MetaTrainConfig()
    mt = sub.add_parser(
        "meta-train", help="learn a perturbation policy across tasks (defaults: the embedded demo)",
        description="Meta-train a perturbation policy (PertNN) on a model over a mixture of tasks with the lookahead "
                    "objective, write it as policy.safetensors with its card, and (with --heldout-task) fine-tune a task "
                    f"outside the mixture with the policy and with MeZO at the same forward-pass budget. With no arguments: "
                    f"{m.model} over {m.tasks}, {m.steps} meta-steps, then held-out task sst-snippets.")
    mt.add_argument("--model", default=m.model, help=f"named model, HF folder or id, or .gguf file (default: {m.model})")
    mt.add_argument("--tasks", default=m.tasks, help=f"task mixture NAME[:WEIGHT],... (default: {m.tasks})")
    mt.add_argument("--steps", type=int, default=m.steps, help=f"meta-steps (default: {m.steps})")
    mt.add_argument("--epochs", type=float, help="instead of --steps: passes over the mixture's training examples")
    mt.add_argument("--batch", type=int, default=m.batch_size, dest="batch_size", help=f"examples per meta-step (default: {m.batch_size})")
    mt.add_argument("--directions", type=int, default=m.num_directions, dest="num_directions",
                    help=f"ZO directions per meta-step (default: {m.num_directions})")
    mt.add_argument("--eps", type=float, default=m.eps, help=f"perturbation size (default: {m.eps})")
    mt.add_argument("--lr-update", type=float, default=m.lr_update,
                    help=f"the ZO step size the policy is trained for: the lookahead's, or the unrolled steps' (default: {m.lr_update})")
    mt.add_argument("--horizon", type=int, default=m.horizon,
                    help=f"ZO steps unrolled per meta-update (needs --trajectory zo); 1 = the paper's one-step lookahead (default: {m.horizon})")
    mt.add_argument("--meta-optimizer", default=m.meta_optimizer, choices=META_OPTIMIZERS, help=f"(default: {m.meta_optimizer})")
    mt.add_argument("--meta-lr", type=float, default=m.meta_lr, help=f"policy learning rate (default: {m.meta_lr})")
    mt.add_argument("--meta-schedule", default=m.meta_schedule, choices=SCHEDULES, help=f"(default: {m.meta_schedule})")
    mt.add_argument("--clip", type=float, default=m.clip, help=f"meta-gradient norm clip, 0 = none (default: {m.clip})")
    mt.add_argument("--trajectory", default=m.trajectory, choices=TRAJECTORIES,
                    help=f"how the model moves between meta-steps (default: {m.trajectory})")
    mt.add_argument("--trajectory-lr", type=float, default=m.trajectory_lr, help=f"(default: {m.trajectory_lr})")
    mt.add_argument("--momentum", type=float, default=m.momentum, help=f"first-order trajectory momentum (default: {m.momentum})")
    mt.add_argument("--reset-every", type=int, default=m.reset_every, help=f"meta-steps between resets of the model, 0 = never (default: {m.reset_every})")
    mt.add_argument("--detach-normalizer", action="store_true", help="treat nf as a constant in the meta-gradient, as the paper")
    mt.add_argument("--features", default=m.features, choices=sorted(FEATURE_SETS), help=f"policy inputs (default: {m.features})")
    mt.add_argument("--sharing", default=m.sharing, choices=SHARINGS, help=f"one network per role or per tensor (default: {m.sharing})")
    mt.add_argument("--hidden", type=int, default=m.hidden, help=f"policy hidden width (default: {m.hidden})")
    mt.add_argument("--sigma-activation", default=m.sigma_activation, choices=SIGMA_ACTIVATIONS, help=f"(default: {m.sigma_activation})")
    mt.add_argument("--log-sigma-bound", type=float, default=m.log_sigma_bound, help=f"(default: {m.log_sigma_bound})")
    mt.add_argument("--probe-every", type=int, default=m.probe_every, help=f"gradient-cosine probe every N meta-steps, 0 = never (default: {m.probe_every})")
    mt.add_argument("--max-train", type=int, default=m.max_train, help=f"cap on training examples per task (default: {m.max_train})")
    mt.add_argument("--seed", type=int, default=m.seed, help=f"(default: {m.seed})")
    mt.add_argument("--dtype", default=m.dtype, help="float32, bfloat16 or float16 (default: float32)")
    mt.add_argument("--device", default=m.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    mt.add_argument("--output", help="run folder (default: artifacts/meta/<model>-<time>)")
    _add_checkpoint_arguments(mt, m.checkpoint_every, m.keep_checkpoints, "meta-train")
    mt.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    mt.add_argument("--no-progress", action="store_true", help="no progress bar")
    mt.add_argument("--heldout-task", default=DEFAULT_HELDOUT_TASK,
                    help=f"after meta-training, fine-tune this task with the policy and with MeZO; 'none' to skip (default: {DEFAULT_HELDOUT_TASK})")
    mt.add_argument("--heldout-steps", type=int, default=m.heldout_steps, help=f"held-out ZO steps per run (default: {m.heldout_steps})")
    mt.add_argument("--heldout-lr", type=float, default=m.heldout_lr, help=f"held-out fine-tuning lr (default: {m.heldout_lr})")
    mt.add_argument("--heldout-eval-examples", type=int, default=m.heldout_eval_examples,
                    help=f"held-out test examples (default: {m.heldout_eval_examples})")
    _add_distributed_arguments(mt, parallel=False)


DEFAULT_HELDOUT_TASK = "sst-snippets"


def _run_config(args, **fields):
    from metazo.trainer import FinetuneConfig

    return FinetuneConfig(
        model=args.model, task=args.task, mode=args.mode, lr=args.lr, eps=args.eps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, paired=args.paired, num_directions=args.num_directions, schedule=args.schedule,
        weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every, eval_examples=args.eval_examples,
        max_train=args.max_train, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, dtype=args.dtype,
        device=args.device, overwrite=args.overwrite, progress=not args.no_progress, task_options=_task_options(args),
        **fields,
    )


def _finetune(args) -> int:
    from metazo.samplers import parse_sampler_options
    from metazo.trainer import finetune, resume_config

    if args.resume:
        config = resume_config(args.resume, **_resume_overrides(args, "finetune"))
        return _run_distributed(args, lambda comm: finetune(config, comm=comm, resume=True), _print_finetune)
    options = parse_sampler_options(args.sampler_options)
    sampler = args.sampler
    if args.policy:
        if sampler not in ("gaussian", "learned"):  # gaussian is the default, not a choice
            raise MetazoError(f"--policy uses the learned sampler; drop --sampler {sampler}")
        sampler, options = "learned", {**options, "policy": args.policy}
    config = _run_config(args, sampler=sampler, sampler_options=options, steps=args.steps, output=args.output,
                         parallel=args.parallel, checkpoint_every=args.checkpoint_every,
                         keep_checkpoints=args.keep_checkpoints)
    return _run_distributed(args, lambda comm: finetune(config, comm=comm), _print_finetune)


def _run_distributed(args, run, report) -> int:
    """Run (alone, or as one rank of a torchrun job), then print from rank 0 only."""
    comm = _distributed(args)
    try:
        summary = run(comm)
    finally:
        if comm is not None:
            comm.close()
    return 0 if comm is not None and not comm.is_main else report(summary)


def _print_finetune(summary: dict) -> int:
    zero, final = summary["zero_shot"], summary["final"]
    print(f"run: {summary['run_dir']}  (tensorboard --logdir {summary['run_dir']})")
    print(f"train loss: {summary['first_train_loss']:.4f} -> {summary['final_train_loss']:.4f} over {summary['steps']} steps "
          f"({summary['forward_passes']} forward passes, {summary['wall_time_s']:.0f} s)")
    print(f"held-out accuracy: zero-shot {zero['accuracy']:.3f} -> fine-tuned {final['accuracy']:.3f} "
          f"(loss {zero['loss']:.4f} -> {final['loss']:.4f})")
    if "distributed" in summary:
        from metazo.distributed import describe

        print(describe(summary["distributed"]))
    return 0


def _compare(args) -> int:
    import time
    from pathlib import Path

    from metazo.compare import compare, parse_contender

    specs = list(args.samplers or ([] if args.policies else ["gaussian", "rademacher"]))
    specs += [f"learned:policy={path}" for path in args.policies or []]
    contenders = [parse_contender(spec) for spec in specs]
    base = _run_config(args)
    output = Path(args.output or f"artifacts/compare/{Path(args.model).name}-{Path(args.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    compare(base, contenders, args.budget, output, overwrite=args.overwrite)
    print((output / "compare.md").read_text(), end="")
    print(f"written: {output}/compare.md, compare.json, loss.png")
    return 0


def _meta_train(args) -> int:
    from metazo.meta.trainer import MetaTrainConfig, meta_train, resume_meta_config

    if args.resume:
        config = resume_meta_config(args.resume, **_resume_overrides(args, "meta-train"))
        return _run_distributed(args, lambda comm: meta_train(config, comm=comm, resume=True), _print_meta_train)
    heldout = None if args.heldout_task in (None, "", "none") else args.heldout_task
    config = MetaTrainConfig(
        model=args.model, tasks=args.tasks, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        num_directions=args.num_directions, eps=args.eps, lr_update=args.lr_update, horizon=args.horizon, meta_optimizer=args.meta_optimizer,
        meta_lr=args.meta_lr, meta_schedule=args.meta_schedule, clip=args.clip, trajectory=args.trajectory,
        trajectory_lr=args.trajectory_lr, momentum=args.momentum, reset_every=args.reset_every,
        detach_normalizer=args.detach_normalizer, features=args.features, sharing=args.sharing, hidden=args.hidden,
        sigma_activation=args.sigma_activation, log_sigma_bound=args.log_sigma_bound, probe_every=args.probe_every,
        max_train=args.max_train, seed=args.seed, dtype=args.dtype, device=args.device, output=args.output,
        overwrite=args.overwrite, progress=not args.no_progress, heldout_task=heldout, heldout_steps=args.heldout_steps,
        heldout_lr=args.heldout_lr, heldout_eval_examples=args.heldout_eval_examples,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
    )
    return _run_distributed(args, lambda comm: meta_train(config, comm=comm), _print_meta_train)


def _print_meta_train(summary: dict) -> int:
    metrics = summary["metrics"]
    print(f"run: {summary['run_dir']}  (tensorboard --logdir {summary['run_dir']})")
    print(f"policy: {summary['policy']}  (metazo policy show {summary['policy']})")
    if "distributed" in summary:
        info = summary["distributed"]
        print(f"{info['world_size']} ranks ({info['backend']}): {info['bytes_sent_per_meta_step']} bytes sent per rank "
              f"per meta-step (the policy's meta-gradient)")
    print(f"meta-training: {metrics['meta_steps']} meta-steps, ZO loss {metrics['zo_loss_first']:.4f} -> "
          f"{metrics['zo_loss_last_10pct']:.4f}, mean lookahead improvement {metrics['improvement_mean']:.2e}, "
          f"{metrics['meta_train_wall_time_s']:.0f} s")
    if "final_probe_expected_cosine_gain" in metrics:
        print(f"probe: expected cosine to the true gradient {metrics['final_probe_expected_cosine']:.2e} "
              f"vs MeZO {metrics['final_probe_expected_cosine_mezo']:.2e} ({metrics['final_probe_expected_cosine_gain']:.2f}x)")
    heldout = summary.get("heldout")
    if heldout:
        print(f"held-out task {heldout['task']} ({heldout['forward_passes']} forward passes each, lr {heldout['lr']:g}, "
              f"{heldout['eval_examples']} test examples, zero-shot accuracy {heldout['zero_shot_accuracy']:.3f}):")
        for name in ("mezo", "policy"):
            row = heldout[name]
            print(f"  {name:<7} accuracy {row['accuracy']:.3f}  loss {row['loss']:.4f}  final train loss {row['final_train_loss']:.4f}")
    return 0


def _policy(args) -> int:
    from metazo.policy import format_card

    print(format_card(args.file))
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


COMMANDS = {"finetune": _finetune, "compare": _compare, "meta-train": _meta_train, "policy": _policy, "eval": _eval,
            "tasks": _tasks, "models": _models, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except RunInterrupted as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 130
    except MetazoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
