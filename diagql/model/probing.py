"""Probing the model with batches of 1, 2 and 3 items: which submodules run, how often, and
what each returns per item (its batch axis, sequence layout and padding mask), made into the
LayerCatalog (model/layers.py; docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from diagql.errors import DiagQLWarning, ExecutionError, warn
from diagql.model.batch_axis import ROUTED, batch_axis, out_of_order, several_rows
from diagql.model.forward import kept_copy
from diagql.model.hooks import HookFailure, call_name, evaluation, first_tensor, hook_errors, \
    scope, this_thread
from diagql.model.layers import LayerCatalog, LayerInfo, mask_source
from diagql.model.repeatable import Unrepeatable, check_batch_independent, check_buffers, \
    check_deterministic, check_repeatable, check_spread_items, warn_unrepeatable
from diagql.model.row_order import reversing_axes
from diagql.model.scores import Scores, are_probabilities, choose, one_vector, \
    several_vectors
from diagql.model.input_masks import (input_attention_mask, longest, mask_key, token_mask,
                                      warn_unmasked_padding, warn_unread_masks, warn_untraced)
from diagql.model.layouts import map_layout, moved_last, stored_channels_first, \
    vector_layout
from diagql.model.views import FLAT, NOT_GOVERNING, SEQUENCE, describe_output, \
    first_output, named_inputs, padding_argument, padding_mask

PROBE_SIZES = (1, 2, 3)  # items per probe batch: the axis that follows them is the batch axis

@dataclass
class _Seen:
    """What one call of a module returned in one probe pass."""

    form: str | None  # "tensor" | "packed" | "nested" | "complex"; None: no tensor
    shape: tuple[int, ...] | None  # raw; packed and nested: padded (batch, sequence, hidden)
    what: str  # describe_output, for messages
    # The (module, call)s whose layout a rank-3 tensor output may take, most telling first:
    # the one that made this very tensor (a container returning its child's output), its last
    # submodule with an output of this shape, the maker of its input of this shape.
    like: list[tuple[str, int]] = field(default_factory=list)
    masks: list[tuple[str, str, tuple]] = field(default_factory=list)  # (owner, arg, shape)
    input_mask: tuple | None = None  # the shape of the batch input's attention_mask
    input_mask_key: str = ""  # its key: attention_mask, or a decoder's decoder_attention_mask
    input_longest: int | None = None  # items' lengths: the batch's longest (fit_longest)
    traced: bool = False  # whether that key is the mask of the ids it was found to follow
    # A map whose last axis is stored outermost (layouts.stored_channels_first).
    stored_first: bool = False
    moved_last: bool = False  # its input's last axis stored outside its middle one (layouts)
    fed_by: str = ""  # the module whose output its first input is (LayerInfo.fed_by)


def probe(model: nn.Module, source, prepare, call, scores: Scores | None = None,
          progress=None) -> LayerCatalog:
    """Run batches of 1, 2 and 3 items (fewer when the data has fewer) with a hook on every
    submodule. An output's batch axis is the axis whose size follows the batch's in every
    probe (the module's ``batch_first`` breaks a tie); a sequence output's real tokens come
    from where model/views.py finds them in a query. A module that runs several times per
    pass gets one layer per call (``block.relu#2``), each read from that call's outputs.
    ``scores``: the user's choice of the class scores in the model's output (None: the
    default's, model/scores.py ``choose``, which may read every label, shown by
    ``progress``), which the catalog keeps with their shape."""
    n = len(source)
    sizes = sorted({min(size, n) for size in PROBE_SIZES})
    passes = []
    first = first_output = None
    changed: list[str] = []  # buffers a probe's forward changed (model/hooks.py put them back)
    for size in sizes:
        idx, x, _ = next(source.batches(np.arange(size), size))
        if first is None:  # kept as read: a model may change its inputs in place (x /= 255)
            first = kept_copy(x)
        try:
            seen, counted, output, made = _probe_pass(model, prepare(x), call, changed)
        except ExecutionError as exc:
            if size == 1 and n > 1 and _runs(model, source, prepare, call):
                # The user's batches of 100 had run: say it is the batch of one that failed.
                raise ExecutionError(
                    f"{exc.message} (in DiagQL's probe of the model with a batch of 1 item, "
                    f"where a batch of 2 runs: it probes batches of 1, 2 and 3 to find each "
                    f"layer's batch axis; a model that needs several items a batch, a "
                    f"BatchNorm without running statistics, gives an item outputs that depend "
                    f"on its batch and cannot be diagnosed so)", hint=exc.hint) from exc
            raise
        if first_output is None:
            first_output = first_tensor(output)
        passes.append((len(idx), seen, counted, output))
    last_alone = _last_alone(model, source, prepare, call, n, sizes[-1])
    with warnings.catch_warnings(record=True) as said:  # DiagQL's kept in the catalog
        warnings.simplefilter("always")
        if changed:  # the first item twice in one pass, after what its first call changed
            with evaluation(model):
                check_buffers(changed, *(first_tensor(call(model, prepare(kept_copy(first))))
                                         for _ in range(2)))
        reverses = _checks(model, source, prepare, call, first, first_output, output, idx,
                           sizes[-1])
        warn_unmasked_padding(model, x)
        warn_unread_masks(named_inputs(x, model))
    notices = tuple(dict.fromkeys(str(w.message) for w in said
                                  if issubclass(w.category, DiagQLWarning)))
    for notice in notices:
        warn(notice)
    for other in said:  # the model's own (torch's, a library's), as they were
        if not issubclass(other.category, DiagQLWarning):
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if scores is None:
        scores = choose(output, len(idx), lambda: source.label_classes(progress))
    head = ""
    if scores.refusal is None:
        found = scores.read(output, len(idx))
        # The module that returned the scores themselves (a classifier's Linear): its input
        # is the latent (layers.default_latent), wherever the model defines it.
        head = made[id(found)][1][0] if id(found) in made else ""
        raw_shape = tuple(found.shape[1:])
        found = one_vector(found)
        output_shape = tuple(found.shape[1:])
        scores = _width_follows_batch(scores, passes) or scores
        scores = replace(scores, probabilities=are_probabilities(found))
    else:  # the layers are still listed; reading the scores refuses (model/scores.py)
        output_shape = tuple(first_tensor(output).shape[1:])
        raw_shape = output_shape
    modules = dict(model.named_modules())
    calls = passes[-1][2]
    layouts: dict[tuple[str, int], str] = {}
    infos: dict[str, list[LayerInfo]] = {}
    for key in passes[-1][1]:  # (module, call), in the order they returned in the last pass
        name, number = key
        info = _layer(name, key, modules[name], [(s, seen[key]) for s, seen, _, _ in passes
                                                 if key in seen], calls[name], layouts,
                      None if reverses is None else reverses.get(key), last_alone.get(key))
        if calls[name] > 1:
            info = replace(info, name=call_name(name, number), call=number, module=name)
        infos.setdefault(name, []).append(info)
    layers = []
    for name, module in modules.items():
        if name:
            layers += _entries(name, type(module).__name__, infos.get(name, []),
                               [(s, counted.get(name, 0)) for s, _, counted, _ in passes], modules)
    catalog = LayerCatalog(layers, output_shape, scores, head, notices)
    warn_untraced(x, [layer.name for layer in catalog.layers if layer.shape is not None
                      and layer.input_mask_key and not getattr(
                          passes[-1][1].get((layer.module, layer.call or 1)), "traced", True)])
    return _per_position(catalog, raw_shape)


def _per_position(catalog: LayerCatalog, raw_shape: tuple) -> LayerCatalog:
    """The catalog, its default scores refused where they are one logit per position of a
    sequence (a token tagger's Linear(H, 1) over (batch, T, H): (batch, T, 1)), which as one
    vector per item had read as T classes; a (batch, C, 1) of another layout stays C scores
    (model/scores.py, ``one_vector``)."""
    scores, head = catalog.scores, catalog.module(catalog.head) if catalog.head else None
    if scores.given or scores.refusal is not None or head is None or \
            head.layout != SEQUENCE or len(raw_shape) != 2 or raw_shape[-1] != 1 or \
            raw_shape[0] < 2:
        return catalog
    catalog.scores = replace(scores, refusal=several_vectors(raw_shape))
    catalog.output_shape = raw_shape
    return catalog


def _checks(model, source, prepare, call, first, first_output, output, idx, size: int):
    """Check that the data reads and the model runs the same each time (model/repeatable.py,
    whose warnings the caller keeps), and where both do, which axes of each layer reverse
    with the last probe's items (model/row_order.py; None where not known)."""
    repeatable = check_repeatable(first, lambda i: next(source.batches(np.array([i]), 1))[1],
                                  size)
    with evaluation(model):  # the first item again, without hooks
        again = first_tensor(call(model, prepare(kept_copy(first))))
    # Then an item's batch may be compared: the last probe read the first item anew, which
    # data that reads differently (an augmentation, warned of) makes another input.
    if not (check_deterministic(first_output, again) and repeatable):
        return None
    alone = [first_output]
    with evaluation(model):  # the last probe's other items, each alone
        for i in range(1, len(idx)):
            one = next(source.batches(np.array([i]), 1))[1]
            try:
                alone.append(first_tensor(call(model, prepare(one))))
            except ExecutionError:  # the batch of one ran for the first item: not here
                break
    # Which axes of each layer reverse with the batch: where its rows are in an order of
    # their own, or which of several axes of the batch's size is its. Its reads of items
    # spread over the data, twice in order and once reversed, are compared first: data that
    # reads differently there (an augmentation of some items, a random state that follows
    # the order of reads) is warned of, and no layer or batch is judged on it.
    try:
        axes = reversing_axes(model, source, prepare, call)
    except Unrepeatable:
        warn_unrepeatable()
        return None
    if not check_batch_independent(alone, first_tensor(output)):
        check_spread_items(model, source, prepare, call)
    return axes


def _entries(name: str, type_name: str, infos: list[LayerInfo], counts: list[tuple[int, int]],
             modules) -> list[LayerInfo]:
    """A module's catalog entries: itself, and when it runs several times, each call."""
    calls = counts[-1][1]
    if isinstance(modules[name], torch.jit.ScriptModule):
        return [LayerInfo(name, type_name, None, 0, refused=(
            "it is TorchScript (torch.jit.script's or torch.jit.trace's), whose modules take "
            "no forward hooks; build this part as the nn.Module it was made from"))]
    if calls == 0:
        return [LayerInfo(name, type_name, None, 0)]
    if len({c for _, c in counts}) > 1 and max(c for _, c in counts) > 1:
        runs = ", ".join(str(c) for _, c in counts)
        sizes = ", ".join(str(s) for s, _ in counts)
        return [LayerInfo(name, type_name, None, calls, refused=(
            f"it runs {runs} times in probes of {sizes} items: the number of its calls changes "
            f"with the batch, so no call number names one output"))]
    if calls == 1:
        return infos
    taken = [replace(info, shape=None, refused=f"its name is also module {info.name!r}'s; "
                                               f"rename one of them")
             if info.name in modules else info for info in infos]
    return [LayerInfo(name, type_name, None, calls), *taken]


def _width_follows_batch(scores: Scores, passes) -> Scores | None:
    """The scores refused when their per-item shape changes with the probe's batch (a
    contrastive model's batch x batch similarities): read as class scores they made as many
    classes as a batch has items, and a batch of another size failed. None when it holds."""
    # Not the batch of one: a forward ending in .squeeze() drops its batch axis there.
    shapes = [(size, tuple(one_vector(scores.read(output)).shape[1:]))
              for size, _, _, output in passes if size > 1]
    if len({shape for _, shape in shapes}) < 2:
        return None
    return replace(scores, refusal=(
        f"the model's scores ({scores.text()}) change shape with the batch (per-item shapes "
        f"{', '.join(str(shape) for _, shape in shapes)} for batches of "
        f"{', '.join(str(size) for size, _ in shapes)} items): values compared across a "
        f"batch's items (a contrastive model's similarities) are no class scores of each "
        f"item; name per-item class scores with scores= (--scores)"))


def _last_alone(model, source, prepare, call, n: int, probed: int) -> dict:
    """What each module call returned for the data's last item alone (empty when the probes
    held it, or it fails where they ran): its lengths beside the first items' tell a layer
    whose length follows its batch's longest item where the first item is the longest (data
    stored longest first), which the probes of the first 1, 2 and 3 items all padded to it,
    so that its padding was counted unwarned (``_layer``'s varies)."""
    if n <= probed:
        return {}
    try:
        return _probe_pass(model, prepare(next(source.batches(np.array([n - 1]), 1))[1]),
                           call)[0]
    except ExecutionError:  # the probes ran: the query's pass says what fails, where it does
        return {}


def _runs(model, source, prepare, call) -> bool:
    """Whether the model's forward runs on the data's first 2 items."""
    try:
        _probe_pass(model, prepare(next(source.batches(np.arange(2), 2))[1]), call)
    except ExecutionError:
        return False
    return True


def _probe_pass(model, x, call, changed: list[str] | None = None):
    """One forward pass with every submodule hooked: what each returned at each of its calls,
    how often each ran, the model's output, and which (module, call) made each tensor (by
    its id: the tensors are kept alive beside)."""
    seen: dict[tuple[str, int], _Seen] = {}  # (module, its call from 1)
    calls: dict[str, int] = {}
    made: dict[int, tuple[torch.Tensor, tuple]] = {}  # id(tensor) -> (tensor, (module, call))
    latest: dict[int, tuple] = {}  # id -> (last module returning it, version, it): _fed_by
    padding: dict[str, tuple[str, torch.Tensor]] = {}
    # A TorchScript part (and each module inside it) takes no forward hooks: left unhooked,
    # and listed as refused (``_entries``).
    modules = [(name, module) for name, module in model.named_modules()
               if not isinstance(module, torch.jit.ScriptModule)]
    padded = {name for name, module in modules if padding_argument(module) is not None}
    named = named_inputs(x, model)  # a tuple input's attention_mask found by its name
    handles = []
    # Each running module, its token_mask (a layer's tokens are its innermost caller's ids':
    running: list[tuple] = []  # a dual encoder's second's) and feeder (_fed_by), outermost first

    @this_thread
    def enter(module, args, kwargs):
        # A module called on several inputs' ids (a seq2seq model's own forward, given
        # input_ids and decoder_input_ids) has no one input's tokens: its callees are traced
        # by their own ids or by what made their input (its LM head, by the decoder's output).
        # Not a nested tensor (a TransformerEncoder's fast path's): no shape (NN3). Its
        # feeder as called (decided on return, a child had changed it: NN2).
        given = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and not a.is_nested]
        found = {token_mask(named, a) for a in given} - {None}
        running.append((module, found.pop() if len(found) == 1 else None,
                        _fed_by(given, latest)))

    def before(name):
        @this_thread
        def hook(module, args, kwargs):
            mask = padding_mask(module, args, kwargs)
            if mask is NOT_GOVERNING:
                padding.pop(name, None)
            else:
                padding[name] = (padding_argument(module), mask)
        return hook

    def after(name):
        @this_thread
        def hook(module, args, kwargs, output):
            calls[name] = calls.get(name, 0) + 1
            key = (name, calls[name])
            # Down to its own entry: a child that raised, which it caught, left one (NN2).
            mine = max((i for i, entry in enumerate(running) if entry[0] is module), default=None)
            del running[len(running) if mine is None else mine + 1:]
            source = next((m for _, m, _ in reversed(running) if m is not None), None)
            fed = running.pop()[2] if mine is not None else ""
            try:
                seen[key] = _look(key, args, output, seen, made, padding, padded, named,
                                  source)
                seen[key].fed_by = fed
                out = first_output(output)
                if isinstance(out, torch.Tensor) and not (out.is_inference() or out.is_nested):
                    latest[id(out)] = (name, out._version, out)  # its, even made in place
            except Exception as exc:  # noqa: BLE001 - DiagQL's own, not the model's
                raise HookFailure(name, output, exc) from exc
        return hook

    for name, module in modules:
        if name in padded:
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
        if name:
            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(after(name), with_kwargs=True))
    try:
        with evaluation(model, changed), hook_errors():
            out = call(model, x)
            first_tensor(out)  # an output holding no tensor is refused here
    finally:
        for handle in handles:
            handle.remove()
    return seen, calls, out, made


def _fed_by(given: list, latest: dict) -> str:
    """The module whose output, as it left it, a call's one tensor is ("": two, or changed
    in place since: ``h += skip(x)``; an inference tensor keeps no version)."""
    made = latest.get(id(given[0])) if len(given) == 1 and not given[0].is_inference() else None
    return made[0] if made is not None and made[1] == given[0]._version else ""


def _look(key, args, output, seen, made, padding, padded, x, tokens=None) -> _Seen:
    name = key[0]
    out = first_output(output)
    what = describe_output(output)
    if out is None:
        return _Seen(None, None, what)
    if isinstance(out, torch.Tensor) and out.is_complex():  # refused in ``_layer``
        return _Seen("complex", tuple(out.shape), what)
    if isinstance(out, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(out):
        return _Seen("transformed", tuple(out.shape), what)  # refused in ``_layer``
    if isinstance(out, PackedSequence):
        result = _Seen("packed", tuple(pad_packed_sequence(out, batch_first=True)[0].shape), what)
    elif out.is_nested:
        parts = out.unbind()
        shape = None
        if parts and all(p.ndim == 2 and p.shape[1] == parts[0].shape[1] for p in parts):
            shape = (len(parts), max(p.shape[0] for p in parts), parts[0].shape[1])
        result = _Seen("nested", shape, what)
    else:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        result = _Seen("tensor", tuple(out.shape), what,
                       stored_first=stored_channels_first(out, first),
                       moved_last=moved_last(first))
        if id(out) in made:
            result.like.append(made[id(out)][1])
        prefix = name + "."
        for earlier in reversed(seen):  # submodules return just before their parent
            if not earlier[0].startswith(prefix):
                break
            if seen[earlier].shape == result.shape:
                result.like.append(earlier)
                break
        if first is not None and id(first) in made and tuple(first.shape) == result.shape:
            result.like.append(made[id(first)][1])
        elif first is not None and tuple(first.shape) == result.shape and not result.like:
            # Its input made by no module (a transpose back, a residual sum): laid out as the
            # last output of its shape (Wav2Vec2's conv, transpose, LayerNorm, transpose, GELU
            # had read the GELU's (channels, frames) as frames of tokens).
            result.like += [other for other in reversed(seen)
                            if seen[other].shape == result.shape][:1]
        made.setdefault(id(out), (out, key))
    result.masks = [(owner, arg, None if mask is None else tuple(mask.shape))
                    for owner in scope(name) if owner in padded and owner in padding
                    for arg, mask in [padding[owner]]]
    ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
    # Its tokens: those of the ids it or its innermost caller was called on (``tokens``), else
    # those of the module that made its input (an encoder's layers called from the model's
    # own forward on a shared embedding's output), else the input's mask by ``mask_key``.
    maker = seen.get(made[id(ids)][1]) if ids is not None and id(ids) in made else None
    if tokens is None and maker is not None and maker.traced:
        tokens = maker.input_mask_key
    result.traced = tokens is not None
    mask_name = tokens or mask_key(x, name, ids)
    mask = input_attention_mask(x, name, ids, mask_name)  # the probe's input, named_inputs'
    result.input_mask = None if mask is None else tuple(mask.shape)
    result.input_longest = longest(mask, mask_name)
    result.input_mask_key = mask_name or ""
    return result


def _layer(name: str, key: tuple[str, int], module: nn.Module, records: list[tuple[int, _Seen]],
           calls: int, layouts: dict[tuple[str, int], str],
           reverses: set[int] | None = None, alone: _Seen | None = None) -> LayerInfo:
    """The LayerInfo of a module's call (``key``) from what it returned in each probe;
    ``reverses``: the axes along which its output reversed with the last probe's items
    (model/row_order.py; None: not known); ``alone``: what it returned for the data's last
    item alone (``_last_alone``), whose shape tells too whether an item's shape varies."""
    type_name = type(module).__name__

    def refuse(reason: str) -> LayerInfo:
        return LayerInfo(name, type_name, None, calls, refused=reason)

    last = records[-1][1]
    shapes = ", ".join(str(seen.shape) for _, seen in records)
    sizes = ", ".join(str(size) for size, _ in records)
    if any(seen.form is None for _, seen in records):
        return refuse(f"it returns {last.what}, so it has no activations")
    if any(seen.form == "transformed" for _, seen in records):  # a vmap's: kept, it crashed
        return refuse("it runs inside a torch.func transform (vmap, grad), whose values there "
                      "are the transform's, not the model's tensors: query the module that "
                      "calls the transform")
    if any(seen.form == "complex" for _, seen in records):  # an FFT's: AVG read the real part
        return refuse(f"it returns complex numbers ({last.what}), and DiagQL reads real "
                      f"activations; query a layer that takes their magnitude (torch.abs in "
                      f"a module of its own) or their real part")
    if len({seen.form for _, seen in records}) > 1 or any(s.shape is None for _, s in records):
        return refuse(f"it returns {last.what}, which DiagQL cannot read per item")
    if len({len(seen.shape) for _, seen in records}) > 1:
        return refuse(f"its output's rank changes with the batch (shapes {shapes} for batches "
                      f"of {sizes} items)")
    if last.form != "tensor":
        kind = "a PackedSequence" if last.form == "packed" else "a nested tensor"
        found = (f"{kind} unpacked into (batch, sequence, hidden) with each item's length"
                 + (" by pad_packed_sequence, in the batch's order" if last.form == "packed"
                    else ""))
        axis = 0
        if any(seen.shape[0] != size for size, seen in records):
            return refuse(f"it returns {last.what}, which does not hold one sequence per item")
        if reverses is not None and 0 not in reverses:
            return refuse(out_of_order())
    else:
        axis, found = batch_axis(module, records, reverses)
        if axis is None:
            # Rows that grow with the batch but are several an item: a graph's nodes, tokens
            # flattened into one axis ((batch · tokens, features) before a Linear).
            fixed = len({seen.shape for _, seen in records}) == 1 and \
                len({size for size, _ in records}) > 1
            # (A graph's nodes: as many as its batch's graphs hold, more than the graphs.)
            rows = [seen.shape[0] if seen.shape else 0 for _, seen in records]
            many = all(row > size for row, (size, _) in zip(rows, records)) and \
                all(a < b for a, b in zip(rows, rows[1:])) and records[-1][0] > 1 and not fixed
            # A routed expert's rows are whichever tokens its gate sends: its shapes had been
            # told as a parametrized weight's, or with no reason at all (SW1).
            hint = "; " + several_rows() if many else \
                (f": its rows are as many whatever the batch: a weight that a parametrization "
                 f"computes, or {ROUTED}") if fixed else f" (perhaps {ROUTED})"
            return refuse(found or f"no axis of its output follows the batch (shapes {shapes} "
                                   f"for batches of {sizes} items), so its values are not per "
                                   f"item{hint}")
    per_item = [tuple(d for i, d in enumerate(seen.shape) if i != axis) for _, seen in records]
    shape = per_item[-1]
    if alone is not None and alone.form == last.form and alone.shape is not None and \
            len(alone.shape) == len(last.shape) and alone.shape[axis] == 1:
        per_item.append(tuple(d for i, d in enumerate(alone.shape) if i != axis))
    varies = len(set(per_item)) > 1
    layout = FLAT
    if len(shape) == 2:
        layout = vector_layout(module, last.form, last.like, layouts, last.moved_last)
        layouts[key] = layout
    elif len(shape) >= 3:
        layout = map_layout(module, last.shape, last.like, layouts, last.stored_first)
        layouts[key] = layout
    if layout == SEQUENCE and len({s[1] for s in per_item}) > 1:
        return refuse(f"its hidden size changes with the batch (shapes {shapes} for batches of "
                      f"{sizes} items)")
    mask = mask_source(last, (records[-1][0], shape[0])) if layout == SEQUENCE else ""
    if " holding " in last.what:  # a tuple, dict or model output: one tensor of it is read
        container = last.what.split(" holding ")[0].split(" ", 1)[1]
        found += (f"; it returns {last.what}: that tensor is read, the rest of the {container} "
                  f"is not queried")
    return LayerInfo(name, type_name, shape, calls, axis, last.form, layout, found, varies,
                     mask, fed_by=last.fed_by)
