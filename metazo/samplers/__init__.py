"""Perturbation samplers, all behind the protocol in :mod:`metazo.samplers.base`."""

from metazo.errors import MetazoError
from metazo.samplers.base import Sampler, block_noise, chunk_noise, chunk_rows, mix_seed, row_noise
from metazo.samplers.gaussian import GaussianSampler, RademacherSampler

SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (GaussianSampler, RademacherSampler)}


def make_sampler(name: str, **options) -> Sampler:
    """A sampler by name with its options; unknown names and options are MetazoErrors."""
    if name not in SAMPLERS:
        raise MetazoError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    try:
        return SAMPLERS[name](**options)
    except TypeError as error:
        raise MetazoError(f"bad option for sampler '{name}': {error}") from None


def parse_sampler_options(items: list[str] | None) -> dict[str, object]:
    """["rank=4", "resample_every=50"] -> {"rank": 4, "resample_every": 50} (ints, floats, else strings)."""
    options: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MetazoError(f"sampler option '{item}' is not KEY=VALUE")
        for convert in (int, float):
            try:
                options[key.strip().replace("-", "_")] = convert(value)
                break
            except ValueError:
                continue
        else:
            options[key.strip().replace("-", "_")] = value
    return options


__all__ = [
    "SAMPLERS", "Sampler", "GaussianSampler", "RademacherSampler", "make_sampler", "parse_sampler_options",
    "block_noise", "chunk_noise", "chunk_rows", "mix_seed", "row_noise",
]
