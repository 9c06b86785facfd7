"""The profile pass: one forward pass over every item that makes the Profile, in parts (the
spread items the blocks' directions are fitted on, then the rest; a Ray pass's shards)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from diagql.errors import DiagQLError, ExecutionError, warn
from diagql.model import auxiliaries as aux
from diagql.model import pass_clock, view_aliases
from diagql.model import winners as winners_module
from diagql.model.call_sites import CallSites, SharedCalls, shifted_between
from diagql.model.data import ItemSource
from diagql.model.forward import call_model, to_device
from diagql.model.hooks import Hooks, evaluation, first_tensor
from diagql.model.labels import check_labels
from diagql.model.profile import Profile
from diagql.model.same_rows import SameRows, by_layer, comparisons
from diagql.model.scores import Scores, as_logits, classes_of, same_widths
from diagql.model.views import ModuleCall, View, input_rows
from diagql.progress import Progress


def compute_profile(model, source: ItemSource, *, latent: str | None, latent_is_input: bool,
                    device: torch.device, dtype: torch.dtype, cast, batch_size: int,
                    progress: Progress, view: View | None = None, catalog=None,
                    scores: Scores | None = None) -> Profile:
    """One forward pass over every item, hooking the latent layer: its input, or its output
    read through ``view`` (a query's view of it, so a sequence layer's latent vector is each
    item's mean over its real tokens).

    With the ``catalog``, the same pass finds the layers whose rows equal the latent or the
    logits for every item (compared exactly, batch by batch), and keeps the logits, so that
    queries on those layers need no forward pass (docs/ARCHITECTURE.md, "Data model").
    ``scores``: where the class scores are in the model's output (the catalog's). ``dtype``:
    the rows' (session/models.py: model_dtype); ``cast``: what the batches' floating inputs
    are cast to (input_dtype: a dtype, or a Cast for a model of mixed dtypes)."""
    n = len(source)
    if n == 0:
        raise DiagQLError("the data set is empty")
    compare = comparisons(model, catalog, latent, latent_is_input, view, dtype, n)
    views = aux.blocks(model, catalog, n, latent, latent_is_input) \
        if catalog is not None else []
    options = {"latent": latent, "latent_is_input": latent_is_input, "device": device,
               "dtype": cast, "batch_size": batch_size, "view": view, "compare": compare,
               "winners": winners_module.views(catalog, n) if catalog is not None else [],
               "scores": scores or Scores(), "shared": SharedCalls.of(catalog)}
    started = time.perf_counter()
    with progress.task("profiling the data", n) as advance:
        if not views:
            parts = [profile_part(model, source, np.arange(n), advance=advance, **options)]
            profile = assemble_profile(parts, latent, latent_is_input, 0.0, view=view,
                                       dtype=dtype)
        else:  # the spread items first, their rows held for the fit; then the rest, projected
            fit, spread, rest = fit_items(views, n)
            fits, first = fit_part(model, source, spread, views=views, advance=advance,
                                   pairs=view_aliases.candidates(catalog, views), **options)
            pieces = [(spread, first)]
            if len(rest):
                pieces.append((rest, projected_part(model, source, rest, views=views, fits=fits,
                                                    advance=advance, **options)))
            parts = [part for _, part in pieces]
            profile = with_blocks(pieces, n, views, fits, fit, latent, latent_is_input,
                                  view=view, dtype=dtype)
    return dataclasses.replace(profile, seconds=time.perf_counter() - started,
                               **pass_clock.merged(parts))


@dataclass
class ProfilePart:
    """The profile of a run of consecutive items (the whole data, or a shard of a Ray pass)."""

    labels: np.ndarray | None  # None when some item came without a label
    predictions: np.ndarray
    confidence: np.ndarray
    latents: np.ndarray
    n_classes: int
    logits: np.ndarray | None = None  # kept when the pass was asked to
    # The views whose rows equalled the latent (the logits) for every item of this part.
    latent_views: tuple[str, ...] = ()
    logit_views: tuple[str, ...] = ()
    # Each block's z rows of these items, by layer name (a Ray pass's shard: projected_part).
    z: dict[str, np.ndarray] | None = None
    # Each layer's winners of these items, by view key (model/winners.py).
    winners: dict[str, np.ndarray] | None = None
    # The pass's seconds less DiagQL's own work in it (the blocks' projections, the winners,
    # the comparisons): about an exact query's pass over these items (``Profile.pass_seconds``),
    # and the seconds of it until each hooked layer's output was ready (model/pass_clock.py).
    pass_seconds: float = 0.0
    reached: dict[str, float] = dataclasses.field(default_factory=dict)
    # The layers that equalled a block's view on these items (the fit part's: fit_part).
    aliases: dict | None = None
    # The hooked layers that did not run in some batch (Profile.unran).
    unran: frozenset = frozenset()
    # Its shared modules' call sites, the first batch's (model/call_sites.py): compared with
    # the other parts' when they join.
    sites: SharedCalls | None = None


def profile_part(model, source: ItemSource, items: np.ndarray, *, latent: str | None,
                 latent_is_input: bool, device: torch.device, dtype,
                 batch_size: int, advance, view: View | None = None,
                 compare: tuple = ((), (), False),
                 project: aux.BlockProjector | None = None,
                 winners: list[View] | tuple = (),
                 scores: Scores | None = None,
                 shared: SharedCalls | None = None) -> ProfilePart:
    """The profile of ``items`` (sorted) from one pass over them; ``advance(n)`` is told of
    each batch. ``compare`` (from ``comparisons``): the views compared with the latent and
    with the logits, and whether the logits are kept; ``project``: the blocks' projector
    (a Ray pass's shards get one that projects on directions fitted once: projected_part);
    ``winners``: the views whose every item's winner it keeps (model/winners.py);
    ``scores``: where the class scores are in the model's output (model/scores.py);
    ``dtype``: what the batches' floating inputs are cast to (forward.to_device);
    ``shared``: the modules that run several times per pass (model/call_sites.py): their calls
    from the first whose place in forward() differs from the first batch's on are unran."""
    if latent is not None and not latent_is_input and view is None:
        raise ValueError("the output of a latent layer is read through its view")
    n = len(items)
    scores = scores or Scores()
    labels = np.empty(n, dtype=np.int64)
    predictions = np.empty(n, dtype=np.int64)
    confidence = np.empty(n, dtype=np.float64)
    latents: np.ndarray | None = None
    kept_logits: np.ndarray | None = None
    captured: list[torch.Tensor] = []

    def keep(call: ModuleCall) -> None:
        rows = input_rows(call, latent) if latent_is_input else view.finish(view.rows(call))
        captured.append(rows.detach().to("cpu", torch.float32, copy=True))

    callbacks = {} if latent is None or latent_is_input else {latent: keep}
    pre = {latent: keep} if latent is not None and latent_is_input else {}
    same_latent, same_logits = SameRows(list(compare[0])), SameRows(list(compare[1]))
    logits_kept = compare[2]
    position = 0
    has_labels = True
    unran: set[str] = set()
    keeper = winners_module.WinnerKeeper(list(winners), n)
    checks = by_layer([*SameRows.callbacks_of(same_latent, same_logits).items(),
                       *(project.callbacks() if project is not None else {}).items(),
                       *keeper.callbacks().items()])
    clock = pass_clock.PassClock()  # DiagQL's own work, in the hooks and after, apart
    checks = {name: clock.timed(name, callback) for name, callback in checks.items()}
    axes = {v.layer.name: v.layer.batch_axis for v in [
        *compare[0], *compare[1], *winners, *(project.views.values() if project else ())]}

    def ran_again(layer: str, output) -> None:
        for part in (same_latent, same_logits, project, keeper):
            if part is not None:
                part.drop_layer(layer)
        # Run again on the whole batch (a loop whose length depends on the data), not on a
        # piece of it (a forward that splits its batch, whose queries say so by the rows'
        # shape): its queries stop after its first call, which had answered alone (LL1).
        # Along its batch axis: a piece as wide as the batch is not a whole batch (MM1).
        rows = first_tensor(output)
        axis = axes.get(layer, 0)
        if rows is not None and rows.dim() > axis and rows.shape[axis] == compared.size:
            unran.add(layer)

    with evaluation(model), Hooks(model, callbacks, pre) as hooks, \
            Hooks(model, checks, ran_again=ran_again) as compared, \
            CallSites(model, shared or SharedCalls()) as sites:
        for idx, x, y in source.batches(items, batch_size):
            x = to_device(x, device, dtype)
            hooks.start(x, len(idx))
            compared.start(x, len(idx))
            sites.start()
            captured.clear()
            logits = as_logits(scores.read(call_model(model, x, idx), len(idx)))
            if latent is not None:
                hooks.check_ran()
            after = time.perf_counter()
            probs = scores.probabilities_of(logits)
            conf, pred = probs.max(dim=1)
            broken = probs.isnan().any(dim=1)
            if bool(broken.any()) and logits.ndim == 2 and logits.shape == probs.shape:
                # torch.argmax's class for NaN scores (the first NaN's), as the notice says:
                # their softmax's NaN row had made every one class 0 (sweep SX10).
                pred = torch.where(broken, logits.argmax(dim=1).to(pred.device), pred)
            batch = slice(position, position + len(idx))
            if y is None:
                has_labels = False
            else:
                labels[batch] = y
            predictions[batch] = pred.cpu().numpy()
            confidence[batch] = conf.cpu().numpy()
            z = captured[0] if captured else logits.detach().to("cpu", torch.float32)
            if latents is None:
                latents = np.empty((n, z.shape[1]), dtype=np.float32)
                widths = (logits.shape[1], z.shape[1])
            same_widths(widths, (logits.shape[1], z.shape[1]), idx, latent)
            latents[batch] = z.numpy()
            same_latent.compare(z)
            if logits_kept:
                out = logits.detach().to("cpu", torch.float32)
                same_logits.compare(out)
                kept_logits = kept_logits if kept_logits is not None else \
                    np.empty((n, out.shape[1]), dtype=np.float32)
                kept_logits[batch] = out.numpy()
            if project is not None:
                project.after_batch(len(idx))
            keeper.after_batch(len(idx))
            unran.update(layer for layer in checks if layer not in compared.ran)
            unran.update(sites.shifted())  # a call that moved in forward() (SW1)
            clock.own += time.perf_counter() - after
            position += len(idx)
            advance(len(idx))
            clock.next_batch()
    return ProfilePart(labels if has_labels else None, predictions, confidence, latents,
                       classes_of(tuple(logits.shape[1:])), kept_logits, same_latent.keys(),
                       same_logits.keys() if logits_kept else (), winners=keeper.result(),
                       pass_seconds=clock.seconds(), reached=clock.reached,
                       unran=frozenset(unran), sites=shared)


def fit_items(views: list[View], n: int) -> tuple[int, np.ndarray, np.ndarray]:
    """How many items a profile pass over ``n`` fits the blocks' directions on (up to FIT_ITEMS
    and the rows' HOLD_BUDGET), which (spread over the whole data, ``spread_items``, so that
    data sorted by class gives the directions of every class) and the rest, which are only
    projected. Every form of data DiagQL takes is read by index (model/data.py), so the
    spread items cost no extra forward pass."""
    fit = aux.BlockProjector(views, n).fit_items
    spread = aux.spread_items(n, fit)
    return fit, spread, np.setdiff1d(np.arange(n), spread, assume_unique=True)


def fit_part(model, source: ItemSource, items: np.ndarray, *, views: list[View],
             pairs: list | tuple = (), **options) -> tuple[dict, ProfilePart]:
    """The profile pass's first part, over the spread ``items`` (from ``fit_items``): the
    blocks' directions (``BlockProjector.fitted``) fitted on all of them (a block that failed
    has none), and the items' profile part with their z rows and the layers of ``pairs``
    that equalled a block's view (view_aliases.candidates). On Ray, one worker's task.
    ``options``: profile_part's."""
    project = aux.BlockProjector(views, len(items), pairs=pairs)
    project.fit_items = len(items)  # the driver's count (FIT_ITEMS there), not the worker's
    part = profile_part(model, source, items, project=project, **options)
    project.finish()
    part.z, part.aliases = dict(project.z), project.aliases()
    return project.fitted(), part


def projected_part(model, source: ItemSource, items: np.ndarray, *, views: list[View],
                   fits: dict, **options) -> ProfilePart:
    """The profile part of the items the directions were not fitted on (on Ray, a shard's),
    with their z rows of each block, projected on the directions ``fits`` (from
    ``fit_part``), so that every item is projected on the same ones."""
    project = aux.BlockProjector(views, len(items), fits=fits)
    part = profile_part(model, source, items, project=project, **options)
    part.z = dict(project.z)
    return part


def with_blocks(pieces: list[tuple[np.ndarray, ProfilePart]], n: int, views: list[View],
                fits: dict, fit: int, latent: str | None, latent_is_input: bool, *,
                view: View | None, dtype: torch.dtype | None) -> Profile:
    """The Profile of all ``n`` items from the spread items' part and the rest's parts (each
    with its items: ``interleave``), with the blocks' Auxiliaries (``fits`` fitted on ``fit``
    items); the views the profile holds whole need no projection. The local pass and the Ray
    engine's both end here; ``seconds`` is the caller's to set."""
    part = interleave(pieces, n)
    profile = assemble_profile([part], latent, latent_is_input, 0.0, view=view, dtype=dtype)
    return dataclasses.replace(profile, auxiliaries=aux.joined(
        views, fits, part.z, fit, profile.latent_views + profile.logit_views,
        aliases=pieces[0][1].aliases))


def interleave(pieces: list[tuple[np.ndarray, ProfilePart]], n: int) -> ProfilePart:
    """One part of all ``n`` items from parts of disjoint sets of them, each given with its
    item indices: the spread items' (``fit_part``) and the rest's. A block keeps z rows, a layer
    its winners, and a layer the latent's (the logits') rows, only if it did in every part."""
    parts = [part for _, part in pieces]
    _same_shapes(parts)

    def scatter(arrays: list[np.ndarray]) -> np.ndarray:
        out = np.empty((n, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
        for (items, _), array in zip(pieces, arrays):
            out[items] = array
        return out

    labels = None if any(p.labels is None for p in parts) else scatter([p.labels for p in parts])
    logits = None if any(p.logits is None for p in parts) else scatter([p.logits for p in parts])
    return ProfilePart(labels, scatter([p.predictions for p in parts]),
                       scatter([p.confidence for p in parts]), scatter([p.latents for p in parts]),
                       parts[0].n_classes, logits, _in_every([p.latent_views for p in parts]),
                       _in_every([p.logit_views for p in parts]),
                       _in_all([p.z for p in parts], scatter),
                       _in_all([p.winners for p in parts], scatter),
                       unran=frozenset().union(*(p.unran for p in parts),
                                               shifted_between([p.sites for p in parts])),
                       sites=parts[0].sites)


def assemble_profile(parts: list[ProfilePart], latent: str | None, latent_is_input: bool,
                     seconds: float, view: View | None = None,
                     dtype: torch.dtype | None = None) -> Profile:
    """The Profile of every item from the parts of consecutive runs of them, in order. A
    layer holds the latent's (the logits') rows only if it did in every part."""
    _same_shapes(parts)
    n_classes = parts[0].n_classes
    has_labels = all(part.labels is not None for part in parts)
    predictions = _join([part.predictions for part in parts])
    if has_labels:
        labels = _join([part.labels for part in parts])
        # A Hugging Face test split's -1s: one negative value on every item (-3, -2 and -1
        # had been said to be "every label is -2" and dropped; check_labels names them).
        if len(labels) and labels[0] < 0 and bool(np.all(labels == labels[0])):
            warn(f"every label is {int(labels[0])} (a test split without labels?): "
                 f"the data is taken as unlabelled")
            has_labels = False
            labels = np.full(len(predictions), -1, dtype=np.int64)
        else:
            check_labels(labels, n_classes)
    else:
        labels = np.full(len(predictions), -1, dtype=np.int64)  # treat the data as unlabelled
    if latent is None:
        layer = "output"
    else:
        layer = f"input of {latent}" if latent_is_input else latent
    latent_views = _in_every([part.latent_views for part in parts])
    if view is not None and dtype != torch.float64:  # SET latent's own view holds them by making
        latent_views = (view.key, *latent_views)
    logits = None
    if all(part.logits is not None for part in parts):
        logits = _join([part.logits for part in parts])
    winners = _in_all([part.winners for part in parts], _join)
    return Profile(labels, predictions, _join([part.confidence for part in parts]),
                   _join([part.latents for part in parts]), n_classes, layer, seconds,
                   has_labels, logits, latent_views,
                   _in_every([part.logit_views for part in parts]) if logits is not None else (),
                   winners=winners, unran=tuple(sorted(frozenset().union(
                       *(part.unran for part in parts),
                       shifted_between([part.sites for part in parts])))))


def _same_shapes(parts: list[ProfilePart]) -> None:
    n_classes = parts[0].n_classes
    for part in parts:
        if part.n_classes != n_classes or part.latents.shape[1] != parts[0].latents.shape[1]:
            raise ExecutionError(f"the model's output changed shape between items: "
                                 f"{n_classes} then {part.n_classes} classes")


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)  # no copy of one part


def _in_all(tables: list[dict | None], join) -> dict[str, np.ndarray]:
    """The arrays that every part's table holds (a block's z rows, a view's winners), each
    joined over the parts by ``join``; a part without a table holds none."""
    tables = [table or {} for table in tables]
    return {key: join([table[key] for table in tables]) for key in tables[0]
            if all(key in table for table in tables[1:])}


def _in_every(keys: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The keys of the first tuple that every other holds too, in its order."""
    return tuple(key for key in keys[0] if all(key in other for other in keys[1:]))
