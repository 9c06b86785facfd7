"""One model of a connection, seen as the connection for that model: its module (or a
checkpoint loaded on demand), catalog, profile, samples and kept activations; the data, the
settings, the caches and the counters are the connection's (docs/ARCHITECTURE.md,
"several models")."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from diagql.engine.executor import Runner
from diagql.errors import BindError, DiagQLError, DiagQLWarning
from diagql.language import ast
from diagql.model.forward import Cast
from diagql.model.layers import LayerCatalog
from diagql.model.profile import Profile
from diagql.model.scores import classes_of
from diagql.model.weights import LOADED_FROM
from diagql.session.artifacts import Artifacts
from diagql.session.checkpoints import CheckpointSlot, describe_weights
from diagql.session.serial import STATEMENTS
from diagql.storage.activations import ActivationStore, row_dtype
from diagql.storage.fingerprint import Unfingerprintable, data_fingerprint


# The warnings ModelEntry.naming said again, by (text, category, line): the filters' "once
# per place" holds for them as it would have for the first telling.
_RETOLD: dict = {}


class ModelEntry:
    """What statements about one model read. Handlers take it where they took the connection:
    ``model``, ``source``, ``catalog``, ``profile``, ``artifacts``, ``activations``,
    ``runner()`` are this model's."""

    def __init__(self, conn, name: str, module, *, device, dtype, latent: str | None = None,
                 slot: CheckpointSlot | None = None, weights=None, cast=None):
        self.conn = conn
        self.name = name
        self._module = module  # None for a checkpoint: its weights are loaded into the slot
        self.slot = slot
        self.weights = weights  # a checkpoint's path or state_dict
        self.device = device
        self.dtype = dtype  # its rows' (row_dtype) and its cache keys'
        # What its batches' floating inputs are cast to (``input_dtype``: a dtype, or a Cast
        # for a model of mixed dtypes): its final model's for a checkpoint, one architecture.
        self.cast = input_dtype(module) if module is not None else cast
        self.latent = latent  # the layer whose output is the profile's latent; None: default
        self.artifacts = Artifacts(self)
        self.activations = ActivationStore(conn.cache, self.artifacts.activation_key,
                                           len(conn.source), row_dtype(dtype))
        self.stamp: tuple | None = None  # its weights' stamp when last read (session/changes.py)

    @property
    def is_checkpoint(self) -> bool:
        return self.slot is not None

    @property
    def model(self):
        """The module with this model's weights: a checkpoint's are loaded into the one copy
        its checkpoints share (replacing another checkpoint's), so hold it only while using
        it."""
        if self.slot is None:
            return self._module
        return self.slot.hold(self.name, self.weights)

    def describe_weights(self) -> str:
        if self.slot is None:  # --weights loads the file before connecting: it is named
            return LOADED_FROM.get(self._module, "as given")
        return describe_weights(self.weights)

    # --- shared with the connection ------------------------------------------------------

    @property
    def source(self):
        return self.conn.source

    @property
    def data(self):
        return self.conn.data

    @property
    def settings(self):
        return self.conn.settings

    @property
    def cache(self):
        return self.conn.cache

    @property
    def progress(self):
        return self.conn.progress

    @property
    def counters(self):
        return self.conn.counters

    @property
    def given_scores(self):
        """The user's choice of where the class scores are (None: the default's)."""
        return self.conn.given_scores

    @property
    def engine(self):
        """The connection's RayEngine bound to this model (None: passes run here)."""
        return None if self.conn.engine is None else self.conn.engine.on(self.name)

    def data_digest(self) -> str:
        """The data's fingerprint, hashed once per connection whatever the number of models."""
        memo = self.conn._data_digest
        if not memo:
            try:
                memo.append(data_digest(self.conn))
            except Unfingerprintable as exc:
                memo.append(exc)
        if isinstance(memo[0], Unfingerprintable):
            raise memo[0]
        return memo[0]

    # --- what can be queried --------------------------------------------------------------

    @property
    def catalog(self) -> LayerCatalog:
        with STATEMENTS:  # its probe hooks the model, as a statement's passes do
            return self.artifacts.get_catalog()

    @property
    def layers(self) -> list[str]:
        return self.catalog.running_names()

    @property
    def n_classes(self) -> int:
        catalog = self.catalog
        if catalog.scores.refusal is not None and self.given_scores is None:
            raise DiagQLError(catalog.scores.refusal)
        return classes_of(catalog.output_shape)

    def scores_text(self) -> str:
        """Where the class scores are in the model's output, and how many classes they score."""
        catalog = self.catalog
        scores = self.artifacts.scores(catalog)
        if scores.refusal is not None:
            return scores.text()
        why = "scores=" if scores.given else scores.why
        return f"{scores.text()}: {self.n_classes} classes" + (f" ({why})" if why else "")

    @property
    def profile(self) -> Profile:
        # NaN or infinite scores and latents are DiagQL's to report (profile.py warns of them),
        # not numpy's "invalid value encountered" with one of its own source lines.
        with STATEMENTS, self.naming(), np.errstate(invalid="ignore", divide="ignore",
                                                    over="ignore"):
            return self.artifacts.get_profile()

    @contextlib.contextmanager
    def naming(self):
        """One model's mistake (labels outside its classes, a failing forward, an index past
        one of its layers) must not read as every model's: with several, its name comes
        first in the message of a DiagQLError raised within, and of a DiagQLWarning (its
        scores look like probabilities)."""
        several, told = len(self.conn.models) > 1, []
        try:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    yield
                except DiagQLError as exc:
                    if several and not exc.message.startswith("model "):
                        exc.message = f"model {self.name!r}: {exc.message}"
                        exc.args = (exc.message, *exc.args[1:])
                    raise
                finally:
                    told = list(caught)
        finally:
            for warning in told:  # said again outside, named
                text = str(warning.message)
                if several and issubclass(warning.category, DiagQLWarning) and \
                        not text.startswith("model "):
                    text = f"model {self.name!r}: {text}"
                warnings.warn_explicit(text, warning.category, warning.filename,
                                       warning.lineno, registry=_RETOLD)

    def require_model(self) -> None:
        pass  # an entry always has its model

    def forget_latent_space(self) -> None:
        """SET latent changed the samplers' space: profile, samples and kept rows are stale."""
        self.artifacts.forget_latent_space()
        self.activations.clear()

    def forget_derived(self) -> bool:
        """The model or the data changed in place: everything derived from them is stale.
        Whether anything had been derived. (Its inputs indexes: session/changes.py.)"""
        derived = self.artifacts.derived()
        if self.slot is None:  # model.double(), model.to("cuda") since: read as it is now
            self.dtype, self.cast = model_dtype(self._module), input_dtype(self._module)
            self.device = next((p.device for p in self._module.parameters()), self.device)
        self.artifacts = Artifacts(self)
        self.activations = ActivationStore(self.conn.cache, self.artifacts.activation_key,
                                           len(self.conn.source), row_dtype(self.dtype))
        return derived

    def runner(self, besides: tuple = ()) -> Runner:
        """A Runner over this model; ``besides``: the modules of other models that the same
        pass runs (a checkpoint then gets a copy of its own, not one of theirs)."""
        model = self.model if self.slot is None or not besides else \
            self.slot.hold(self.name, self.weights, besides)
        return Runner(model, self.source, device=self.device, dtype=self.cast,
                      batch_size=self.settings.batch_size, progress=self.progress,
                      counters=self.counters, activations=self.activations,
                      engine=self.engine)

    def __repr__(self) -> str:
        return f"<model {self.name}: {type(self.architecture()).__name__}>"

    def architecture(self):
        """The module, or for a checkpoint the final model, without loading any weights (for
        its class, its parameter count and messages)."""
        return self._module if self.slot is None else self.slot.final


