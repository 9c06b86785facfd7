"""Whether the data gives an item the same inputs on every read, and the model the same
outputs to the same inputs: the profile, a sample's activations and each query's pass read
the items anew and run the model again, so a random transform (a training augmentation) or
a random forward (dropout left on) would have them answer about different inputs or models
(docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from diagql.errors import ExecutionError, warn
from diagql.model.hooks import evaluation, first_tensor


# The starts of this module's warnings that make each pass's rows its own (the data's reads,
# the model's passes, an item's batch): the catalog keeps them (LayerCatalog.notices), and
# the rows the profile pass kept then stand for no other pass's (LayerCatalog.repeatable).
UNREPEATABLE = ("the data gives the same item different inputs",
                "the model gives the same inputs different outputs",
                "the model gives an item other outputs when other items share its batch",
                "the model's forward changes its buffers")

READS = 3  # reads of each of the probe's items (at most 3: a Ray Dataset's driver has no
# more), one item at a time: a transform that changes an item half the time goes unseen in
# (1/4) ** 3 = 1/64 connections


def check_repeatable(first, read, n: int) -> bool:
    """Warn when the same items read again give different inputs (a random transform, such as
    a training augmentation): the profile, a sample's activations and a query's pass each read
    the data again, so their answers would not be of the same inputs. ``first``: the first
    item's inputs as the probe read them; ``read(i)``: item i's inputs, read anew; ``n``: the
    items the probe read. Each is read READS times: a random flip keeps one item alike on two
    reads half the time. Returns whether the reads agreed."""
    for i in range(n):
        reads = [first] if i == 0 else []
        reads += [read(i) for _ in range(READS - len(reads))]
        if not all(same_inputs(reads[0], again) for again in reads[1:]):
            break
    else:
        return True
    warn_unrepeatable()
    return False


class Unrepeatable(Exception):
    """Reads of the same items gave different inputs where a later check read them again
    (model/row_order.py: items spread over the data, in and out of order)."""


def warn_unrepeatable() -> None:
    warn(f"{UNREPEATABLE[0]} on two reads (a random "
         "transform, such as a training augmentation?): the profile, samples and "
         "each query read the items anew, so their answers will not agree; "
         "diagnose with deterministic (evaluation) transforms")


def same_items(a, b, size: int) -> bool:
    """Whether two collated batches of ``size`` items hold the same items' inputs in any
    order (a collate_fn may sort its batch by length), to rounding (one that standardises
    its batch sums it in another order): every item's row of the tensors and arrays whose
    first axis is the batch's has a row of the other within 1e-4 of their largest value,
    both ways. True where there is no such row to compare, or where the items' rows are
    joined along another axis (``_item_rows``)."""
    rows_a, rows_b = _item_rows(a, size), _item_rows(b, size)
    if rows_a is None or rows_b is None or rows_a.shape != rows_b.shape:
        return rows_a is None or rows_b is None
    tolerance = 1e-4 * max(float(np.abs(rows_a).max(initial=0.0)), 1e-6)
    if _close(rows_a, rows_b[::-1], tolerance):  # reversed item for item, as given
        return True
    # In another order (a collate that sorts its batch): each batch's rows ordered by their
    # projection on one direction, then compared row for row.
    direction = np.random.default_rng(0).standard_normal(rows_a.shape[1])
    return _close(rows_a[np.argsort(rows_a @ direction)], rows_b[np.argsort(rows_b @ direction)],
                  tolerance)


def _close(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    return bool((np.abs(a - b) <= tolerance).all())


def _item_rows(x, size: int) -> np.ndarray | None:
    """Each item's values (float64, one row an item) of every tensor or array of ``x`` whose
    first axis is the batch's; None where there is none, or where some tensor's first axis is
    not the batch's: the items' rows joined (EmbeddingBag's tokens, graph batching's nodes),
    beside which a tensor of one value an item holds its offsets into them, which move with
    the order (an EmbeddingBag's data had been warned of as augmented)."""
    leaves: list[np.ndarray] = []
    joined = False

    def collect(part) -> None:
        nonlocal joined
        if isinstance(part, torch.Tensor) and part.is_nested:
            return
        if isinstance(part, (torch.Tensor, np.ndarray)) and part.ndim and part.shape[0] != size:
            joined = True
        elif isinstance(part, torch.Tensor) and part.ndim and not part.is_complex():
            leaves.append(part.detach().cpu().reshape(size, -1).double().numpy())
        elif isinstance(part, np.ndarray) and part.ndim and part.dtype.kind in "biuf":
            leaves.append(part.reshape(size, -1).astype(np.float64))
        elif isinstance(part, Mapping):
            for key in part:
                collect(part[key])
        elif isinstance(part, (list, tuple)):
            for value in part:
                collect(value)

    collect(x)
    if joined:
        return None
    # NaN as NaN (equal to itself: 0 here), infinities as the largest float, so that
    # differences stay comparable.
    return np.nan_to_num(np.concatenate(leaves, axis=1), nan=0.0) if leaves else None


def check_deterministic(first: torch.Tensor, again: torch.Tensor) -> bool:
    """Warn when the model, in eval mode, gives the same inputs different outputs on two
    passes (dropout called with ``training=True``, sampling in forward): every pass, the
    profile's, a sample's and the exact answer's, would see another model, and an "exact"
    answer is exact for its own pass only. Differences of rounding (another kernel's order of
    sums) are not. Returns whether the two passes agreed (True where they cannot be compared)."""
    if first.shape != again.shape or not first.is_floating_point():
        return True
    if _differ(first, again):
        warn(f"{UNREPEATABLE[1]} on two passes in "
             "eval mode (dropout with training=True, or sampling in forward?): each "
             "pass sees another model, so answers, exact ones too, will differ from "
             "run to run")
        return False
    return True


def check_batch_independent(alone: list[torch.Tensor], together: torch.Tensor) -> bool:
    """Warn when an item's outputs alone (``alone[i]``, a batch of item i only) differ from its
    outputs in a batch with others (``together``, item i in row i) by more than rounding:
    statistics of the batch (dynamic quantization's per-batch scales, a norm over the batch
    axis) or padding to the batch's longest item that the model does not leave out (left
    padding, with positions counted from the batch's start: a GPT-2's) make an item's answer
    depend on which items share its batch, and WHERE and a sample run other batches than
    the exact pass (GROUP BY runs the same: every item, in order). Each of the first items
    is compared (a left-padded first item, the batch's longest, is padded in neither).
    Outputs whose batch axis is not the first, or of another shape alone, are not compared.
    Whether it warned."""
    for i, one in enumerate(alone):
        if one.ndim == 0 or together.ndim != one.ndim or one.shape[0] != 1 or \
                together.shape[0] < max(2, i + 1) or together.shape[1:] != one.shape[1:] or \
                not one.is_floating_point():
            continue
        if _differ(one, together[i:i + 1]):
            warn(f"{UNREPEATABLE[2]} "
                 "(statistics of the batch: dynamic quantization's scales, a norm over the "
                 "batch, a branch on the batch's mean, a collate_fn that normalises each "
                 "batch, or padding to the "
                 "batch's longest item that changes the others' outputs, as left padding "
                 "does a GPT-2's?): WHERE and samples run other batches than an "
                 "exact pass over every item, so the same question may get different "
                 "answers")
            return True
    return False


def check_buffers(changed: list[str], once: torch.Tensor, twice: torch.Tensor) -> None:
    """Warn where a forward changed the buffers ``changed`` in eval mode (model/hooks.py puts
    them back after each pass) and the outputs read them: the first item gave ``once``, then
    ``twice`` in the same pass (a call counter that nothing reads gives the same: no notice)."""
    if once.shape == twice.shape and once.dtype == twice.dtype and (
            torch.equal(once, twice) or (once.is_floating_point() and torch.allclose(
                once, twice, rtol=0, atol=0, equal_nan=True))):
        return
    names = list(dict.fromkeys(changed))
    warn(f"{UNREPEATABLE[3]} in eval mode, and its outputs read them "
         f"({', '.join(names[:4])}{', …' if len(names) > 4 else ''}: a running average?): "
         f"DiagQL puts them back after each of its passes, so the model is left as given, but "
         f"within a pass each batch sees what the batches before it left, so an item's "
         f"activations depend on the items that went before it")


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two outputs differ by more than rounding (1e-4 of the largest, or 4 of the
    dtype's epsilons: a float16 model's one rounding step, 1e-3, is no batch dependence),
    compared in float64."""
    rounding = max(1e-4, 4 * torch.finfo(a.dtype).eps) if a.is_floating_point() else 1e-4
    a, b = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):  # NaN in one only (a batch of one's
        return True  # standard deviation, in a collate_fn that standardises its batch)
    scale = float(torch.nan_to_num(a.abs(), posinf=0.0).max()) if a.numel() else 0.0
    return bool((torch.nan_to_num(a - b, nan=0.0).abs() > rounding * max(scale, 1e-6)).any())


def same_inputs(a, b) -> bool:
    """Whether two reads of a batch's inputs are equal (NaN equal to NaN); True for what
    cannot be compared."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or \
                a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_nested or b.is_nested:
            return True
        return bool(torch.equal(a, b)) or (a.is_floating_point() and bool(
            ((a == b) | (torch.isnan(a) & torch.isnan(b))).all()))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_inputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_inputs(u, v) for u, v in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - what cannot be compared is not reported
        return True


def check_spread_items(model, source, prepare, call) -> None:
    """The batch check again on three items spread over the rest of the data: a user's
    collate_fn that pads to the batch's longest item changes nothing for first items of one
    size (images stored by size, the first 20 of 8 x 8), nor does a branch on the batch's
    mean (``if x.mean() > t``) for first items that all take it, and GROUP BY and WHERE then
    gave two answers to one question, unwarned."""
    n = len(source)
    spread = np.unique([n // 3, 2 * n // 3, n - 1])
    if n < 6 or len(spread) < 3:
        return
    with evaluation(model):
        try:
            together = first_tensor(call(model, prepare(next(source.batches(spread, 3))[1])))
            alone = [first_tensor(call(model, prepare(next(source.batches(spread[i:i + 1], 1))[1])))
                     for i in range(3)]
        except ExecutionError:  # the pass says what fails, where it does
            return
    check_batch_independent(alone, together)
