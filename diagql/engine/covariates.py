"""The covariates of the model-assisted estimator (docs/ARCHITECTURE.md, "Estimates"): every
item's latent vector reduced to a few whitened principal components, and the queried block's
own principal projections where the profile kept them, known for every item from the profile,
so that a sample's answer can be corrected toward the matching items' own."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from diagql.model.auxiliaries import Auxiliary
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


@dataclass(frozen=True)
class Chosen:
    """The covariates of one view's sample queries: the latent's components, then, when the
    profile kept the view's own block projections, those (model/auxiliaries.py)."""

    z: np.ndarray  # (N, p [+ k]) float64, read-only
    latent_dims: int  # p: the first columns, the latent's
    auxiliary: Auxiliary | None  # the view's block projections: the last k columns

    def describe(self, profile: Profile) -> str:
        """What the assisted estimator fits on, for EXPLAIN."""
        latent = f"{self.latent_dims} principal components of the latent ({profile.latent_layer})"
        if self.auxiliary is None:
            return f"assisted: a linear fit on {latent}"
        a = self.auxiliary
        # Which items: profile.fit_items spreads them over the data (model/auxiliaries.py).
        fitted = "every item" if a.fitted_on >= len(a.z) else \
            f"{a.fitted_on:,} items spread over the data"
        return (f"assisted: every item predicted from {a.layer}'s {a.basis.shape[1]} principal "
                f"components kept by the profile pass (known coefficients, fitted on "
                f"{fitted}), the residual fitted on {latent}")


def for_view(profile: Profile, view_key: str) -> Chosen:
    """The covariates of a sample query on the view with this key: the auxiliary nearest to
    it is the view's own block projections when the profile kept them, else the latent."""
    z = covariates(profile)
    auxiliary = profile.auxiliary(view_key)
    if auxiliary is None:
        return Chosen(z, z.shape[1], None)
    key = (id(profile), view_key)
    held = _JOINED.get(key)
    if held is None or held[0]() is not profile:
        joined = np.concatenate([z, auxiliary.z.astype(np.float64)], axis=1)
        joined.setflags(write=False)
        held = (weakref.ref(profile, lambda _, key=key: _JOINED.pop(key, None)), joined)
        _JOINED[key] = held
    return Chosen(held[1], z.shape[1], auxiliary)


_JOINED: dict[tuple[int, str], tuple[weakref.ref, np.ndarray]] = {}
