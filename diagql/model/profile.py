"""The profile: every item's label, prediction, confidence and latent vector, held for
every item so that predicates and samplers need no pass (computed by model/profile_pass.py)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from diagql.errors import DiagQLError
from diagql.model import auxiliaries as aux
from diagql.model import winners as winners_module
from diagql.model.views import View


@dataclass(frozen=True)
class Profile:
    """What predicates and samplers read, so that only the items they select need activations."""

    labels: np.ndarray  # int64, the true class of each item; -1 for all when has_labels is False
    predictions: np.ndarray  # int64, argmax of the model's output
    confidence: np.ndarray  # float64, softmax probability of the prediction
    latents: np.ndarray  # float32 (N, d): the latent vector of each item
    n_classes: int
    latent_layer: str  # "input of fc3", "fc2", or "output"
    seconds: float  # wall time of the pass, the basis of EXPLAIN's cost estimate
    # Data without labels (bare x items, or a pair (X, None)) still answers the queries that
    # read only predictions; the connection refuses the others when it binds them.
    has_labels: bool = True
    # The model's output per item (float32, N x classes), kept when it fits
    # same_rows.LOGITS_BUDGET.
    logits: np.ndarray | None = None
    # The views (``View.key``) whose rows equal ``latents`` (or ``logits``) for every item, as
    # the profile pass checked: queries on them are answered from here, without a pass.
    latent_views: tuple[str, ...] = ()
    logit_views: tuple[str, ...] = ()
    # The blocks' principal projections for every item (model/auxiliaries.py): what a sample
    # query on a block predicts its unsampled items from. Given as the pass's tuple; held as
    # aux.Auxiliaries, which a profile read from disk fills block by block on first use.
    auxiliaries: aux.Auxiliaries = ()
    # The model-assisted estimator's latent covariates (engine/covariates.py), when the
    # connection made them with the profile: kept with it so that no process refits them.
    covariates: np.ndarray | None = None
    # Every item's winner of each layer the pass could read, by view key (model/winners.py):
    # an ARGMAX of a layer's neurons is counted from them, with no forward pass.
    winners: dict = dataclasses.field(default_factory=dict)
    # The pass's seconds less DiagQL's own work in it (the blocks' projections, the winners,
    # the comparisons, their fits): about what an exact query's pass over every item costs
    # (``seconds_per_item``). None: not measured (a cache entry of an older version).
    pass_seconds: float | None = None
    # Each layer's share of that pass when its output was ready, for the layers the pass
    # hooked (model/pass_clock.py): a query's pass stops after its layers.
    reached: dict = dataclasses.field(default_factory=dict)
    # The layers the pass hooked that did not run in some batch of it, or ran again on a whole
    # batch (a loop over a padded length, a branch on the data, a loop whose length the data
    # sets): no single activation for every item, so queries on them are
    # refused before a pass, a sample's as a pass over every item is (engine/planner.py).
    unran: tuple[str, ...] = ()
    # The batch size of the pass where the probe found the model batch-dependent (an item's
    # outputs change with the items beside it), else None: such a profile holds for that
    # batch size only (session/artifacts.py, ``get_profile``).
    batch_size: int | None = None

    def __repr__(self) -> str:  # its arrays' dataclass repr ran to 5-32 KB
        right = f", accuracy {np.mean(self.labels == self.predictions):.3f}" * self.has_labels
        return f"<Profile of {len(self.labels):,} items: {self.n_classes} classes, latent " \
               f"{self.latent_layer} ({self.latents.shape[1]} dims){right}>"

    def __post_init__(self):
        if not isinstance(self.auxiliaries, aux.Auxiliaries):
            object.__setattr__(self, "auxiliaries", aux.Auxiliaries(self.auxiliaries))

    def auxiliary(self, view_key: str) -> aux.Auxiliary | None:
        """The auxiliary of the view with this key, when the profile pass kept one (read from
        its cache entry the first time it is asked for)."""
        return self.auxiliaries.get(view_key)

    def winners_of(self, view: View) -> np.ndarray | None:
        """Every item's winner of the view (its channel's, for CHANNELS), when the profile
        pass kept them (model/winners.py)."""
        return self.winners.get(winners_module.key_of(view))

    def rows_of(self, view_key: str) -> np.ndarray | None:
        """Every item's rows of the view with this key, when the profile holds them."""
        if view_key in self.latent_views:
            return self.latents
        if view_key in self.logit_views:
            return self.logits
        return None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> np.ndarray:
        return self.labels == self.predictions

    @property
    def matrix_classes(self) -> int:
        """The confusion matrix's side: the model's classes, or more if a label is past them."""
        return max(self.n_classes, int(self.labels.max(initial=-1)) + 1)

    def confusion_cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The confusion matrix's non-empty cells, by true class then predicted: (true class,
        predicted class, items) arrays no longer than the data, however many classes (a
        50,257-token vocabulary's dense matrix is 20 GB; docs/ARCHITECTURE.md, "Session")."""
        if not self.has_labels:  # -1 labels would index the last row
            raise DiagQLError("the data has no labels, so there is no confusion matrix: "
                              "connect data of (x, y) items to see it")
        n = self.matrix_classes
        codes, counts = np.unique(self.labels * n + self.predictions, return_counts=True)
        return codes // n, codes % n, counts.astype(np.int64)

    def confusion_matrix(self) -> np.ndarray:
        """The dense (classes × classes) int64 matrix; ``confusion_cells`` for many classes."""
        true, predicted, counts = self.confusion_cells()
        matrix = np.zeros((self.matrix_classes,) * 2, dtype=np.int64)
        matrix[true, predicted] = counts
        return matrix

    def seconds_per_item(self, layers: Iterable[str] = ()) -> float:
        """About what a query's pass over ``layers`` costs per item (EXPLAIN's cost, USING
        AUTO's and an error-bounded query's exact answer): the profile pass less DiagQL's own
        work in it, which on a small model had made an exact pass look 4-15x dearer than it
        was, and of that the share until the last of ``layers`` was ready, where the pass
        timed each (a pass stops after its layers: model/pass_clock.py)."""
        seconds = self.seconds if self.pass_seconds is None else self.pass_seconds
        shares = [self.reached.get(layer) for layer in layers]
        if shares and None not in shares:
            seconds *= max(shares)
        return seconds / max(len(self), 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The disk cache's encoding (storage/store.py stores dicts of arrays, no pickle)."""
        arrays = {"labels": self.labels, "predictions": self.predictions,
                  "confidence": self.confidence, "latents": self.latents,
                  "n_classes": np.int64(self.n_classes),
                  "latent_layer": np.str_(self.latent_layer), "seconds": np.float64(self.seconds),
                  "views": np.str_(json.dumps([self.latent_views, self.logit_views]))}
        if self.logits is not None:
            arrays["logits"] = self.logits
        if self.covariates is not None:
            arrays["covariates"] = self.covariates
        if self.pass_seconds is not None:
            arrays["pass_seconds"] = np.float64(self.pass_seconds)
        arrays["reached_layers"] = np.array(list(self.reached), dtype=np.str_)
        arrays["reached_shares"] = np.array(list(self.reached.values()), dtype=np.float64)
        arrays["unran"] = np.array(list(self.unran), dtype=np.str_)
        if self.batch_size is not None:
            arrays["batch_size"] = np.int64(self.batch_size)
        arrays.update(aux.to_arrays(self.auxiliaries))  # their names: each has its own entry
        arrays.update(winners_module.to_arrays(self.winners))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_items: int,
                    load_auxiliary=None) -> "Profile":
        """Decode ``to_arrays``'s output, raising ValueError unless it describes ``n_items``
        items with the types compute_profile makes (the rest of DiagQL relies on them).
        ``load_auxiliary(key, layer)``: reads a block's auxiliary (``aux.Auxiliaries``)."""
        profile = cls(
            labels=arrays["labels"], predictions=arrays["predictions"],
            confidence=arrays["confidence"], latents=arrays["latents"],
            n_classes=int(arrays["n_classes"]), latent_layer=str(arrays["latent_layer"]),
            seconds=float(arrays["seconds"]),
            # compute_profile stores -1 for every label of data without labels.
            has_labels=bool(np.all(arrays["labels"] >= 0)), logits=arrays.get("logits"),
            auxiliaries=aux.from_arrays(arrays, load_auxiliary),
            covariates=arrays.get("covariates"),
            winners=winners_module.from_arrays(arrays, n_items),
            pass_seconds=float(arrays["pass_seconds"]) if "pass_seconds" in arrays else None,
            reached=_reached(arrays),
            unran=tuple(str(layer) for layer in arrays.get("unran", ())),
            batch_size=int(arrays["batch_size"]) if "batch_size" in arrays else None,
            **_views(arrays["views"]))
        logits = profile.logits
        # A binary classifier's one logit per item scores two classes (``_logits``).
        widths = (profile.n_classes, 1) if profile.n_classes == 2 else (profile.n_classes,)
        if logits is not None and (logits.dtype != np.float32 or logits.ndim != 2
                                   or len(logits) != n_items or logits.shape[1] not in widths):
            raise ValueError(f"its logits do not describe {n_items:,} items")
        held = profile.covariates
        if held is not None and (held.dtype != np.float64 or held.ndim != 2
                                 or len(held) != n_items):
            raise ValueError(f"its covariates do not describe {n_items:,} items")
        if not (profile.labels.shape == profile.predictions.shape == profile.confidence.shape
                == (n_items,) and profile.latents.ndim == 2 and len(profile.latents) == n_items
                and profile.labels.dtype == profile.predictions.dtype == np.int64
                and profile.confidence.dtype == np.float64
                and profile.latents.dtype == np.float32):
            raise ValueError(f"it does not describe {n_items:,} items")
        return profile


def _reached(arrays) -> dict:
    if "reached_layers" not in arrays:  # an entry of an older version: the whole pass
        return {}
    layers, shares = arrays["reached_layers"], arrays["reached_shares"]
    if layers.shape != shares.shape or not np.all((shares >= 0) & (shares <= 1)):
        raise ValueError("its layers' shares of the pass do not match")
    return {str(layer): float(share) for layer, share in zip(layers, shares)}


def _views(text) -> dict:
    latent, logit = json.loads(str(text))
    if not all(isinstance(key, str) for key in [*latent, *logit]):
        raise ValueError("its views are not view keys")
    return {"latent_views": tuple(latent), "logit_views": tuple(logit)}
