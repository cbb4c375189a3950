"""A distribution of tasks to meta-train on: "rotten-tomatoes,tweets:2,trec" (name[:weight], ...)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from metazo.errors import MetazoError
from metazo.samplers import mix_seed
from metazo.tasks import Task


@dataclass(frozen=True)
class MixtureEntry:
    spec: str       # anything get_task accepts
    weight: float   # relative sampling probability


def parse_mixture(text: str | Sequence[str]) -> list[MixtureEntry]:
    """Parse "a,b:2" (or a list of such items) into entries; weights default to 1."""
    items = text.split(",") if isinstance(text, str) else [part for item in text for part in item.split(",")]
    entries: list[MixtureEntry] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        spec, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head not in ("", "hf") and _is_number(tail):  # "name:2" weighs; "hf:name" does not
            spec, weight = head, float(tail)
        if not (math.isfinite(weight) and weight > 0):
            raise MetazoError(f"task weight must be a finite number > 0 in '{item}'")
        if any(e.spec == spec for e in entries):
            raise MetazoError(f"task '{spec}' appears twice in the mixture; give it one weight")
        entries.append(MixtureEntry(spec, weight))
    if not entries:
        raise MetazoError("meta-training needs at least one task: give --tasks NAME[,NAME:WEIGHT...]")
    return entries


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def task_for_step(weights: Sequence[float], step: int, seed: int) -> int:
    """Which task a meta-step draws from: a pure function of (step, seed), so resumed runs agree."""
    return random.Random(mix_seed(seed, step, 0x7A5C)).choices(range(len(weights)), weights=weights)[0]


def check_mixture(tasks: Sequence[Task], batch_size: int) -> None:
    for task in tasks:
        if not task.train:
            raise MetazoError(f"task '{task.name}' has no training examples")
        if len(task.train) < batch_size:
            raise MetazoError(f"task '{task.name}' has {len(task.train)} training examples, fewer than a batch of {batch_size}")
