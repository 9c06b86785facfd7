"""SHOW and DESCRIBE: what the model, the data, the samplers and the session hold."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from diagql import samplers
from diagql.errors import DiagQLError
from diagql.language import ast
from diagql.language.binder import bind_layer, calls_text, lookup_layer
from diagql.model.score_notices import profile_notices
from diagql.model.views import SEQUENCE, View
from diagql.results.formats import Bytes, Count, Percent, Probability, size_text
from diagql.results.result import Result
from diagql.storage.store import abandoned, remove_abandoned


def show(conn, statement: ast.Show) -> Result:
    return {"layers": _layers, "samplers": _samplers, "profile": _profile,
            "settings": _settings, "cache": _cache, "models": _models}[statement.what](conn,
                                                                                   statement)


def _models(conn, statement) -> Result:
    """Every model of the connection: its class, size, weights and accuracy on the data (from
    its profile: one pass per model, kept like any profile), and where its class scores are
    in its output."""
    conn.require_model()
    current = conn.current
    rows, notes = [], []
    for name, entry in conn.models.items():
        module = entry.architecture()
        try:
            profile = entry.profile
            scores = entry.scores_text()
        except DiagQLError as exc:
            # One model's mistake (labels outside its classes, a checkpoint that does not fit):
            # the others stand.
            if len(conn.models) == 1:
                raise
            notes.append(exc.message)
            accuracy = scores = "—"
        else:
            accuracy = Percent(profile.correct.mean()) if profile.has_labels else "no labels"
            # What the profile warns of about its scores (a head read that scores at chance),
            # here too: computed for this statement, before a catalog said where they were,
            # its warning had been left out, and no later statement gave it.
            notes += [notice if len(conn.models) == 1 else f"{name}: {notice}"
                      for notice in _notices(entry.catalog, profile)]
        parameters = Count(sum(p.numel() for p in module.parameters()))
        rows.append((name, type(module).__name__, parameters,
                     entry.describe_weights(), accuracy, "*" if entry is current else "",
                     scores))
    return Result(kind="table", statement=statement.text,
                  columns=["model", "class", "parameters", "weights", "accuracy", "default",
                           "scores"],
                  rows=rows, title=f"{len(rows)} model{'s' if len(rows) != 1 else ''} over "
                                   f"{len(conn.source):,} items (SET model = name changes the "
                                   f"default)", notes=notes)


KINDS = {"profile": "labels, predictions, confidence and latents of every item",
         "sample": "the items a sampler drew",
         "activations": "sampled items' outputs of one layer",
         "catalog": "the model's layers and their output shapes",
         "auxiliary": "a block's principal projections of every item, named by a profile"}


COLUMNS = ["kind", "entries", "size", "session hits", "session misses"]


def _cache(conn, statement) -> Result:
    """What the disk cache holds, per kind, and how this session used it."""
    cache = conn.cache
    if not cache.enabled:
        return Result(kind="table", statement=statement.text, title="the disk cache is off",
                      columns=COLUMNS, rows=[])
    entries = cache.entries()
    kinds = list(KINDS) + sorted({e.kind for e in entries} - set(KINDS))
    rows = []
    for kind in kinds:
        mine = [e for e in entries if e.kind == kind]
        used = cache.by_kind.get(kind, {"hits": 0, "misses": 0})
        rows.append((kind, len(mine), Bytes(sum(e.bytes for e in mine)), used["hits"],
                     used["misses"]))
    total = sum(e.bytes for e in entries)
    rows.append(("total", len(entries), Bytes(total), cache.hits, cache.misses))
    result = Result(kind="table", statement=statement.text,
                    title=f"{cache.root}: {size_text(total)} of {size_text(cache.limit)}",
                    columns=COLUMNS, rows=rows)
    if cache.write_failure is not None:
        result.notes.append(cache.write_failure)
    left = abandoned(cache.root)
    if left:
        files = "1 temporary file" if len(left) == 1 else f"{len(left)} temporary files"
        result.notes.append(f"besides, {size_text(sum(size for _, size in left))} in "
                            f"{files} of writes that never finished (a "
                            f"process killed mid-write): the next write or CLEAR CACHE "
                            f"removes them")
    if conn.model is not None:
        conn.artifacts.fingerprints()  # finds out, once, what cannot be fingerprinted
        for what, reason in conn.artifacts.memory_only.items():
            result.notes.append(f"this connection's {what} is cached in memory only: {reason}")
    return result


def clear_cache(conn, statement) -> Result:
    """Remove every entry of the disk cache; this session keeps what it holds in memory."""
    removed, kept = conn.cache.clear()
    rows = [(kind, sum(1 for e in removed if e.kind == kind),
             Bytes(sum(e.bytes for e in removed if e.kind == kind)))
            for kind in sorted({e.kind for e in removed})]
    where = conn.cache.root if conn.cache.enabled else "nowhere (the disk cache is off)"
    size = size_text(sum(e.bytes for e in removed))
    temporary = remove_abandoned(conn.cache.root) if conn.cache.enabled else 0
    also = f" and {size_text(temporary)} of unfinished writes' temporary files" \
        if temporary else ""
    result = Result(kind="table", statement=statement.text,
                    title=f"removed {len(removed)} entries ({size}){also} from {where}",
                    columns=["kind", "entries", "size"], rows=rows)
    if kept:
        reasons = sorted({exc.strerror or str(exc) for _, exc in kept})
        result.notes.append(f"could not remove {len(kept)} entries "
                            f"({size_text(sum(e.bytes for e, _ in kept))}): "
                            f"{'; '.join(reasons)}")
    return result


def _layers(conn, statement) -> Result:
    rows = []
    for layer in conn.catalog.layers:
        if layer.call:
            note = f"call {layer.call} of {layer.calls} of {layer.module}" + \
                   (f": {layer.refused}" if layer.shape is None else "")
        elif layer.shared:
            calls = conn.catalog.calls_of(layer.name)
            note = f"runs {layer.calls}× per pass; " + (
                f"name a call: {calls_text(layer.name, layer.calls)}" if calls else layer.refused)
        elif layer.shape is None and layer.calls:
            # Why it is not queryable, its first words (DESCRIBE gives the whole reason).
            why = (layer.refused or "it returns no tensor").split(" (")[0].split("; ")[0]
            note = why if len(why) <= 60 else "not queryable: DESCRIBE it for why"
        else:
            note = {0: layer.refused.split(",")[0] or "never runs", 1: ""}.get(
                layer.calls, layer.refused)
        rows.append((layer.name, layer.type_name, layer.shape_text(),
                     layer.neurons if layer.shape is not None else "", note))
    return Result(kind="table", statement=statement.text, columns=["layer", "type", "output",
                                                                   "neurons", "note"],
                  rows=rows, title=f"{len(rows)} layer{'' if len(rows) == 1 else 's'} of "
                        f"{type(conn.model).__name__}")


def _samplers(conn, statement) -> Result:
    rows = []
    for name, cls in samplers.REGISTRY.items():
        params = ", ".join(f"{p.name}={p.default!r}" for p in cls.params())
        domains = "; ".join(f"{p.name}: {p.domain}" for p in cls.params() if p.domain)
        rows.append((name, params, domains, cls.description))
    return Result(kind="table", statement=statement.text,
                  columns=["sampler", "parameters", "ranges", "description"], rows=rows,
                  title="samplers (USING SAMPLE name(size, key=value, ...))")


def _computed(conn, profile) -> str:
    """When its pass ran: this session, or one before it whose entry the cache held (the
    first session's seconds had read as this one's: sweep MM2)."""
    when = ", read from the cache" if conn.artifacts.profile_read else ""
    return f"computed in {profile.seconds:.2f} s{when}"


def _profile(conn, statement) -> Result:
    profile = conn.profile
    if not profile.has_labels:
        return _predicted(conn, statement, profile)
    n = profile.matrix_classes
    names = conn.class_names or []
    wide = n > WIDEST_MATRIX
    if wide:
        rows, left_out = _wide_rows(profile, names)
    else:
        matrix, left_out = profile.confusion_matrix(), []
        rows = []
        for c in range(n):
            total = int(matrix[c].sum())
            accuracy = Percent(matrix[c, c] / total) if total else ""
            name = names[c] if c < len(names) else ""
            rows.append((c, *([name] if names else []), total, accuracy,
                         *(int(v) for v in matrix[c])))
    accuracy = float(profile.correct.mean())
    title = (f"profile: {len(profile):,} items, accuracy {accuracy:.1%} "
             f"({int((~profile.correct).sum()):,} incorrect), latent = {profile.latent_layer} "
             f"({profile.latents.shape[1]} dims), {_computed(conn, profile)}; "
             f"rows: true class, columns: predicted")
    notes = _notices(conn.catalog, profile)
    if wide:
        notes.append(f"{n:,} classes, worst accuracy first, each with the classes it is most "
                     f"often predicted as; in Python, conn.profile.confusion_cells() gives the "
                     f"non-empty cells of the confusion matrix (confusion_matrix(): all "
                     f"{n:,}² of them)")
        if len(left_out):
            predicted = np.isin(left_out, profile.predictions)
            notes.append(f"{len(left_out):,} of the {n:,} classes have no items and are left "
                         f"out" + (f" ({int(predicted.sum()):,} of them predicted for some item)"
                                   if predicted.any() else ""))
        title = title.replace("rows: true class, columns: predicted", "rows: true class")
    return Result(kind="table", statement=statement.text,
                  columns=["class", *(["name"] if names else []), "items", "accuracy",
                           *(["predicted instead (items)"] if wide
                             else (str(c) for c in range(n)))], rows=rows,
                  title=title, notes=notes)


def _notices(catalog, profile) -> list[str]:
    """What SHOW PROFILE and SHOW MODELS note of a model on its data: what the probe warned
    of (data that reads differently, a model whose outputs depend on its batch), which every
    answer shares and a warning said only once, and what the profile warns of its scores."""
    return [*(catalog.notices if catalog else ()),
            *profile_notices(profile, catalog and catalog.scores)]


# The predicted classes SHOW PROFILE lists for data without labels, commonest first.
MOST_PREDICTED = 30


def _predicted(conn, statement, profile) -> Result:
    """SHOW PROFILE of data without labels: no confusion matrix (it had refused, naming
    none of what the profile holds), but the classes the model predicts, commonest first,
    each with its items, their share and their mean confidence."""
    names = conn.class_names or []
    counts = np.bincount(profile.predictions, minlength=1)
    confidence = np.bincount(profile.predictions, weights=profile.confidence, minlength=1)
    predicted = np.flatnonzero(counts)
    order = predicted[np.argsort(-counts[predicted], kind="stable")]
    rows = [(int(c), *([names[c] if c < len(names) else ""] if names else []), int(counts[c]),
             Percent(counts[c] / len(profile)), Probability(confidence[c] / counts[c]))
            for c in order[:MOST_PREDICTED]]
    notes = _notices(conn.catalog, profile)
    # A regression's one output had been profiled so, unsaid (SS9).
    if getattr(conn.catalog, "output_shape", None) == (1,):
        notes.append("the model's one output per item is read as a binary classifier's logit "
                     "(class 1 where > 0, confidence its sigmoid); if it is a regression's, "
                     "predicted, confidence and correct mean nothing for it")
    if len(order) > MOST_PREDICTED:
        notes.append(f"{len(order) - MOST_PREDICTED:,} more predicted classes left out; "
                     f"conn.profile.predictions holds every item's")
    title = (f"profile: {len(profile):,} items without labels (no accuracy, no confusion "
             f"matrix), latent = {profile.latent_layer} ({profile.latents.shape[1]} dims), "
             f"{_computed(conn, profile)}; the classes the model predicts")
    return Result(kind="table", statement=statement.text,
                  columns=["predicted", *(["name"] if names else []), "items", "share",
                           "mean confidence"], rows=rows, title=title, notes=notes)


# Classes beyond which SHOW PROFILE lists each class's commonest mistakes, not the matrix:
# a 20-class matrix no longer fits a terminal's width.
WIDEST_MATRIX = 12


def _wide_rows(profile, names: list, most: int = 3) -> tuple[list, np.ndarray]:
    """SHOW PROFILE's rows past WIDEST_MATRIX classes, from the confusion matrix's non-empty
    cells (never the dense matrix: 20 GB for a 50,257-token vocabulary): each class with
    items, worst accuracy first, and the ``most`` classes it is most often predicted as
    instead (ties to the lower class); and the classes left out, which have no items."""
    n = profile.matrix_classes
    true, predicted, counts = profile.confusion_cells()
    items = np.bincount(true, weights=counts, minlength=n).astype(np.int64)
    right = np.zeros(n, dtype=np.int64)
    right[true[true == predicted]] = counts[true == predicted]
    wrong = np.flatnonzero(true != predicted)
    wrong = wrong[np.lexsort((predicted[wrong], -counts[wrong], true[wrong]))]
    mistakes = {}
    for c, start in zip(*np.unique(true[wrong], return_index=True)):
        mistakes[int(c)] = ", ".join(f"{int(predicted[j])} ({int(counts[j]):,})"
                                     for j in wrong[start:start + most] if true[j] == c)
    listed = sorted(np.flatnonzero(items).tolist(), key=lambda c: (right[c] / items[c], c))
    rows = [(c, *([names[c] if c < len(names) else ""] if names else []), int(items[c]),
             Percent(right[c] / items[c]), mistakes.get(c, "")) for c in listed]
    return rows, np.flatnonzero(items == 0)


def _settings(conn, statement) -> Result:
    meaning = conn.settings.describe()
    rows = [(name, "default" if getattr(conn.settings, name) is None else getattr(conn.settings, name),
             meaning[name]) for name in conn.settings.names()]
    return Result(kind="table", statement=statement.text, columns=["setting", "value", "meaning"],
                  rows=rows, title="settings (SET name = value)")


def describe(conn, statement: ast.Describe) -> Result:
    conn, ref = conn.resolve(statement.layer)  # the model the layer belongs to
    statement = replace(statement, layer=ref)
    layer = lookup_layer(statement.layer, conn.catalog)
    calls = conn.catalog.calls_of(layer.name) if layer.shared else []
    # A layer that runs but cannot be queried is described with why (its output's rows).
    readable = layer.shape is not None or not layer.calls or layer.shared
    if not calls and readable:
        layer = bind_layer(statement.layer, conn.catalog)
    module = dict(conn.model.named_modules())[layer.module]
    n_params = sum(p.numel() for p in module.parameters())
    children = [name for name in conn.layers if name.startswith(layer.module + ".")]
    rows = [("name", layer.name), ("type", layer.type_name)]
    if calls:  # the module as a whole: what each call gives, since each may differ
        rows += [("calls", f"{layer.calls} per forward pass; a query names one: "
                           f"{calls_text(layer.name, layer.calls)}")]
        rows += [(call.name, f"{call.shape_text()}, {call.neurons:,} neurons; {call.axes_text()}"
                  if call.shape is not None else call.refused) for call in calls]
        return Result(kind="table", statement=statement.text, columns=["property", "value"],
                      rows=rows + _module_rows(layer, module, n_params, children),
                      title=f"layer {_qualified(conn, layer.name)}")
    if layer.call:
        rows += [("call", f"{layer.call} of the {layer.calls} calls of {layer.module} per "
                          f"forward pass")]
    if not readable:
        rows += [("output", layer.shape_text()),
                 ("why", layer.refused or "it returns no tensor")]
        return Result(kind="table", statement=statement.text, columns=["property", "value"],
                      rows=rows + _module_rows(layer, module, n_params, children),
                      title=f"layer {_qualified(conn, layer.name)}")
    rows += [("output", layer.shape_text()), ("axes", layer.axes_text())]
    if layer.layout == SEQUENCE:
        rows += [("neurons", f"{layer.neurons:,} hidden units; an item's activation of one is "
                             f"its mean over the item's real tokens (TOKENS MEAN)"),
                 ("real tokens", layer.mask),
                 ("tokens", "TOKENS MEAN (the default) | TOKENS MAX | TOKEN n (the n-th real "
                            "token, 0 the first, -1 the last) | TOKENS ALL (every (position, "
                            "unit), padding included"
                            + ("; refused here: the length changes with the batch)"
                               if layer.varies or layer.form != "tensor" else ")"))]
    else:
        rows += [("neurons", Count(layer.neurons))]
        rows += [] if layer.channels is None else [("channels", layer.channels)]
    rows += [("labels", _label_example(layer))]
    return Result(kind="table", statement=statement.text, columns=["property", "value"],
                  rows=rows + _module_rows(layer, module, n_params, children),
                  title=f"layer {_qualified(conn, layer.name)}")


def _qualified(entry, name: str) -> str:
    """A layer's name with its model's when the connection has several."""
    return f"{entry.name}.{name}" if len(entry.conn.models) > 1 else name


def _module_rows(layer, module, n_params: int, children: list[str]) -> list[tuple]:
    return [("parameters", Count(n_params)),
            ("sublayers", ", ".join(children) if children else "none"),
            ("module", f"{layer.type_name} of {len(list(module.children()))} modules"
                       if children else repr(module))]


def _label_example(layer) -> str:
    view = View(layer)
    if view.neurons == 1:  # "2[0] … 2[0]" had named one neuron twice
        return view.labels([0])[0]
    first, last = view.labels([0, view.neurons - 1])
    return f"{first} … {last}"
