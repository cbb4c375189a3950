"""Perturbation samplers, all behind the protocol in :mod:`metazo.samplers.base`."""

from metazo.errors import MetazoError
from metazo.samplers.base import Sampler, block_noise, chunk_noise, chunk_rows, mix_seed, row_noise
from metazo.samplers.gaussian import GaussianSampler, RademacherSampler

SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (GaussianSampler, RademacherSampler)}


def make_sampler(name: str, **options) -> Sampler:
    """A sampler by name; an unknown name is a MetazoError listing the known ones."""
    if name not in SAMPLERS:
        raise MetazoError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](**options)


__all__ = [
    "SAMPLERS", "Sampler", "GaussianSampler", "RademacherSampler", "make_sampler",
    "block_noise", "chunk_noise", "chunk_rows", "mix_seed", "row_noise",
]
