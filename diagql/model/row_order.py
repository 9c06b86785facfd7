"""Whether each layer's rows are its batch's items in the batch's order, checked by running
the probe's items in order and reversed (docs/ARCHITECTURE.md, "Data model": row order).

The probe (model/probing.py) finds a layer's batch axis by its size, which following the
batch in probes of 1, 2 and 3 items says nothing of the order of the rows along it: a model
that sorts a batch by length for ``pack_padded_sequence(enforce_sorted=True)`` and unpacks it
without restoring the order, or a mixture of experts that dispatches ``x[argsort(gate)]`` to
a layer, gives rows of the right count in another order, and every answer but a mean over
all items would put item j's row under item i. The same items reversed are the same batch
(the same padding, the same per-batch statistics and branches), so along the true batch axis
a layer's output must come out reversed too; one that does not is not in the batch's order,
and where several axes follow the batch (a time-first (T, B, D) output with T = B in the
probe) the one that reverses is the batch's.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from diagql.model.hooks import evaluation, hook_errors
from diagql.model.views import first_output

Key = tuple[str, int]  # (module, its call from 1)


def reversing_axes(model, source, prepare, call, size: int) -> dict[Key, set[int]] | None:
    """Per (module, call): the axes along which its output for the first ``size`` items
    reversed is the reverse of its output for them in order (each batch read afresh: a model
    may write into its input). None when it cannot be told: fewer than two items, or a pass
    that fails on the reversed batch (a model that needs its batch sorted fails in DiagQL's
    own batches as well, and says so there)."""
    if size < 2:
        return None
    order = np.arange(size)
    try:
        ahead = _outputs(model, prepare(next(source.batches(order, size))[1]), call)
        back = _outputs(model, prepare(next(source.batches(order[::-1].copy(), size))[1]), call)
    except Exception:  # noqa: BLE001 - the probe's own passes have run: no verdict here
        return None
    found = {}
    for key, out in ahead.items():
        other = back.get(key)
        if other is None or other.shape != out.shape or other.dtype != out.dtype:
            continue  # a shape that follows the data, not the order: no verdict
        found[key] = {axis for axis in range(out.ndim) if out.shape[axis] == size
                      and _same(out, other.flip(axis))}
    return found


def _outputs(model, x, call) -> dict[Key, torch.Tensor]:
    """Every module call's activation in one pass, copied when it returns (a later in-place
    op would overwrite it); a PackedSequence unpacked as a query unpacks it."""
    outputs: dict[Key, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook_of(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            out = first_output(output)
            if isinstance(out, PackedSequence):
                out = pad_packed_sequence(out, batch_first=True)[0]
            elif isinstance(out, torch.Tensor) and out.is_nested:
                out = out.to_padded_tensor(0.0) if out.is_floating_point() else None
            if isinstance(out, torch.Tensor) and not out.is_complex():
                outputs[name, calls[name]] = out.detach().clone()
        return hook

    handles = [module.register_forward_hook(hook_of(name))
               for name, module in model.named_modules()
               if name and not isinstance(module, torch.jit.ScriptModule)]
    try:
        with torch.no_grad(), evaluation(model), hook_errors():
            call(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, within what a row's position in a batch may change in floating point (a
    kernel's blocking): far within what tells one item's row from another's."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    rtol = max(1e-3, 8 * torch.finfo(a.dtype).eps)
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = float(a[torch.isfinite(a)].abs().max()) if bool(torch.isfinite(a).any()) else 1.0
    return torch.allclose(a, b, rtol=rtol, atol=1e-5 * max(scale, 1.0), equal_nan=True)
