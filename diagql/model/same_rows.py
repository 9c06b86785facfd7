"""Which layers hold the same rows as the profile's latent or its logits (docs/ARCHITECTURE.md,
"Data model"): candidates by width, compared exactly batch by batch during the profile pass, so
that queries on the survivors read the profile's rows instead of running the model."""
from __future__ import annotations

import torch

from diagql.model.hooks import hooked_call
from diagql.model.views import SEQUENCE, ModuleCall, View

# Logits are kept in the profile up to this many bytes (1,000 classes x 67,000 items); beyond,
# queries on the output layer run a forward pass as any other.
LOGITS_BUDGET = 256 * 1024 ** 2


class SameRows:
    """Layers whose rows might equal the latent (or the logits), each checked batch by batch
    against them during the profile pass; a layer that differs once, or that DiagQL cannot
    read, is dropped. What survives equals the profile's rows for every item."""

    def __init__(self, views: list[View]):
        # By the key the profile holds their rows under (a sequence layer's: several views;
        # a map's: its CHANNELS too).
        self.views = {view.held_key: view for view in views}
        self.rows: dict[str, torch.Tensor] = {}

    @staticmethod
    def callbacks_of(*checks: "SameRows") -> dict:
        """One callback per layer, feeding every check that compares one of its views (in
        one walk: by each check, 900 layers had cost 0.24 s)."""
        return by_layer((view.layer.name, check._keep(key))
                        for check in checks for key, view in check.views.items())

    def _keep(self, key: str):
        def keep(call: ModuleCall) -> None:
            view = self.views.get(key)
            if view is None:
                return
            try:  # copied now: a later in-place op (ReLU(inplace=True)) may overwrite it
                self.rows[key] = view.finish(view.rows(call)).detach().to("cpu", copy=True)
            except Exception:  # noqa: BLE001 - a layer read otherwise than the probe saw
                del self.views[key]
        return keep

    def drop_layer(self, name: str) -> None:
        """Stop comparing the views of the layer ``name`` (it ran more than once in a batch)."""
        for key in [key for key, view in self.views.items() if view.layer.name == name]:
            del self.views[key]
            self.rows.pop(key, None)

    def compare(self, rows: torch.Tensor) -> None:
        """Keep the views whose rows of this batch equal ``rows`` exactly; a map's channel
        means (a global pooling's sum in another order) to float32 rounding."""
        for key in list(self.views):
            mine = self.rows.pop(key, None)
            if mine is None or mine.shape != rows.shape:
                del self.views[key]
            elif self.views[key].channels:
                if not rounding_equal(mine.to(torch.float32), rows):
                    del self.views[key]
            elif mine.dtype == torch.float64 or not torch.equal(mine.to(torch.float32), rows):
                del self.views[key]

    def keys(self) -> tuple[str, ...]:
        """The held keys (``View.held_key``) of the views that equalled every batch so far."""
        return tuple(self.views)


# Rows equal to float32 rounding: each value within this share of itself plus a tenth of its
# column's largest in the batch (its own scale: a massive channel of 5e3 beside others near 1
# had let a pooling that added 0.02 pass as equal, the X1 sweep); a layer that computes
# something else misses by far more on some item.
RTOL = 1e-4


def rounding_equal(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether two batches' rows are equal to rounding (NaN or inf never is: a NaN difference
    fails the comparison, inf − inf is NaN)."""
    if not theirs.numel():
        return True
    size = theirs.abs()
    scale = size.amax(dim=0)
    size.mul_(RTOL).add_(0.1 * RTOL * scale)
    return bool(((mine - theirs).abs_() <= size).all())


def by_layer(pairs) -> dict:
    """One hook callback per layer from (layer, callback) pairs, in their order: the one
    given, or one that calls each in turn (``fan_out``)."""
    keeps: dict[str, list] = {}
    for layer, callback in pairs:
        keeps.setdefault(layer, []).append(callback)
    return {layer: kept[0] if len(kept) == 1 else fan_out(kept)
            for layer, kept in keeps.items()}


def fan_out(callbacks: list):
    """One hook callback that calls each of ``callbacks`` in turn."""
    def call_all(call: ModuleCall) -> None:
        for callback in callbacks:
            callback(call)
    return call_all


def candidates(catalog, width: int, exclude: str | None = None) -> list[View]:
    """The views of the catalog's layers whose rows are ``width`` wide: the layers that could
    hold the same rows as a profile's latent or logits. A sequence layer's are each way a head
    pools it: the mean over tokens, the max, the first token (a ViT's or BERT's [CLS]) and the
    last (an RNN's, a GPT's); a map's, its channel means (a global pooling before the head)."""
    found = []
    for layer in getattr(catalog, "layers", ()):
        if layer.shape is None or layer.shared or layer.name == exclude \
                or (layer.varies and layer.layout != SEQUENCE):
            continue
        views = [View(layer)]
        if views[0].sequence:
            views += [View(layer, "max"), View(layer, "token", 0), View(layer, "token", -1)]
        elif layer.channels == width and not layer.varies:  # a global pooling's map
            views.append(View(layer, channels=True))
        found += [view for view in views if view.neurons == width and view.reduction != "all"]
    return found



def comparisons(model, catalog, latent, latent_is_input, view, dtype, n) -> tuple:
    """What the profile pass compares with its latent and its logits (two lists of views), and
    whether it keeps the logits: ``profile_part``'s ``compare``, made where the catalog is.
    Nothing for float64 models: the profile keeps float32 rows, which are not theirs."""
    if catalog is None or dtype == torch.float64:
        return [], [], False
    if latent is None:
        width = None
    elif latent_is_input:
        modules = dict(model.named_modules())  # the latent may be a call of it: head#6
        width = getattr(modules[hooked_call(modules, latent)[0]], "in_features", None)
    else:
        width = view.width
    shape = catalog.output_shape
    # One score per item given squeezed (scores=lambda out: out[:, 2]) is one class's logit,
    # kept as (N, 1): not kept, a sigmoid's probabilities read as logits went unwarned
    # (model/score_notices.py, ``sigmoid_applied``; sweep SS9).
    classes = shape[0] if len(shape) == 1 else 1 if shape == () else None
    keep = classes is not None and n * classes * 4 <= LOGITS_BUDGET
    own = None if latent_is_input else latent
    return (candidates(catalog, width, own) if width else [],
            candidates(catalog, classes) if keep else [], keep)
