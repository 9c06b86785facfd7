"""Whether each layer's rows are its batch's items in the batch's order, checked by running
the data's first items twice in order and once reversed (docs/ARCHITECTURE.md, "Data model":
row order).

The probe (model/probing.py) finds a layer's batch axis by its size, which following the
batch in probes of 1, 2 and 3 items says nothing of the order of the rows along it: a model
that sorts a batch by length for ``pack_padded_sequence(enforce_sorted=True)`` and unpacks it
without restoring the order, or a mixture of experts that dispatches ``x[argsort(gate)]`` to
a layer, gives rows of the right count in another order, and every answer but a mean over
all items would put item j's row under item i. The same items reversed are the same batch
(the same padding, the same per-batch statistics and branches), so along the true batch axis
a layer's output must come out reversed too, and run again in order the same; one that does
not is not in the batch's order, and where several axes follow the batch (a time-first
(T, B, D) output with T = B in the probe) the one that reverses is the batch's.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from diagql.model.hooks import StopForward, evaluation, hook_errors, this_thread
from diagql.model.repeatable import Unrepeatable, same_inputs, same_items
from diagql.model.views import first_output

Key = tuple[str, int]  # (module, its call from 1)


class Unsized(frozenset):
    """A verdict of no axis at all: no axis of the layer's output was as long as the batch
    for these items, though it was for the probe's first ones (a graph batch whose first
    graphs have one node each: its node rows follow the batch there, and are several an item
    past them). ``fewer``: its first axis was shorter than the batch (a module run on the
    items a gate routes to it, which the first items all were)."""

    fewer = False


# Items each of the three passes runs: a model that permutes its batch at random inside
# (torch.randperm and back) lines up twice over 3 items once in 36 connections, over 6 once
# in 500,000.
ROW_ITEMS = 6
# Items spread over the data for a layer whose rows were all alike on the ROW_ITEMS:
# an expert routed an eighth of the items is missed by all of them once in 5,000.
WIDE_ITEMS = 64


def reversing_axes(model, source, prepare, call) -> dict[Key, set[int]] | None:
    """Per (module, call): the axes along which its output for ROW_ITEMS items (half of
    them the data's first, the rest spread over the data) reversed is the reverse of its
    output for them in order, which a second pass in order gives again (each batch read
    afresh: a model may write into its input). None when it cannot be told: fewer than two
    items, or a pass that fails on the reversed batch (a model that needs its batch sorted
    fails in DiagQL's own batches as well, and says so there).

    A layer whose rows for those items are all alike tells nothing by reversing: a mixture of
    experts' expert that none of them was routed to sees only its buffer's padding, every
    row the same, and had passed (as had the expert all of them were routed to, data stored
    by class, whose buffer held them in the batch's order), though its rows are the items
    routed to it in dispatch order. Such layers are told on up to WIDE_ITEMS items spread
    over the data."""
    size = min(len(source), ROW_ITEMS)
    if size < 2:
        return None
    # The first items and as many spread over the rest: data stored by class sends its first
    # items to one expert, whose buffer then holds them in the batch's order, and reversed.
    n = len(source)
    spread = np.linspace(0, n - 1, size - size // 2 + 1).round().astype(np.int64)[1:]
    first = np.unique(np.concatenate([np.arange(size // 2), spread]))
    found, blind = _verdicts(model, source, prepare, call, first)
    if found is None:
        return None
    if blind and len(source) > size:
        spread = np.unique(np.linspace(0, len(source) - 1, min(len(source), WIDE_ITEMS))
                           .round().astype(np.int64))
        wider, _ = _verdicts(model, source, prepare, call, spread, blind)
        for key in blind & set(wider or ()):
            found[key] = wider[key]
    return found


def _verdicts(model, source, prepare, call, order: np.ndarray, only: set[Key] | None = None
              ) -> tuple[dict[Key, set[int]] | None, set[Key]]:
    """``reversing_axes``'s verdicts on the items ``order`` (of the layers ``only``, when
    given), and the layers whose rows for them were all alike along every axis of the
    batch's size (blind: no verdict)."""
    size = len(order)
    try:
        reads = [next(source.batches(items, size))[1]
                 for items in (order, order, order[::-1].copy())]
    except Exception:  # noqa: BLE001 - the probe's own passes have run: no verdict here
        return None, set()
    # Inputs that read differently (an augmentation on some items only, or whose random
    # state follows the order items are read in) would be taken for rows out of order, and
    # every layer refused as the model's fault: compared before the model may write in them.
    if not same_inputs(reads[0], reads[1]) or not same_items(reads[0], reads[2], size):
        raise Unrepeatable
    try:
        ahead, again, back = (_summaries(model, prepare(x), call, size, only) for x in reads)
    except Exception:  # noqa: BLE001 - the probe's own passes have run: no verdict here
        return None, set()
    found, blind = {}, set()
    for key, (shape, dtype, slices, _) in ahead.items():
        other, twice = back.get(key), again.get(key)
        if other is None or twice is None or other[:2] != (shape, dtype) or \
                twice[:2] != (shape, dtype):
            continue  # a shape that follows the data, not the order: no verdict
        # Along the batch axis the same items run twice give the same rows (a random order
        # inside the model, torch.randperm and back, does not: it lined up by chance once
        # in six connections), and reversed give them reversed.
        found[key] = {axis for axis, own in slices.items()
                      if _same(own, twice[2][axis], dtype)
                      and _same(own, other[2][axis][::-1], dtype)} if slices else \
            _unsized(shape, size)
        if slices and all(_same(own, np.repeat(own[:1], size, axis=0), dtype)
                          for own in slices.values()):
            blind.add(key)
        whole = ahead[key][3]
        if not found[key] and whole is not None and torch.allclose(
                whole, back[key][3].flip(list(slices)), rtol=1e-3, atol=1e-6, equal_nan=True):
            # Reversed along every axis of the batch's size together, and along none alone:
            # a batch × batch output (a contrastive model's similarities), not an order of
            # its own; the probe says it is not per item.
            found[key] = set(slices)
    return found, blind


def _unsized(shape: tuple, size: int) -> Unsized:
    verdict = Unsized()
    verdict.fewer = bool(shape) and shape[0] < size
    return verdict


def _summaries(model, x, call, size: int, only: set[Key] | None = None) -> dict[Key, tuple]:
    """Every module call's output in one pass, as (shape, dtype, per axis as long as the
    batch: each of its ``size`` slices' sums, ``_slices``): a permutation of the
    items changes them, and they take a few numbers where the outputs themselves, kept for two
    passes, would take twice a large model's activations. Taken when the module returns (a
    later in-place op would overwrite it); a PackedSequence unpacked as a query unpacks it.
    ``only``: those calls' alone, the pass stopped once they have all returned (a BERT's
    token-type embeddings, alike for every item, cost the wider check one module's run)."""
    found: dict[Key, tuple] = {}
    calls: dict[str, int] = {}

    def hook_of(name):
        @this_thread
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            out = first_output(output)
            if isinstance(out, PackedSequence):
                out = pad_packed_sequence(out, batch_first=True)[0]
            elif isinstance(out, torch.Tensor) and out.is_nested:
                out = out.to_padded_tensor(0.0) if out.is_floating_point() else None
            if isinstance(out, torch.Tensor) and not out.is_complex():
                slices = _slices(out, size)
                # Several axes of the batch's size (rare, and small for a few items): the
                # output itself too, for the joint reversal of a batch × batch output.
                whole = out.detach().to(torch.float64).cpu() if len(slices) > 1 else None
                found[name, calls[name]] = (tuple(out.shape), out.dtype, slices, whole)
            if only is not None and only <= found.keys():
                raise StopForward
        return hook

    names = None if only is None else {name for name, _ in only}
    handles = [module.register_forward_hook(hook_of(name))
               for name, module in model.named_modules()
               if name and not isinstance(module, torch.jit.ScriptModule)
               and (names is None or name in names)]
    try:
        with torch.no_grad(), evaluation(model), hook_errors():
            call(model, x)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


def _slices(out: torch.Tensor, size: int) -> dict[int, np.ndarray]:
    """Per axis of ``size``: its slices' (Σx, Σx², Σ|x|, Σw·x), size × 4, float64, w fixed
    irregular weights: rows that a norm leaves with equal sums and squares (a LayerNorm's, an
    L2-normalised embedding's) still differ in it."""
    wide = out.detach().to(torch.float64)
    sums = {}
    for axis in range(wide.ndim):
        if wide.shape[axis] == size:
            rows = wide.movedim(axis, 0).reshape(size, -1)
            weights = torch.cos(torch.arange(rows.shape[1], dtype=torch.float64,
                                             device=rows.device) * 0.7 + 0.3)
            sums[axis] = torch.stack([rows.sum(1), (rows * rows).sum(1), rows.abs().sum(1),
                                      rows @ weights], dim=1).cpu().numpy()
    return sums


def _same(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> bool:
    """Equal slice sums, within what a row's position in a batch may change in floating
    point (a kernel's blocking; a float16 model's rounding): far within what tells one item's
    slice from another's. Each sum is compared against its slice's Σ|x| (Σx² for itself)."""
    if not dtype.is_floating_point:
        # Σx, Σx², Σ|x| of integers are exact; Σw·x is a float64 product, which a BLAS may
        # round 1 ulp apart for a row at another place in the batch (an AMD EPYC's kernel did,
        # and a bool mask was refused as rows in an order of their own).
        return bool(np.array_equal(a[:, :3], b[:, :3])) and \
            bool((np.abs(a[:, 3] - b[:, 3]) <= 1e-9 * (a[:, 2] + 1.0)).all())
    rtol = max(1e-3, 8 * torch.finfo(dtype).eps)
    scale = np.abs(np.nan_to_num(a[:, [2, 1, 2, 2]], posinf=0.0, neginf=0.0))
    with np.errstate(invalid="ignore"):  # inf - inf: a layer's inf columns, refused later
        gap = np.abs(np.nan_to_num(a - b, nan=0.0, posinf=0.0, neginf=0.0))
    same_nan = np.array_equal(np.isnan(a), np.isnan(b))
    return same_nan and bool((gap <= rtol * scale + 1e-12).all())
