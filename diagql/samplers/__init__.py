"""The sampler registry: USING SAMPLE, SHOW SAMPLERS and Connection.sample all read it."""
from __future__ import annotations

from diagql.errors import BindError

from .base import Ladder, Param, Sample, SampleData, Sampler, doubling, resolve_size
from .ebtree import EBTreeSampler
from .gmm import GMMSampler
from .latentgrid import LatentGridSampler
from .maxmargin import MaxMarginSampler
from .random import RandomSampler
from .stratified import StratifiedSampler
from .vas import VASSampler
from .weighted import WeightedSampler

__all__ = ["REGISTRY", "Ladder", "Param", "Sample", "SampleData", "Sampler", "build",
           "doubling", "resolve_size", "sampler_class"]

# In the order SHOW SAMPLERS lists them: baselines first, the paper's own last.
REGISTRY: dict[str, type[Sampler]] = {cls.name: cls for cls in (
    RandomSampler, StratifiedSampler, LatentGridSampler, VASSampler, EBTreeSampler,
    WeightedSampler, GMMSampler, MaxMarginSampler)}


def sampler_class(name: str) -> type[Sampler]:
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        from diagql.suggest import did_you_mean

        raise BindError(f"unknown sampler {name!r}{did_you_mean(name, REGISTRY)} (samplers "
                        f"are {', '.join(REGISTRY)})") from None


def build(name: str, args: dict[str, object], *, seed: int | None) -> Sampler:
    """Instantiate a sampler from a call's arguments (``size`` may be positional)."""
    cls = sampler_class(name)
    known = {p.name for p in cls.params()}
    for key in args:
        if key not in known:
            from diagql.suggest import did_you_mean

            raise BindError(f"sampler {cls.name!r} has no parameter {key!r}"
                            f"{did_you_mean(key, known)} (its parameters are "
                            f"{', '.join(p.name for p in cls.params())})", param=key)
    args = dict(args)
    args.setdefault("random_state", seed)
    return cls(**args)
