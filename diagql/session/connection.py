"""A connection: one model and one labelled data set, and the statements asked about them.

``Connection`` is a facade: artifacts.py holds what it derives and caches, statements.py
answers each kind of statement, scripts.py runs scripts (docs/ARCHITECTURE.md, "session").
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Iterator

import numpy as np
import torch
from torch import nn

from diagql.engine.engines import open_engine
from diagql.engine.executor import Runner
from diagql.engine.planner import Plan
from diagql.errors import BindError, DiagQLError, warn
from diagql.language import ast
from diagql.language.binder import bind_sampler, qualify_layer
from diagql.language.parser import parse, parse_sampler
from diagql.model.data import ItemSource, dataset_indices, loader_batch_size
from diagql.model.hooks import hookable
from diagql.model.score_notices import problem_type
from diagql.model.scores import Scores
from diagql.model.train_mode import say_train_mode
from diagql.progress import Progress, import_rich
from diagql.results.result import Result
from diagql.session import scripts
from diagql.session.artifacts import Artifacts, latent_view
from diagql.session.changes import notice_changes, reading, watching
from diagql.session.checkpoints import FINAL, CheckpointSlot, check_name, checkpoint_specs
from diagql.session.class_names import checked, name_classes, resolved
from diagql.session.models import ModelEntry, model_dtype, sampler_model, unknown_model
from diagql.session.settings import Settings
from diagql.session.statements import planned
from diagql.storage.activations import ActivationStore
from diagql.storage.store import Cache

NO_MODEL = ("no model is connected: start diagql with --demo, or with --model MODULE:CALLABLE "
            "--data MODULE:CALLABLE (in Python: diagql.connect(model, data))")


def connect(model: nn.Module | Mapping[str, nn.Module], data, *, batch_size: int | None = None,
            device=None, latent: str | None = None, cache_dir=None, cache_limit=None,
            progress: bool | None = None, label_key: str | None = None,
            checkpoints=None, tokenizer=None, engine: str = "local",
            ray_address: str | None = None, ray_workers: int | None = None,
            scores=None, classes=None) -> "Connection":
    """Connect a PyTorch model (or several) to a data set, labelled or not.

    ``model`` is one ``nn.Module`` (named ``model``), or a mapping of names to modules over the
    same data (``{"base": m1, "wide": m2}``): the first is the default model, ``wide.fc2``
    names another's layer, ``SET model = wide`` changes the default, ``SHOW MODELS`` lists
    them. ``checkpoints`` makes checkpoints of one model's architecture models of their own:
    a mapping of names to paths of saved state_dicts or to state_dicts
    (``{"epoch1": "ckpt/e1.pt", ...}``), a list of paths or a glob (``"ckpt/*.pt"``), each
    named by its file's stem; the model given is then ``final``, the default. Checkpoints
    are loaded one at a time into one copy of the model, when a statement reads them, and
    ``ACROSS CHECKPOINTS`` runs a query on each of them and on ``final``.

    ``data`` takes any of these forms; its items are addressed by index, in index order:

    - a pair ``(X, y)`` of tensors or arrays; ``(X, None)`` is data without labels;
    - a map-style torch ``Dataset`` whose items are ``(x, y)``, a bare ``x``, a dict such as
      ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``, or ``({...}, y)``;
    - a ``DataLoader`` over such a Dataset: its dataset, its sampler's items (a
      ``SubsetRandomSampler``'s split) and ``collate_fn`` are used (not its order or
      ``drop_last``), the collate_fn called on the items of each of DiagQL's own batches,
      so a padding collate (like ``DataCollatorWithPadding``) pads each batch to its longest
      item; with a ``collate_fn`` of its own (which may pad or normalise per batch) its
      batch size is used too, unless ``batch_size=`` is given;
    - a mapping of arrays or tensors with one row per item (a dict of columns, a tokenizer's
      ``BatchEncoding`` of padded sequences), its labels under a label key or given beside
      it as ``(mapping, y)``.

    A batch reaches ``forward`` thus: a tensor is its one argument; a tuple ``x`` (items
    ``((x1, x2), y)``) is spread over its positional arguments, ``model(*x)``; a mapping is
    passed as keyword arguments, ``model(**inputs)``, without its label key. A mapping of one
    entry whose key forward does not take (``{"image": ...}``) is its one argument; to hand
    a whole mapping to a ``forward(batch)``, wrap it in a tuple: ``((mapping,), y)``. The
    label key is ``label_key`` when given (CLI: ``--label-key``), else the first of
    ``labels``, ``label``, ``y``, ``target``, ``targets`` that the mapping has; a mapping with
    none is data without labels (queries that read only predictions still run). Floating
    inputs take the model's dtype where its parameters (its embeddings' aside) share one;
    where they mix, an input of one of their dtypes stays as given and another takes the
    widest; integer ones (token ids, masks) keep theirs.

    ``batch_size`` is the items per forward pass (default: ``Settings.batch_size``).
    ``device`` defaults to the device of the model's parameters; naming another moves the
    model there. ``latent`` names the layer whose output is the latent space (default: the
    input of the final linear layer). ``progress`` forces progress bars on or off (default: on
    when stderr is a terminal).

    ``cache_dir`` keeps the profile, samples and the sampled items' activations on disk, so
    that a new connection to the same model and data starts without a pass over the data:
    ``None`` (default) uses ``$DIAGQL_CACHE_DIR`` or the platform's cache dir, ``False`` turns
    the disk cache off. ``cache_limit`` bounds its size (bytes, or a text such as ``"500MB"``;
    default ``$DIAGQL_CACHE_LIMIT``, else 2 GiB): the least recently used entries go first.
    Entries are keyed by fingerprints of the model (class, source, weights, buffers, module
    attributes and everything they hold) and of the data; a model with an attribute whose
    content cannot be seen (DiagQL warns once) and data other than a pair (X, y), a
    TensorDataset, or a DataLoader over one are cached in memory only (SHOW CACHE says why).
    Pass ``cache_dir=False`` if forward() reads state that these do not cover (globals, files).

    ``scores`` says where the class scores are in what the model's forward returns (for every
    model of the connection): a position in a tuple or list (``scores=1`` for
    ``(features, logits)``), a key or attribute of a dict, dataclass or Hugging Face output
    (``scores="logits"``), or a function of the output that returns them (CLI: ``--scores``,
    a position or a key). By default a tensor is the scores, so is the ``logits`` entry of
    an output; of several vectors per item, the one as wide as the labels need (several as
    wide: the first); anything else is refused, naming the candidates (docs/ARCHITECTURE.md,
    "Data model"). SHOW MODELS says where they were found.

    ``tokenizer`` shows text items (TOPK k INPUTS) as tokens instead of token ids: a Hugging
    Face tokenizer, or a vocabulary (a sequence or mapping from id to token).

    ``classes`` names the classes (a list in class order, or a mapping of index to name), so
    that ``WHERE class = 'cat'`` reads; without it the names are the data's (a Hugging Face
    ClassLabel feature, a torchvision dataset's ``classes``) or the model's
    (``config.id2label``), when they have some.

    A model or data changed in place while the connection is open (trained further, other
    weights loaded, a tensor written) is noticed before the next statement, which derives
    the profile again and says so (session/changes.py); a write through ``.data`` into a
    model over 32 MB is not seen (connect again after one), nor are hooks (for an ablation
    by a hook, add it, then connect anew with ``cache_dir=False``). ``latent``
    applies to the default model and its checkpoints; each model has its own profile.

    ``engine="ray"`` runs the passes over the data (the profile, full-data queries, sample
    queries' items, EVALUATE) on a Ray cluster, with the same answers (docs/SCALING.md):
    ``ray_address`` names a running cluster (default: a new local instance, one CPU per
    core), ``ray_workers`` the number of model replicas (default: one per GPU, else one per
    CPU). ``model`` and ``data`` may then be factories (callables without arguments that
    make them), which every worker calls instead of receiving a pickled copy, and ``data`` a
    Ray Dataset (its rows are the items, dicts of columns). Several models (a mapping, of
    modules or factories) are built on every worker; checkpoints are refused.
    """
    import_rich()  # before any bar or table: rich's first import moves Python's random
    conn = Connection(model, data, batch_size=batch_size, device=device, latent=latent,
                      cache_dir=cache_dir, cache_limit=cache_limit, progress=progress,
                      label_key=label_key, checkpoints=checkpoints, engine=engine,
                      ray_address=ray_address, ray_workers=ray_workers, scores=scores,
                      classes=classes)
    conn.tokenizer = tokenizer
    return conn


def _not_copied(connection) -> None:
    """pickle, copy and deepcopy of a Connection: what it holds is this process's."""
    raise DiagQLError("a Connection holds this process's model, hooks, caches and locks, so it "
                      "is not pickled or copied: pickle its Results (plain data), or connect "
                      "again where you need one")


class _Read:
    """A Connection's read of what its default model derives (``db.profile``): as last
    derived where it is held (a statement notices changes in place), else derived in a
    statement's span of its own, which notices them first (session/changes.py, ``reading``):
    derived unwatched, the changed model's profile was stored under the original's key."""

    def __init__(self, doc: str, held: str = "catalog"):
        self.__doc__, self.held = doc, held

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, conn, owner=None):
        if conn is None:
            return self
        if conn.models and getattr(conn.current.artifacts, self.held) is not None:
            return getattr(conn.current, self.name)  # no stamps: a loop of reads stays cheap
        with reading(conn):
            return getattr(conn.current, self.name)


