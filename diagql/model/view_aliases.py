"""Layers whose rows equal a block's view (docs/ARCHITECTURE.md, "Estimates"): a pooling after a
residual stage (the stage's channel means), a Flatten after it, a block's own last activation,
a mean-pool module over an encoder's tokens. The profile pass's first part compares each such
layer with the block's view on the items the blocks' directions are fitted on; a sample
query on a layer that matched on every one of them predicts its items from the block's
projections with known coefficients, as a query on the block's view does, where it had fitted
them on half of the block's leading projections (a GroupNorm CNN's ``pool`` under
weighted(0.05): the actual cosine to the exact answer 1.5e-3 against 7e-5 for the block's
CHANNELS; benchmarks/README.md, "2026-12-04 (twenty-first session)")."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from diagql.model.same_rows import rounding_equal
from diagql.model.views import CHANNELS_LAST, SEQUENCE, ModuleCall, View

# The values compared per item, all pairs together (a pair: its width): each pair holds both
# rows of a batch for a moment and compares them, over the fit part's items only. Layers
# outside every block (a pooling, a Flatten after the last stage) come first, then those
# inside one (a block's last activation), each in the catalog's order.
BUDGET = 1 << 16


@dataclass(frozen=True)
class Alias:
    """A layer's default view equals the block view with key ``target``, or that view's
    channel means (``channels`` of them; ``channels_last``: a map's last axis)."""

    target: str
    channels: int | None = None
    channels_last: bool = False

    def to_json(self) -> list:
        return [self.target, self.channels, self.channels_last]

    @classmethod
    def from_json(cls, value) -> Alias:
        target, channels, last = value
        if not isinstance(target, str) or not (channels is None or isinstance(channels, int)) \
                or not isinstance(last, bool):
            raise ValueError("its layer aliases are not (view key, channels, last) triples")
        return cls(target, channels, last)


def encode(aliases: dict[str, Alias]) -> str:
    return json.dumps({key: alias.to_json() for key, alias in aliases.items()})


def decode(text: str) -> dict[str, Alias]:
    table = json.loads(text)
    try:
        return {str(key): Alias.from_json(value) for key, value in table.items()}
    except (AttributeError, TypeError):  # not a table of triples
        raise ValueError("its layer aliases are not a table of triples") from None


def candidates(catalog, views: list[View]) -> list[tuple[View, View, Alias]]:
    """The pairs worth comparing: (a layer's default view, a block view it might equal, the
    alias it would make): every layer that runs once per pass, read per item, not a block view
    itself, against each block view of its width and each block map's channel means as many
    as its values (a flattened global pooling); a layer inside a block only against the
    blocks under the same top-level module (its own block's last activation, a dropout beside
    an attention), so that twelve blocks of one width do not spend BUDGET on each other."""
    keys = {view.key for view in views}
    targets: list[tuple[int, View, Alias]] = []
    for view in views:
        targets.append((view.width, view, Alias(view.key)))
        layer = view.layer
        if not view.sequence and layer.channels is not None:
            last = layer.layout == CHANNELS_LAST
            targets.append((layer.channels, View(layer, channels=True),
                            Alias(view.key, layer.channels, last)))
    blocks = {view.layer.name for view in views}
    pairs = []
    for layer in getattr(catalog, "layers", ()):
        if layer.shape is None or layer.shared or layer.calls != 1 or \
                (layer.varies and layer.layout != SEQUENCE):
            continue
        own = View(layer)
        if own.key in keys:
            continue
        inside = any(layer.name.startswith(block + ".") for block in blocks)
        top = layer.name.split(".")[0]
        pairs += [(inside, own, target, alias) for width, target, alias in targets
                  if width == own.width and target.layer.name != layer.name
                  and (not inside or target.layer.name.split(".")[0] == top)]
    pairs.sort(key=lambda pair: pair[0])  # stable: the catalog's order within each
    out, values = [], 0
    for _, own, target, alias in pairs:
        values += own.width
        if values > BUDGET:
            break
        out.append((own, target, alias))
    return out


# The pairs still equal after the first FULL_ITEMS items of the fit part are compared on every
# STRIDE-th row of its later batches: the demo's three blocks' last layers, each 4,704 values
# wide at most, had cost its profile pass 9-14% on every row of 2,000 items.
FULL_ITEMS = 256
STRIDE = 4


class EqualViews:
    """The profile pass's comparison of the ``candidates`` pairs, batch by batch over the fit
    part's items (spread over the data), to float32 rounding (a pooling sums in another order
    than a view's mean: same_rows.rounding_equal): a pair that differs once, or whose layer or
    block did not run or could not be read, is dropped, and most pairs are on the first batch.
    What survives equals the block's view on every item compared. On the first 256 items
    alone, a user's mean-pool module that averages padding too had equalled an encoder's
    TOKENS MEAN, held none there, and differed on 75% of the rest (the X1 sweep)."""

    def __init__(self, pairs: list[tuple[View, View, Alias]]):
        self.pairs = list(pairs)
        self.batch: dict[int, torch.Tensor] = {}  # id of a view -> its rows of this batch
        # A block's own view's rows are the projector's (``after_batch``), read once.
        self.shared = {id(target) for _, target, _ in self.pairs if not target.channels}
        self.views = {id(view): view for pair in self.pairs for view in pair[:2]
                      if id(view) not in self.shared}
        self.live = set(self.views)  # the views of the pairs still equal: only theirs are read
        self.seen = 0

    @property
    def stride(self) -> int:
        """Every row of the first FULL_ITEMS items is compared, then every STRIDE-th."""
        return 1 if self.seen < FULL_ITEMS else STRIDE

    def callbacks(self) -> list[tuple[str, object]]:
        """(layer, hook callback) for each compared view, keeping its rows of the batch while
        a pair that holds it is still equal."""
        return [(view.layer.name, self._keep(ident, view)) for ident, view in self.views.items()]

    def _keep(self, ident: int, view: View):
        def keep(call: ModuleCall) -> None:
            if ident not in self.live:
                return
            try:  # copied now: a later in-place op may overwrite it
                rows = view.finish(view.rows(call)).detach()[::self.stride]
                self.batch[ident] = rows.to("cpu", torch.float32, copy=True)
            except Exception:  # noqa: BLE001 - read otherwise than the probe saw
                self.batch.pop(ident, None)
        return keep

    def drop_layer(self, name: str) -> None:
        """Drop the pairs that read the layer ``name`` (it ran more than once in a batch)."""
        self.pairs = [pair for pair in self.pairs
                      if name not in (pair[0].layer.name, pair[1].layer.name)]
        self.live = {id(view) for pair in self.pairs for view in pair[:2]}

    def after_batch(self, size: int, block_rows: dict) -> None:
        """Keep the pairs whose two views gave equal rows for this batch's ``size`` items;
        ``block_rows``: the blocks' views' rows of the batch by view key (the projector's)."""
        if not self.pairs:
            return
        kept, stride = [], self.stride
        rows = -(-size // stride)
        for own, target, alias in self.pairs:
            mine = self.batch.get(id(own))
            theirs = block_rows.get(target.key) if id(target) in self.shared else \
                self.batch.get(id(target))
            if theirs is not None and id(target) in self.shared:
                theirs = theirs[::stride]
            if mine is not None and theirs is not None and mine.shape == theirs.shape \
                    and len(mine) == rows and rounding_equal(mine, theirs):
                kept.append((own, target, alias))
        self.pairs = kept
        self.live = {id(view) for pair in kept for view in pair[:2]}
        self.batch.clear()
        self.seen += size

    def found(self) -> dict[str, Alias]:
        """Each surviving layer's alias by its view key (the first block view it equals)."""
        out: dict[str, Alias] = {}
        for own, _, alias in self.pairs if self.seen else ():
            out.setdefault(own.key, alias)
        return out
