"""Perturbation samplers, all behind the protocol in :mod:`metazo.samplers.base`."""

import inspect

from metazo.errors import MetazoError
from metazo.samplers.base import Sampler, block_noise, chunk_noise, chunk_rows, mix_seed, row_noise
from metazo.samplers.agzo import AGZOSampler
from metazo.samplers.ar1 import AR1Sampler
from metazo.samplers.gaussian import GaussianSampler, RademacherSampler
from metazo.samplers.learned import LearnedSampler
from metazo.samplers.lowrank import LowRankSampler
from metazo.samplers.zoact import ZOActSampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (GaussianSampler, RademacherSampler, LowRankSampler, AGZOSampler, ZOActSampler, AR1Sampler,
                LearnedSampler)
}


def make_sampler(name: str, run_seed: int | None = None, **options) -> Sampler:
    """A sampler by name with its options; unknown names and options are MetazoErrors.

    A sampler with randomness of its own (a ``seed`` option: LoZO's V, AGZO's start matrices)
    takes ``run_seed`` unless the options name a seed, so runs with other seeds differ in it too.
    """
    if name not in SAMPLERS:
        raise MetazoError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    if run_seed is not None and "seed" not in options and "seed" in inspect.signature(cls).parameters:
        options = {**options, "seed": run_seed}
    try:
        return cls(**options)
    except TypeError as error:
        raise MetazoError(f"bad option for sampler '{name}': {error}") from None


def parse_sampler_options(items: list[str] | None) -> dict[str, object]:
    """["rank=4", "train_other=true"] -> {"rank": 4, "train_other": True} (ints, floats, booleans, else strings)."""
    options: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MetazoError(f"sampler option '{item}' is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = parse_option_value(value)
    return options


def parse_option_value(value: str) -> object:
    """'4' -> 4, '1e-3' -> 0.001, 'true'/'false' -> bool, anything else stays text."""
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


__all__ = [
    "SAMPLERS", "Sampler", "GaussianSampler", "RademacherSampler", "LowRankSampler", "AGZOSampler",
    "ZOActSampler", "AR1Sampler", "LearnedSampler", "make_sampler", "parse_sampler_options", "parse_option_value",
    "block_noise", "chunk_noise", "chunk_rows", "mix_seed", "row_noise",
]
