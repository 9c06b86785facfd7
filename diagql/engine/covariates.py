"""The covariates of the model-assisted estimator (docs/ARCHITECTURE.md, "Estimates"): every
item's latent vector reduced to a few whitened principal components, and the queried block's
own principal projections where the profile kept them, known for every item from the profile,
so that a sample's answer can be corrected toward the matching items' own."""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import numpy as np

from diagql.model.auxiliaries import DIMS as BLOCK_DIMS
from diagql.engine.prediction import BlockPrediction
from diagql.model.auxiliaries import Auxiliary
from diagql.model.hooks import scope
from diagql.model.profile import Profile
from diagql.model.view_aliases import Alias
from diagql.samplers.space import fit_space

# Chosen by measurement (benchmarks/estimator_choice.py): on the demo and a small ResNet, 10
# components with a ridge of 10 (in whitened units) did as well as 20 or 40 for queries over
# many items and, unlike them, never did worse than the plain mean over the few items of one
# (class, correctness) cell.
DIMS = 10

_MEMO: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def once_per_profile(memo: dict, key, profile: Profile, make):
    """``make()``, made once for this profile and kept in ``memo`` under ``key`` (which
    starts with ``id(profile)``) for as long as the profile lives."""
    held = memo.get(key)
    if held is None or held[0]() is not profile:
        held = (weakref.ref(profile, lambda _, key=key: memo.pop(key, None)), make())
        memo[key] = held
    return held[1]


def covariates(profile: Profile) -> np.ndarray:
    """(N, p ≤ DIMS) float64: each item's standardised latent on its leading principal axes,
    each component scaled to unit variance over all items (so one ridge fits every model).
    Those the profile keeps (``reduced`` when the connection made it, 0.05 s at 50,000 items
    that a new process would pay again), else computed once per profile."""
    if profile.covariates is not None:
        profile.covariates.setflags(write=False)
        return profile.covariates
    return once_per_profile(_MEMO, id(profile), profile, lambda: reduced(profile.latents))


def reduced(latents: np.ndarray) -> np.ndarray:
    """``covariates`` of a profile with these latents (read-only)."""
    z = fit_space(latents, DIMS)(latents)[:, :DIMS]
    spread = z.std(axis=0)
    z = z[:, spread > 0] / spread[spread > 0]
    z.setflags(write=False)
    return z