def data_digest(conn) -> str:
    """The fingerprint of the connection's data as its source reads it (the columns taken,
    a loader's sampler's items); raises Unfingerprintable."""
    columns = getattr(conn.source, "columns", lambda: None)()
    return data_fingerprint(conn.data, columns, getattr(conn.source, "indices", None))


def input_dtype(module) -> torch.dtype | Cast:
    """What a batch's floating inputs are cast to (model/forward.py: to_device): the one
    dtype of the model's floating parameters, its embeddings' (which take indices) aside, as
    a half model's float32 data take half; where they mix dtypes, an input of one of theirs
    stays as given, as the model itself takes it, and another takes the widest (a Cast).
    Each rule naming one parameter's dtype broke another mix: a frozen half embedding first
    (LL1), a float32 stem before a bfloat16 body (MM1), a float32 logit scale or input
    projection at a half model's root (NN1, NN2)."""
    dtypes = {dtype for _, dtype in _taking_floats(module)}
    if not dtypes:  # embeddings only, or no parameter: their dtype, as before
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()} or \
            {torch.float32}
    if len(dtypes) == 1:
        return dtypes.pop()
    widest = next((d for d in _WIDEST_FIRST if d in dtypes), next(iter(dtypes)))
    return Cast(widest, frozenset(dtypes))


