"""Several samplers on one model, task, seed and forward-pass budget: a table and a loss plot.

Budgets are counted in forward passes, not steps: a two-point step costs 2 per direction, a
one-sided step (AGZO) 1 per direction plus one shared unperturbed pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from metazo.errors import MetazoError
from metazo.samplers import SAMPLERS, make_sampler, parse_option_value
from metazo.tracking import create_run_dir, write_json_atomic
from metazo.trainer import FinetuneConfig, finetune, passes_per_step

CONFIG_FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}
NUMERIC_FIELDS = {"lr", "eps", "weight_decay", "lora_alpha"}
INTEGER_FIELDS = {"lora_rank", "num_directions", "batch_size"}


@dataclasses.dataclass
class Contender:
    """One column of a comparison: a sampler with its own settings."""

    label: str
    sampler: str
    overrides: dict[str, Any]        # FinetuneConfig fields (lr, eps, mode, lora_rank, ...)
    sampler_options: dict[str, Any]  # the sampler's own options (rank, ...)


def parse_contender(spec: str) -> Contender:
    """"NAME" or "NAME:key=value,key=value" (config fields such as lr, eps, mode; else sampler options).

    The sampler's required mode is filled in (ar1-zo -> lora), so a plain name always runs.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in SAMPLERS:
        raise MetazoError(f"unknown sampler '{name}' in '{spec}'; choose from: {', '.join(SAMPLERS)}")
    overrides: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise MetazoError(f"'{item}' in '{spec}' is not key=value")
        if key in NUMERIC_FIELDS:
            overrides[key] = float(value)
        elif key in INTEGER_FIELDS:
            overrides[key] = int(value)
        elif key in CONFIG_FIELDS:
            overrides[key] = value
        else:
            options[key] = parse_option_value(value)
    required = make_sampler(name, **options).requires_mode
    if required and "mode" not in overrides:
        overrides["mode"] = required
    return Contender(spec if rest else name, name, overrides, options)




def compare(base: FinetuneConfig, contenders: list[Contender], budget: int, output: Path,
            overwrite: bool = False) -> list[dict[str, Any]]:
    """Fine-tune once per contender with the same forward-pass budget; write compare.{json,md}
    and loss.png under ``output``; returns the table rows."""
    if budget <= 0:
        raise MetazoError(f"budget must be > 0 forward passes, got {budget}")
    if not contenders:
        raise MetazoError("nothing to compare: give at least one sampler")
    configs = []
    for contender in contenders:
        config = dataclasses.replace(base, sampler=contender.sampler, sampler_options=contender.sampler_options,
                                     **contender.overrides)
        per_step = passes_per_step(make_sampler(config.sampler, **config.sampler_options).one_sided, config.num_directions)
        config.steps = budget // per_step
        if config.steps <= 0:
            raise MetazoError(f"a budget of {budget} forward passes is less than one step of '{contender.label}' ({per_step})")
        config.validate()
        configs.append(config)
    output = create_run_dir(Path(output), overwrite)
    rows = []
    for contender, config in zip(contenders, configs):
        config.output = str(output / "runs" / _slug(contender.label))
        summary = finetune(config)
        rows.append({
            "sampler": contender.label, "mode": config.mode, "lr": config.lr, "eps": config.eps, "steps": config.steps,
            "forward_passes": summary["forward_passes"], "final_train_loss": summary["final_train_loss"],
            "heldout_loss": summary["final"]["loss"], "heldout_accuracy": summary["final"]["accuracy"],
            "zero_shot_accuracy": summary["zero_shot"]["accuracy"], "wall_time_s": summary["wall_time_s"],
            "peak_memory_mib": summary["peak_memory_bytes"] / 2**20, "history": summary["history"],
        })
        write_json_atomic(output / "compare.json", {"model": base.model, "task": base.task, "seed": base.seed,
                                                    "budget_forward_passes": budget, "rows": rows})
    (output / "compare.md").write_text(markdown_table(rows, base, budget))
    plot_losses(rows, output / "loss.png", f"{base.model} on {base.task}, seed {base.seed}")
    return rows


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def markdown_table(rows: list[dict[str, Any]], base: FinetuneConfig, budget: int) -> str:
    lines = [
        f"{base.model} on {base.task}, seed {base.seed}, {budget} forward passes each, batch {base.batch_size}, "
        f"{base.eval_examples} held-out examples (zero-shot accuracy {rows[0]['zero_shot_accuracy']:.3f})",
        "",
        "| sampler | mode | lr | eps | steps | final train loss | held-out loss | held-out accuracy | wall s | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['mode']} | {r['lr']:g} | {r['eps']:g} | {r['steps']} | {r['final_train_loss']:.4f} "
                     f"| {r['heldout_loss']:.4f} | {r['heldout_accuracy']:.3f} | {r['wall_time_s']:.0f} | {r['peak_memory_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str, window: int = 10) -> None:
    """Training loss (moving average over ``window`` steps) against forward passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        passes = [p for p, _ in r["history"]]
        losses = [loss for _, loss in r["history"]]
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        ax.plot(passes, smooth, label=r["sampler"])
    ax.set_xlabel("forward passes")
    ax.set_ylabel(f"train loss (moving average, {window} steps)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
