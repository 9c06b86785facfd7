"""The covariates of the model-assisted estimator (docs/ARCHITECTURE.md, "Estimates"): every
item's latent vector reduced to a few whitened principal components, and the queried block's
own principal projections where the profile kept them, known for every item from the profile,
so that a sample's answer can be corrected toward the matching items' own."""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from diagql.model.auxiliaries import DIMS as BLOCK_DIMS
from diagql.model.auxiliaries import FIT_ITEMS, Auxiliary, principal
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
    held: bool = False  # the auxiliary is the view's rows held by the profile (``_held``)

    def describe(self, profile: Profile) -> str:
        """What the assisted estimator fits on, for EXPLAIN."""
        latent = f"{self.latent_dims} principal components of the latent ({profile.latent_layer})"
        if self.auxiliary is None:
            return f"assisted: a linear fit on {latent}"
        a = self.auxiliary
        if self.held:
            basis = ("its own row" if a.basis.shape[1] == 2 * a.basis.shape[0]
                     else f"its row's {a.basis.shape[1]} principal components")
            return (f"assisted: every item predicted from {basis} (the profile holds every "
                    f"item's {a.layer}), the residual fitted on {latent}")
        return (f"assisted: every item predicted from {a.layer}'s {a.basis.shape[1]} principal "
                f"components kept by the profile pass (known coefficients, fitted on "
                f"{a.fitted_on:,} items), the residual fitted on {latent}")


def for_view(profile: Profile, view_key: str, own: bool = True) -> Chosen:
    """The covariates of a sample query on the view with this key: the auxiliary nearest to
    it is the view's own block projections when the profile kept them, or its own rows when
    the profile holds them (``_held``; only if ``own``: the profile is the queried model's),
    else the latent."""
    z = covariates(profile)
    key = (id(profile), view_key, own)
    memo = _JOINED.get(key)
    if memo is not None and memo[0]() is profile:
        return Chosen(memo[1], z.shape[1], memo[2], memo[3])
    auxiliary, held = profile.auxiliary(view_key), False
    if auxiliary is None and own:
        auxiliary = _held(profile.rows_of(view_key), view_key)
        held = auxiliary is not None
    if auxiliary is None:
        return Chosen(z, z.shape[1], None)
    joined = np.concatenate([z, auxiliary.z.astype(np.float64)], axis=1)
    joined.setflags(write=False)
    _JOINED[key] = (weakref.ref(profile, lambda _, key=key: _JOINED.pop(key, None)), joined,
                    auxiliary, held)
    return Chosen(joined, z.shape[1], auxiliary, held)


def _held(rows: np.ndarray | None, view_key: str) -> Auxiliary | None:
    """A view whose every row the profile holds (the latent, the logits) is its own auxiliary:
    the block prediction (engine/prediction.py) then predicts each sampled item by its own
    row, the residual is 0, and the estimate is the matching items' exact mean (a regression
    estimator with a perfect auxiliary). Fitted on the 10 latent components alone, its
    intervals had been wrong both ways (benchmarks/README.md, "Issue 15, part 3"): the rows are
    linear in the whole latent, so the residual after 10 components is the latent's other
    directions, where every sampler chooses (herding and stratification balance them, latent
    grids and two-ended draws spread them). Up to HELD_WIDTH columns the basis is the identity
    (exact), and the items' one-hot winners follow the rows, so that the matching items' mean
    of them is the exact ARGMAX (``BlockPrediction.winners``); a wider view gets its BLOCK_DIMS
    principal directions, as a block does, and its ARGMAX the latent's fit."""
    if rows is None:
        return None
    width = rows.shape[1]
    if width <= HELD_WIDTH:
        # The row, then its one-hot winner (an ARGMAX's y), which the basis leaves out of ŷ.
        mean = np.zeros(width, np.float32)
        basis = np.hstack([np.eye(width), np.zeros((width, width))]).astype(np.float32)
        winners = np.zeros((len(rows), width), np.float32)
        winners[np.arange(len(rows)), rows.argmax(axis=1)] = 1.0
        z = np.hstack([np.asarray(rows, dtype=np.float32), winners])
    else:
        fitted = principal(torch.from_numpy(np.asarray(rows[:FIT_ITEMS])), BLOCK_DIMS)
        mean, basis = (part.numpy().astype(np.float32) for part in fitted)
        z = (rows - mean) @ basis
    return Auxiliary(view_key, json.loads(view_key)[0], mean, basis, z, len(rows))


# The widest held view predicted by its rows themselves: with its one-hot winners at most 2 KB
# per item in float64, four times a block's BLOCK_DIMS projections.
HELD_WIDTH = 128
_JOINED: dict[tuple[int, str, bool], tuple[weakref.ref, np.ndarray, Auxiliary, bool]] = {}