_WIDEST_FIRST = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def model_dtype(module) -> torch.dtype:
    """The dtype of the rows kept (row_dtype) and of the cache keys: the first floating
    parameter's, in the order of registration, of a submodule that takes floating inputs
    (``_taking_floats``), not the root's own (a CLIP-like logit scale, a CLS token, which
    come first in any walk whatever their order); where there is none, the first floating
    parameter's."""
    found = next((dtype for root, dtype in _taking_floats(module) if not root), None)
    if found is None:  # only the root's, embeddings', or none: the first floating one's
        found = next((p.dtype for p in module.parameters() if p.is_floating_point()),
                     torch.float32)
    return found


def _taking_floats(module):
    """(whether it is the root's own, its dtype) of each floating parameter, in the order of
    registration, of a module that takes floating inputs: not an embedding, which takes
    indices (a frozen half embedding registered first had decided a float32 branch's
    inputs: sweep LL1)."""
    skipped = (nn.Embedding, nn.EmbeddingBag)
    for i, owner in enumerate(module.modules()):
        if not isinstance(owner, skipped):
            for parameter in owner.parameters(recurse=False):
                if parameter.is_floating_point():
                    yield i == 0, parameter.dtype


def unknown_model(name, names: list[str], span=None) -> BindError:
    """No model of this name; one named by no str (``on(5)``) is told that names are text."""
    from diagql.suggest import did_you_mean

    if not isinstance(name, str):
        return BindError(f"a model is named by its name (a str: {', '.join(names)}), not "
                         f"{type(name).__name__}")
    return _at(BindError(f"unknown model {name!r}{did_you_mean(name, names)}",
                         hint=f"models are {', '.join(names)} (SHOW MODELS)"), span)


def sampler_model(call: ast.SamplerCall) -> tuple[ast.SamplerCall, str | None]:
    """A sampler call without its ``model='wide'`` argument (which is no sampler's parameter:
    it says whose profile the sample is drawn from), and that model's name (None: the
    default model's)."""
    chosen = [arg for arg in call.args if arg.name == "model"]
    if not chosen:
        return call, None
    if len(chosen) > 1:
        raise _at(BindError("parameter 'model' is given twice"), chosen[1].span)
    value = chosen[0].value
    if not isinstance(value, str):
        raise _at(BindError(f"model= names a model, not {value!r}"), chosen[0].span)
    return replace(call, args=tuple(arg for arg in call.args if arg.name != "model")), value


def sampling_source(conn, source) -> tuple:
    """A statement's source without a sampler's ``model='wide'``, the model whose profile
    its sample is drawn from (the default one unless named), and that name."""
    if not isinstance(source, ast.SamplerCall):
        return source, conn.current, None
    call, drawn_on = sampler_model(source)
    return call, conn.on(drawn_on, source.span), drawn_on


def with_model(spec: str, name: str | None) -> str:
    """A sample's spec as the statement asked for it: ``random(0.1, ..., model='wide')``."""
    return spec if name is None else f"{spec[:-1]}, model={name!r})"


def _at(error: BindError, span) -> BindError:
    if span is not None:
        error.line, error.column, error.end_column = span.line, span.column, span.end_column
    return error


def name_model(conn, result, model: str):
    """With several models, a query's Result names its layer and neurons with the model
    (``wide.fc2``, ``wide.fc2[3]``), its groups and baseline too; one model's stay bare."""
    if len(conn.models) < 2:
        return result
    seen: set[int] = set()  # a group's baseline is also one of the baseline's groups
    stack = [result]
    while stack:
        part = stack.pop()
        if part is None or id(part) in seen:
            continue
        seen.add(id(part))
        if part.layer is not None:
            part.layer = f"{model}.{part.layer}"
        part.labels = [f"{model}.{label}" for label in part.labels]
        stack.extend([*(part.groups or {}).values(), part.baseline])
    return result