class Connection:
    """Answers DiagQL statements about one or more models over one data set."""

    def __init__(self, model: nn.Module | Mapping[str, nn.Module] | None, data=None, *,
                 batch_size: int | None = None, device=None, latent: str | None = None,
                 cache_dir=None, cache_limit=None, progress: bool | None = None,
                 label_key: str | None = None, checkpoints=None, engine: str = "local",
                 ray_address: str | None = None, ray_workers: int | None = None, scores=None,
                 classes=None):
        self.engine = None  # a RayEngine, or None: passes run in this process
        if model is not None:
            if engine == "ray" and checkpoints is not None:
                # Checkpoints take turns in one copy of the model, on the driver (SCALING.md).
                raise DiagQLError('engine="ray" runs no checkpoints: connect them with the '
                                  'local engine')
            model, data, self.engine = open_engine(engine, model, data, label_key=label_key,
                                                   ray_address=ray_address,
                                                   ray_workers=ray_workers)
        self.settings = Settings()
        # The user's choice of the class scores in the models' output (None: the default's).
        self.given_scores = None if scores is None else Scores.of(scores)
        # A collate_fn standardising each of the user's batches of 50 gave other numbers in
        # batches of 256, unwarned: a loader's own collate_fn runs over its batch size.
        batch_size = loader_batch_size(data) if batch_size is None else batch_size
        if batch_size is not None:
            self.settings.batch_size = batch_size  # checked as SET checks it (settings.py)
        self.settings.latent = latent
        latent = self.settings.latent  # checked and made a name: latent=1 is layer '1'
        self.cache = Cache.resolve(cache_dir, cache_limit)
        # Forward passes run and items sent through the model by queries (not the profile).
        self.counters: dict[str, int] = {"passes": 0, "items": 0}
        self.progress = Progress(progress)
        self.data = data
        self.tokenizer = None  # shows text items' tokens (connect's ``tokenizer``)
        self.source: ItemSource | None = None
        # Every model, the default first (session/models.py); empty without a model.
        self.models: dict[str, ModelEntry] = {}
        self._data_digest: list = []  # the data's fingerprint, shared by the models
        self.data_stamp: tuple | None = None  # its tensors' stamp when last read (changes.py)
        if model is None:
            return name_classes(self, classes, data, label_key)
        self.source = ItemSource(data, label_key=label_key)
        for name, module in _modules(model, checkpoints).items():
            self._add(name, module, device, latent if not self.models else None)
        if checkpoints is not None:
            final = self.models[FINAL]
            slot = CheckpointSlot(final.model)
            for name, weights in checkpoint_specs(checkpoints).items():
                self.models[name] = ModelEntry(self, name, None, device=final.device,
                                               dtype=final.dtype, latent=latent, slot=slot,
                                               weights=weights, cast=final.cast)
            # The final model last: ACROSS CHECKPOINTS answers in training order.
            self.models[FINAL] = self.models.pop(FINAL)
            self.settings.model = FINAL
        name_classes(self, classes, data, label_key)  # WHERE class = 'cat' reads them
        notice_changes(self)  # the stamps that later statements compare with

    def _add(self, name: str, module, device, latent) -> None:
        what = "model" if name == DEFAULT else f"model {name!r}"
        if not isinstance(module, nn.Module):
            raise DiagQLError(f"{what} must be a torch.nn.Module, not {type(module).__name__}")
        module = hookable(module, what)
        for other in self.models.values():
            # A pass runs each model in its own module: one given twice (or once compiled)
            # would read one set of weights under two names.
            if other.architecture() is module:
                raise DiagQLError(f"models {other.name!r} and {name!r} are one module; give it "
                                  f"once, or a copy (copy.deepcopy) to compare with")
        device = _resolve_device(device, module)
        _say_of(module, "the " + what if name == DEFAULT else what, self.given_scores)
        self.models[name] = ModelEntry(self, name, module, device=device,
                                       dtype=model_dtype(module), latent=latent)
        if latent is not None and not any(p.is_meta for p in module.parameters()):
            latent_view(latent, self.models[name].catalog)  # refused here, as SET latent is

    @classmethod
    def detached(cls, cache_dir=None, cache_limit=None) -> "Connection":
        """A connection without a model: SHOW SAMPLERS, SHOW CACHE, CLEAR CACHE and SET work;
        statements that need a model say so."""
        return cls(None, cache_dir=cache_dir, cache_limit=cache_limit)

    # --- the models -----------------------------------------------------------------------------

    @property
    def current(self) -> ModelEntry:
        """The default model: what an unqualified layer name reads (SET model changes it)."""
        self.require_model()
        name = self.settings.model or next(iter(self.models))
        if name not in self.models:  # conn.settings.model = "nope": SET model would refuse
            raise unknown_model(name, list(self.models), None)
        return self.models[name]

    def on(self, name: str | None, span=None) -> ModelEntry:
        """The model named ``name`` (None: the default one)."""
        if name is None:
            return self.current
        self.require_model()
        if not isinstance(name, str) or name not in self.models:  # on(5) had raised Python's
            raise unknown_model(name, list(self.models), span)
        return self.models[name]

    def resolve(self, ref: ast.LayerRef) -> tuple[ModelEntry, ast.LayerRef]:
        """A layer reference's model and the reference within it (``wide.fc2`` → wide, fc2)."""
        current = self.current
        ref = qualify_layer(ref, list(self.models), current.name,
                            lambda name: self.models[name].catalog)
        return self.on(ref.model, ref.span), ref

    @property
    def model(self) -> nn.Module | None:
        """The default model's module (None without a model)."""
        return self.current.model if self.models else None

    @property
    def device(self) -> torch.device:
        return self.current.device

    @property
    def dtype(self) -> torch.dtype:
        return self.current.dtype

    @property
    def cast(self):  # a dtype, or a Cast (model/forward.py) for a model of mixed dtypes
        return self.current.cast

    @property
    def artifacts(self) -> Artifacts:
        return self.current.artifacts

    @property
    def activations(self) -> ActivationStore | None:
        return self.current.activations if self.models else None

    # --- what can be queried ------------------------------------------------------------------

    catalog = _Read("The default model's LayerCatalog.")
    layers = _Read("Qualified names of the modules a query can name, in registration order.")
    n_classes = _Read("The number of classes the default model scores.")
    profile = _Read("Labels, predictions, confidence and latents of every item: one pass, then "
                    "reused (from memory, else from the disk cache, else computed and stored "
                    "there).", held="profile")

    def require_model(self) -> None:
        if not self.models:
            raise BindError(NO_MODEL)

    def forget_latent_space(self) -> None:
        """SET latent changed the default model's samplers' space: its profile, samples and
        kept rows are stale."""
        if self.models:
            self.current.forget_latent_space()

    # --- running statements ---------------------------------------------------------------------

    def query(self, text: str) -> Result:
        """Run one statement and return its Result."""
        started = time.perf_counter()
        try:
            statement = resolved(parse(text), checked(self))
        except DiagQLError as exc:
            raise exc.with_source(text)  # its cause (the user's code) kept
        return scripts.run_timed(self, statement, text, time.perf_counter() - started)

    def execute(self, script: str) -> list[Result]:
        """Run every statement of a script; on an error the results so far are on ``exc.results``."""
        results: list[Result] = []
        try:
            for result in self.iter_execute(script):
                results.append(result)
        except DiagQLError as exc:
            exc.results = results
            raise
        return results

    def iter_execute(self, script: str) -> Iterator[Result]:
        """Run a script statement by statement, yielding each Result as soon as it exists
        (consecutive queries share one forward pass, so their Results come together)."""
        for outcome in self.run_script(script):
            if isinstance(outcome, DiagQLError):
                raise outcome
            yield outcome

    def run_script(self, script: str) -> Iterator[Result | DiagQLError]:
        """Run every statement, yielding its Result or its DiagQLError and going on: the CLI's
        ``--keep-going`` and the REPL stop or continue as they choose. Consecutive queries
        share one forward pass over the union of their items."""
        return scripts.run_script(self, script)

    def plan(self, query: str | ast.Query) -> Plan:
        """The plan of a query (what EXPLAIN shows), binding it and drawing its sample."""
        if isinstance(query, str):
            try:
                query = resolved(parse(query), checked(self))
            except DiagQLError as exc:
                raise exc.with_source(query)  # its cause (the user's code) kept
        if not isinstance(query, (ast.Query, ast.Similarity)):
            text = getattr(query, "text", query)
            raise DiagQLError(f"plan() takes a query of neurons (TOPK k NEURONS, AVG, ARGMAX) or "
                              f"SIMILARITY, not {text!r}; EXPLAIN shows any statement's plan: "
                              f"conn.query('EXPLAIN {text}')")
        with watching(self):
            return planned(self, query)[0]

    def runner(self) -> Runner:
        """What runs forward passes for the default model (its device, batch size, caches)."""
        return self.current.runner()

    def sample(self, spec: str) -> np.ndarray:
        """The sorted item indices a sampler call selects, e.g. ``db.sample("stratified(0.05)")``
        (``model='wide'`` draws from that model's profile instead of the default model's)."""
        try:
            self.require_model()
            call, name = sampler_model(parse_sampler(spec))
            sampler = bind_sampler(call, self.settings.seed, len(self.source))
            with watching(self):
                drawn = self.on(name).artifacts.get_sample(sampler)[0].indices
            return dataset_indices(self.source, drawn)
        except DiagQLError as exc:
            raise exc.with_source(spec)  # its cause (the user's code) kept

    def close(self) -> None:
        """Hand a Ray connection's workers back to the cluster and let the cache's pending
        writes land; ``with diagql.connect(...) as db:`` closes at the block's end, queries
        after it start new workers, and one dropped unclosed frees them when collected."""
        if self.engine is not None:
            self.engine.close()
        self.cache.flush()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
    __reduce__ = _not_copied  # pickle, copy, deepcopy

    def __repr__(self) -> str:
        return f"<diagql.Connection {self.summary()}>"

    def summary(self) -> str:
        """What it is over, in words (the REPL's banner): ``Net over 2,500 items on cpu``."""
        if not self.models:
            return "(no model)"
        current = self.current
        what = type(current.architecture()).__name__
        if len(self.models) > 1:
            what = f"{len(self.models)} models ({', '.join(_few(list(self.models)))}; default " \
                   f"{current.name})"
        return f"{what} over {len(self.source):,} items on {self.device}"


