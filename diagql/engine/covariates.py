"""The covariates of the model-assisted estimator (docs/ARCHITECTURE.md, "Estimates"): every
item's latent vector reduced to a few whitened principal components, known for every item
from the profile, so that a sample's answer can be corrected toward the matching items' own."""
from __future__ import annotations

import weakref

import numpy as np

from diagql.model.profile import Profile
from diagql.samplers.space import fit_space

# Chosen by measurement (benchmarks/estimator_choice.py): on the demo and a small ResNet, 10
# components with a ridge of 10 (in whitened units) did as well as 20 or 40 for queries over
# many items and, unlike them, never did worse than the plain mean over the few items of one
# (class, correctness) cell.
DIMS = 10

_MEMO: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def covariates(profile: Profile) -> np.ndarray:
    """(N, p ≤ DIMS) float64: each item's standardised latent on its leading principal axes,
    each component scaled to unit variance over all items (so one ridge fits every model).
    Computed once per profile."""
    key = id(profile)
    held = _MEMO.get(key)
    if held is not None and held[0]() is profile:
        return held[1]
    latents = profile.latents
    z = fit_space(latents, DIMS)(latents)[:, :DIMS]
    spread = z.std(axis=0)
    z = z[:, spread > 0] / spread[spread > 0]
    z.setflags(write=False)
    _MEMO[key] = (weakref.ref(profile, lambda _, key=key: _MEMO.pop(key, None)), z)
    return z
