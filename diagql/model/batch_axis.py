"""Which axis of a module's output is its batch's, from what it returned in the probes of 1,
2 and 3 items (model/probing.py): the one whose size follows the batch's, and that reverses
with the batch's items where row_order.py could tell (docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

from torch import nn

from diagql.model.row_order import Unsized


def batch_axis(module: nn.Module, records, reverses: set[int] | None = None
               ) -> tuple[int | None, str]:
    """The axis whose size is the batch's in every probe and that reverses with the batch
    (``reverses``, when known), and how it was found; None and why not, when none does
    ("" when no axis follows the batch at all)."""
    rank = len(records[0][1].shape)
    sizes = [size for size, _ in records]
    axes = [a for a in range(rank) if all(seen.shape[a] == size for size, seen in records)]
    declared = declared_axis(module)
    if reverses is not None and axes:
        # A batch × batch output (a contrastive model's similarities) reverses along both
        # axes (its slices' sums do, row_order._slices): not per item, which the width that
        # follows the batch says (model/probing.py ``_layer``). None reversing, with one axis
        # of the batch's size or several (a time-first output sorted by length, T = B in the
        # probe): an order of its own.
        if not reverses & set(axes):
            return None, (several_rows(reverses.fewer) if isinstance(reverses, Unsized)
                          else out_of_order())
        if len(axes) > 1 and len(reverses & set(axes)) == 1:
            axis = (reverses & set(axes)).pop()
            agree = "; the module's batch_first agrees" if declared == axis else ""
            return axis, (f"the only one of axes {axes}, each as long as the batch in probes "
                          f"of {', '.join(map(str, sizes))} items, that reverses with the "
                          f"batch's items{agree}")
    told = f"probes of {', '.join(map(str, sizes))} items"
    if len(axes) == 1:
        agree = "; the module's batch_first agrees" if declared == axes[0] else ""
        return axes[0], f"the only axis that follows the batch in {told}{agree}"
    if not axes:
        return None, ""
    if declared in axes:
        return declared, (f"the module's batch_first = {declared == 0}; {told} could not tell "
                          f"axes {axes} apart")
    return axes[0], f"the first of axes {axes}, which {told} could not tell apart"


# What the rows of a module that runs on some of its batch's rows are, for refusals.
ROUTED = ("the rows a gate routed to it (a mixture of experts' expert), not one an item: "
          "query a layer after the model gathers them back per item")


def several_rows(fewer: bool = False) -> str:
    if fewer:  # the probe's first items all went to it
        return ("its first axis holds fewer rows than its batch's items past the probe's first "
                "items: a module run on the items a gate routes to it (a mixture of experts' "
                "expert: query a layer after the model gathers them back per item), or once a "
                "piece of the batch (a forward that splits its batch: SET batch_size to at "
                "most a piece's size)")
    return ("its first axis holds several rows an item (nodes of a graph, or tokens flattened "
            "into the batch's axis): query a layer after they are pooled or reshaped per item")


def out_of_order() -> str:
    return ("its rows are not in its batch's order: items of the data, run in order twice "
            "and then reversed, did not come back so each time, so it returns the items in an "
            "order of its own (a batch sorted by length for pack_padded_sequence and not put "
            "back, rows dispatched to experts by a gate, or shuffled), and no row can be told "
            "to be an item's; query a layer after the model restores the batch's order")


def declared_axis(module: nn.Module) -> int | None:
    """The batch axis a module's ``batch_first`` declares (RNNs, attention, transformers)."""
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        module = module.layers[0]
    for candidate in (module, getattr(module, "self_attn", None)):
        value = getattr(candidate, "batch_first", None)
        if isinstance(value, bool):
            return 0 if value else 1
    return None