DEFAULT = "model"  # the name of the one model of connect(model, data)


def _modules(model, checkpoints) -> dict[str, object]:
    """connect's first argument by name: one module is "model" ("final" beside checkpoints),
    a mapping keeps its names and order."""
    if isinstance(model, Mapping):
        if checkpoints is not None:
            raise DiagQLError("checkpoints (checkpoints=, --checkpoint) go with one model, the "
                              "final one, not several: connect the final model alone with its "
                              "checkpoints, or name each checkpoint as a model (--model and "
                              "--weights NAME=PATH, or a mapping of models)")
        if not model:
            raise DiagQLError("the mapping of models is empty")
        return {check_name(name, "model"): module for name, module in model.items()}
    return {FINAL if checkpoints is not None else DEFAULT: model}


def _say_of(module: nn.Module, what: str, given_scores) -> None:
    """What connect warns of about a model: its train mode, and a Hugging Face config's
    problem_type that its scores (unless the user's ``scores=``) do not fit."""
    say_train_mode(module, what)
    notice = problem_type(module, what) if given_scores is None else None
    if notice is not None:
        warn(notice)


def _few(names: list[str]) -> list[str]:
    return names if len(names) <= 4 else [*names[:2], "…", names[-1]]


def _resolve_device(device, model: nn.Module) -> torch.device:
    current = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is None:
        return current
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiagQLError(f"unknown device {device!r}; devices are named cpu, cuda, cuda:1, "
                          f"mps, ... (torch.device)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiagQLError(f"device {str(device)!r} was requested but this machine has no CUDA "
                          f"GPU; use device='cpu' (--device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiagQLError("device 'mps' was requested but MPS is not available here")
    if device.type == "meta" != current.type:  # moving there drops the user's model's weights
        raise DiagQLError("device 'meta' holds no values: DiagQL runs the model on a device "
                          "that computes (cpu, cuda, mps)")
    if device != current:
        model.to(device)
    return device