@dataclass(frozen=True)
class Covariates:
    """Every item's covariates, held as their parts (the latent's N × p float64 components,
    then a block's N × k float32 projections, or a held view's rows: ``_held``)
    and joined only for the rows a pass or a fit
    asks for: a joined N × (p + k) float64 copy would take 59 MB at 100,000 items and 5.9 GB
    at 10 million, and most of it would never be read. ``items``: the (sorted) items the rows
    are of, when they are a subset's (a shard's part of a pass); None: every item's, row i
    item i's."""

    parts: tuple  # arrays (N × columns)
    items: np.ndarray | None = None

    @property
    def width(self) -> int:
        return sum(part.shape[1] for part in self.parts)

    def rows(self, idx: np.ndarray, width: int | None = None) -> np.ndarray:
        """(len(idx), width) float64: the covariates of items ``idx`` (among ``items``); with
        ``width``, their first ``width`` columns only."""
        at = idx if self.items is None else np.searchsorted(self.items, idx)
        width = self.width if width is None else width
        out = np.empty((len(at), width))
        column = 0
        for part in self.parts:
            if column >= width:
                break
            take = min(part.shape[1], width - column)
            out[:, column:column + take] = part[at] if take == part.shape[1] else \
                part[at, :take]
            column += take
        return out

    def subset(self, items: np.ndarray) -> Covariates:
        """The rows of ``items`` only, joined: what a shard's part of a pass carries."""
        return Covariates((self.rows(items),), np.asarray(items))

    def means(self, matching: np.ndarray, keys: np.ndarray | None, population: dict) -> dict:
        """Each group's mean covariates over its matching items (``keys``: the matching items'
        group keys; None: one group), for the groups in ``population``. Summed in float64 over
        runs of at most _RUN rows, so no N × width copy is ever made."""
        if keys is None:
            groups, codes = np.array([None], dtype=object), np.zeros(len(matching), np.int64)
            order = matching
        else:
            groups, codes = np.unique(keys, return_inverse=True)
            codes = codes.reshape(-1)
            by_group = np.argsort(codes, kind="stable")  # each group's items stay ascending
            order, codes = matching[by_group], codes[by_group]
        sums = np.zeros((len(groups), self.width))
        for start in range(0, len(order), _RUN):
            sums += self._group_sums(order[start:start + _RUN], codes[start:start + _RUN],
                                     len(groups))
        counts = np.bincount(codes, minlength=len(groups))
        means = sums / np.maximum(counts, 1)[:, None]
        return {key: means[g] for g, key in enumerate(groups.tolist()) if key in population}

    def _group_sums(self, items: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
        """Per group, the sums of these items' rows (``codes`` sorted)."""
        out = np.zeros((n_groups, self.width))
        if not len(items):
            return out
        # A run read by slice must be consecutive and ascending: items sorted by group can span
        # exactly first..last in another order (every item, grouped), and a slice would pair
        # each code with another item's row.
        if self.items is None and bool(np.all(np.diff(items) == 1)):
            at = slice(int(items[0]), int(items[-1]) + 1)  # a run: no gather
        else:
            at = items if self.items is None else np.searchsorted(self.items, items)
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        ends = np.r_[starts[1:], len(codes)]
        column = 0
        for part in self.parts:  # each part summed in float64 where it is: no joined copy
            width = part.shape[1]
            rows = part[at]
            # A float32 run is cast first: casting as it adds was 1.5-3x slower (a block's
            # 100,000 × 64 projections: 15 ms against 5-10 ms), the same sums.
            if rows.dtype != np.float64:
                rows = rows.astype(np.float64)
            # Each group's rows are one slice of the run (codes sorted), summed as a slice:
            # np.add.reduceat over the same segments took 2.8x as long (100,000 × 64 in runs
            # of 8,192: 11.5 ms against 4.1 ms), the same sums bit for bit.
            for start, end in zip(starts.tolist(), ends.tolist()):
                out[codes[start], column:column + width] = rows[start:end].sum(axis=0)
            column += width
        return out


# Rows of a run of the covariates summed at a time by Covariates.means: 1-5 MB of float64.
_RUN = 8192


@dataclass(frozen=True)
class Chosen:
    """The covariates of one view's sample queries: the latent's components, then, when the
    profile kept the view's own block projections, those (model/auxiliaries.py)."""

    z: Covariates  # p [+ k] columns
    latent_dims: int  # p: the first columns, the latent's
    auxiliary: Auxiliary | None  # the view's block projections: the last k columns
    # The auxiliary is made from the view's rows the profile holds (``_held``): "rows" (each
    # item's own row); or it is the view's block projections and spans the view
    # (``Auxiliary.spans``): "spanned", each item's row rebuilt.
    held: str | None = None
    # A view with no block projections of its own: the nearest block's (``nearest_block``),
    # whose major directions are covariates (after the latent's) and whose minor ones check
    # the fit (engine/extrapolation.py).
    neighbour: Auxiliary | None = None
    encloses: bool = False  # the neighbour is a block the view is inside (not one before it)
    # The block before the one the view is inside (``feeder_block``), whose output that
    # block's first layers read: its leading directions are covariates too.
    feeder: Auxiliary | None = None
    # No block comes after the view: it lies between its neighbour and the latent (a pooling
    # before the head, the Linear whose ReLU is the latent), checked on the latent's own
    # coordinates too (engine/extrapolation.py).
    last: bool = False
    # Its input was made from the neighbour's output through modules alone (a ReLU or a
    # pooling after its block): a function of that block's output (engine/extrapolation.py).
    fed: bool = False
    # The view's rows equal the auxiliary's block view, or its channel means (a global
    # pooling after a residual stage: model/view_aliases.py), as the profile pass found.
    alias: Alias | None = None

    def prediction(self, channels: int | None = None,
                   channels_last: bool = False) -> BlockPrediction | None:
        """The block prediction its auxiliary makes (None: the latent fit alone); ``channels``:
        a CHANNELS view's channel count (``channels_last``: a map's last axis), or the
        alias's when the view is a block map's channel means."""
        if self.auxiliary is None:
            return None
        if self.alias is not None and self.alias.channels is not None:
            channels, channels_last = self.alias.channels, self.alias.channels_last
        return BlockPrediction(self.auxiliary, self.latent_dims, channels,
                               own_rows=self.exact, channels_last=channels_last,
                               rebuilt=self.held == "spanned")

    @property
    def exact(self) -> bool:
        """Whether each item's own row predicts it (held, or rebuilt from directions that span
        the view): the matching items' means are then known, not estimated."""
        return self.held in ("rows", "spanned")

    def describe(self, profile: Profile) -> str:
        """What the assisted estimator fits on, for EXPLAIN."""
        latent = f"{self.latent_dims} principal components of the latent ({profile.latent_layer})"
        if self.neighbour is not None:
            feeder = "" if self.feeder is None else \
                (f", and the {leading(self.feeder)} of {self.feeder.layer}, the block before "
                 f"it")
            return (f"assisted: a linear fit on {latent} and the {leading(self.neighbour)} leading "
                    f"principal components of {self.neighbour.layer}, the nearest block{feeder}, "
                    f"kept by the profile pass")
        if self.auxiliary is None:
            return f"assisted: a linear fit on {latent}"
        a = self.auxiliary
        if self.alias is not None:
            view = " ".join(json.loads(a.key)[1:]) or "output"
            what = "channel means" if self.alias.channels is not None else view
            return (f"assisted: every item predicted from {a.layer}'s {a.basis.shape[1]} "
                    f"principal components kept by the profile pass (the layer equals {a.layer}'s "
                    f"{what} on the items they were fitted on), the residual fitted on {latent}")
        held = f"{a.layer} channel means" if json.loads(a.key)[1:] == ["CHANNELS"] else a.layer
        if self.held == "spanned":
            return (f"assisted: exact, the means computed from every matching item's row, "
                    f"rebuilt from all {a.basis.shape[1]} of {a.layer}'s principal components "
                    f"kept by the profile pass (they span the layer)")
        if self.held == "rows":  # answers.py: ``_held``
            return (f"assisted: exact, the means computed from every matching item's own row "
                    f"(the profile holds every item's {held})")
        # Which items: profile_pass.fit_items spreads them over the data (model/auxiliaries.py).
        fitted = "every item" if a.fitted_on >= len(a.z) else \
            f"{a.fitted_on:,} items spread over the data"
        return (f"assisted: every item predicted from {a.layer}'s {a.basis.shape[1]} principal "
                f"components kept by the profile pass (known coefficients, fitted on "
                f"{fitted}), the residual fitted on {latent}")


def for_view(profile: Profile, view_key: str, own: bool = True,
             before: tuple[str, ...] = (), held_key: str | None = None,
             rebuild: bool = True, upstream: tuple[str, ...] = ()) -> Chosen:
    """The covariates of a sample query on the view with this key: the auxiliary nearest to
    it is the view's own block projections when the profile kept them, or its own rows when
    the profile holds them (``_held``; only if ``own``: the profile is the queried model's),
    else the nearest block's leading projections beside the latent (``nearest_block``;
    ``before``: the model's layers before this one, in order), else the latent alone.
    ``held_key``: the key its rows are held under when not ``view_key`` (View.held_key: a
    map's channel means, which may be held where the map's block keeps projections).
    ``rebuild``: whether the profile pass's rows are any pass's (BoundQuery.repeatable), so
    that projections spanning the view rebuild its exact rows. ``upstream``: the modules the
    view's input was made from (LayerCatalog.upstream), which say whether it is a function
    of its nearest block's output (``Chosen.fed``)."""
    z = covariates(profile)
    auxiliary = profile.auxiliary(view_key)
    held_key = held_key or view_key
    if own and (auxiliary is None or held_key != view_key):
        own_rows = once_per_profile(_HELD, (id(profile), held_key), profile,
                                    lambda: _held(profile.rows_of(held_key), held_key))
        if own_rows is not None:
            auxiliary, held = own_rows
            return Chosen(Covariates((z, auxiliary.z)), z.shape[1], auxiliary, held)
    alias = profile.auxiliaries.aliases.get(view_key) if auxiliary is None and own else None
    target = profile.auxiliary(alias.target) if alias is not None else None
    if target is not None:
        return Chosen(Covariates((z, target.z)), z.shape[1], target, alias=alias)
    if auxiliary is None:
        near, encloses = nearest_block(profile, json.loads(view_key)[0], before,
                                       tuple(json.loads(view_key)[1:])) if own \
            else (None, False)
        if near is not None and near.z.shape[1] >= 4:  # at least two fitted, two checking
            major = once_per_profile(_WHITENED, (id(profile), near.key), profile,
                                     lambda: whitened(near.z[:, :leading(near)]))
            position = set(before)
            last = not encloses and all(name in position
                                        for _, name in profile.auxiliaries.names)
            fed = not encloses and any(near.layer in scope(name) for name in upstream)
            feeder = feeder_block(profile, near.layer, before, tuple(json.loads(view_key)[1:]),
                                  upstream) if encloses else None
            if feeder is not None and feeder.z.shape[1] >= 4:
                earlier = once_per_profile(_WHITENED, (id(profile), feeder.key), profile,
                                           lambda: whitened(feeder.z[:, :leading(feeder)]))
                return Chosen(Covariates((z, major, earlier)), z.shape[1], None,
                              neighbour=near, encloses=True, last=last, feeder=feeder)
            return Chosen(Covariates((z, major)), z.shape[1], None, neighbour=near,
                          encloses=encloses, last=last, fed=fed)
        return Chosen(Covariates((z,)), z.shape[1], None)
    # Directions that span the view hold every item's row (of this model's own profile only,
    # where its pass's rows are any pass's).
    return Chosen(Covariates((z, auxiliary.z)), z.shape[1], auxiliary,
                  "spanned" if own and rebuild and auxiliary.spans else None)


# A view in no block of its own is fitted on the nearest block's leading projections beside the
# latent's: measured (benchmarks/README.md, "Layers beside a block") on an MLP's ReLU after its
# first Linear under vas(0.05), the cosine distance to the exact answer fell from 0.053 to
# 0.006 and the top-10 precision rose from 0.2 to 0.7; the other half of the block's
# directions checks the fit.
NEIGHBOUR_DIMS = BLOCK_DIMS // 2


def leading(block: Auxiliary) -> int:
    """How many of a neighbour block's directions are covariates: half of them, at most
    NEIGHBOUR_DIMS (a narrow block, a GRU of 32 units, keeps 32: 16 and 16); the rest check."""
    return min(NEIGHBOUR_DIMS, block.z.shape[1] // 2)


_WHITENED: dict = {}  # once per profile and block


def whitened(z: np.ndarray) -> np.ndarray:
    """Columns scaled to unit variance over all items, as the latent's are (one ridge), in
    float32, read-only (a constant column is left as it is)."""
    spread = z.std(axis=0, dtype=np.float64)
    out = (z / np.where(spread > 0, spread, 1.0)).astype(np.float32)
    out.setflags(write=False)
    return out


def nearest_block(profile: Profile, layer: str, before: tuple[str, ...],
                  reduction: tuple = ()) -> tuple[Auxiliary | None, bool]:
    """The block nearest to a layer that is none, and whether it encloses the layer: the
    layer's own block in its default view (a GRU's ``TOKEN -1`` beside its mean over
    tokens), or the innermost block enclosing it (a layer inside a block: ``conv1.0``), else
    the last block before it in the model's order of registration (``before``: an MLP's ReLU
    after its Linear), or the outermost block enclosing that one (a pooling after a residual
    stage reads the stage's output, not its shortcut's, registered last: the ResNet's pool
    and hidden.0 under vas had been fitted on ``block2.skip``, cosine 1.1e-3 and 5.1e-4 to
    the exact answer, 4.1e-4 and 7.6e-5 on ``block2``). Of a sequence block's views, the one
    of the query's ``reduction`` (View.key's after the layer) where the profile kept it, else
    its first (a layer inside a transformer's encoder read at ``TOKENS MAX`` on the encoder's
    ``TOKENS MAX``: it had taken whichever view came first, its ``TOKEN -1``)."""
    names = profile.auxiliaries.names
    inside = [name for _, name in names
              if layer == name or layer.startswith(name + ".")]  # == : another view of it
    if inside:
        return profile.auxiliary(_view_of(names, max(inside, key=len), reduction)), True
    position = {name: i for i, name in enumerate(before)}
    return _last_block(profile, [(position[name], name) for _, name in names
                                 if name in position], reduction), False


def feeder_block(profile: Profile, block: str, before: tuple[str, ...],
                 reduction: tuple = (), upstream: tuple[str, ...] = ()) -> Auxiliary | None:
    """The block before ``block`` (the innermost one enclosing a queried layer), whose output
    the layers inside ``block`` are made from: the first outside it on the layer's
    ``upstream`` chain (its outermost block that does not enclose ``block``: a ResNet skip
    branch's ``block2.skip.0`` reads block1's output, not its sibling ``block2.body``'s, the
    review RV1), else, where that chain stops inside (a residual sum is made by no module),
    the last block registered before ``block`` that does not enclose it, climbed as
    ``nearest_block`` climbs. A transformer layer's attention is a function of the layer
    before, which its own layer's leading directions do not span: fitted on those alone, a
    RoBERTa's ``layer.1.attention.output.dense`` under maxmargin(0.1) had covered its exact
    means 0.23, with the layer before's 1.0 (the sweeps SS1 and SS2; benchmarks/README.md,
    "thirty-first session")."""
    names = profile.auxiliaries.names
    outside = [name for _, name in names if name != block and not block.startswith(name + ".")
               and not name.startswith(block + ".")]
    for module in upstream:
        holders = [name for name in outside if module == name or module.startswith(name + ".")]
        if holders:
            return profile.auxiliary(_view_of(names, min(holders, key=len), reduction))
    position = {name: i for i, name in enumerate(before)}
    if block not in position:
        return None
    return _last_block(profile, [(position[name], name) for name in outside
                                 if position.get(name, len(before)) < position[block]],
                       reduction)


def _last_block(profile: Profile, earlier: list[tuple[int, str]],
                reduction: tuple) -> Auxiliary | None:
    """Of blocks (their position among the model's layers, their name), the last, or the
    outermost block enclosing it."""
    if not earlier:
        return None
    _, name = max(earlier)
    for _, outer in earlier:  # any order: each ancestor found climbs further
        if name.startswith(outer + "."):
            name = outer
    return profile.auxiliary(_view_of(profile.auxiliaries.names, name, reduction))


def _view_of(names, block: str, reduction: tuple) -> str:
    """The key of ``block``'s view of the query's ``reduction`` where the profile kept it, else
    its first."""
    keys = [key for key, name in names if name == block]
    return next((key for key in keys if tuple(json.loads(key)[1:]) == tuple(reduction)),
                keys[0])


def _held(rows: np.ndarray | None, view_key: str) -> tuple[Auxiliary, str] | None:
    """A view whose every row the profile holds (the latent, the logits) is its own auxiliary:
    the block prediction (engine/prediction.py) then predicts each sampled item by its own
    row, the residual is 0, and the estimate is the matching items' exact mean (a regression
    estimator with a perfect auxiliary). Fitted on the 10 latent components alone, its
    intervals had been wrong both ways (benchmarks/README.md, "Issue 15, part 3"): the rows are
    linear in the whole latent, so the residual after 10 components is the latent's other
    directions, where every sampler chooses (herding and stratification balance them, latent
    grids and two-ended draws spread them). The basis is the identity at any width, held as
    None (``Auxiliary.basis``; z is the profile's own rows, no copy): a view wider than 128
    had been predicted from its 64 principal directions with the residual fitted, and a GRU's
    200-wide latent covered 0.82-0.88 under vas, gmm, ebtree and maxmargin (sweep II1).
    Returns the auxiliary and "rows" (``Chosen.held``)."""
    if rows is None:
        return None
    layer = json.loads(view_key)[0]
    rows = np.asarray(rows, dtype=np.float32)
    mean = np.zeros(rows.shape[1], np.float32)
    return Auxiliary(view_key, layer, mean, None, rows, len(rows)), "rows"


_HELD: dict[tuple[int, str], tuple[weakref.ref, tuple[Auxiliary, str] | None]] = {}
