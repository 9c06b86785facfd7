"""A connection: one model and one labelled data set, with the profile and samples they share."""
from __future__ import annotations

import inspect
import json
import time
from typing import Iterator

import numpy as np
import torch
from torch import nn

from diagql import samplers
from diagql.engine.executor import Runner, row_dtype
from diagql.engine.planner import plan_query
from diagql.errors import BindError, DiagQLError
from diagql.language import ast
from diagql.language.binder import (
    bind_layer,
    bind_query,
    bind_sampler,
    require_labels,
    sampler_needs_labels,
)
from diagql.language.parser import parse, parse_piece, parse_sampler, split_statements
from diagql.model import profile as profile_module
from diagql.model.data import ItemSource
from diagql.model.layers import LayerCatalog, LayerInfo, default_latent, probe
from diagql.model.profile import Profile, compute_profile
from diagql.progress import Progress
from diagql.results.result import Result
from diagql.session.settings import Settings
from diagql.storage.activations import ActivationStore
from diagql.storage.store import (
    Cache,
    cache_key,
    data_fingerprint,
    model_fingerprint,
    source_digest,
)


def connect(model: nn.Module, data, *, batch_size: int = 256, device=None, latent: str | None = None,
            cache_dir=None, cache_limit=None, progress: bool | None = None) -> "Connection":
    """Connect a PyTorch model to a labelled data set.

    ``data`` is a torch Dataset of (x, y) items, a DataLoader (its dataset and collate_fn are
    used, in index order), or a pair (X, y) of tensors or arrays. ``device`` defaults to the
    device of the model's parameters; naming another moves the model there. ``latent`` names
    the layer whose output is the latent space (default: the input of the final linear layer).
    ``progress`` forces progress bars on or off (default: on when stderr is a terminal).

    ``cache_dir`` keeps the profile, samples and the sampled items' activations on disk, so
    that a new connection to the same model and data starts without a pass over the data:
    ``None`` (default) uses ``$DIAGQL_CACHE_DIR`` or the platform's cache dir, ``False`` turns
    the disk cache off. ``cache_limit`` bounds its size (bytes, or a text such as ``"500MB"``;
    default ``$DIAGQL_CACHE_LIMIT``, else 2 GiB): the least recently used entries go first.
    Entries are keyed by fingerprints of the model (class, source, weights, buffers, module
    attributes) and of the data; only a pair (X, y), a TensorDataset, or a DataLoader over one
    can be fingerprinted exactly, so other data sets are cached in memory only. Pass
    ``cache_dir=False`` if forward() reads state that these do not cover (globals, files).

    A connection assumes the model and data do not change while it is open: it profiles them
    once. After changing weights or data, connect again.
    """
    return Connection(model, data, batch_size=batch_size, device=device, latent=latent,
                      cache_dir=cache_dir, cache_limit=cache_limit, progress=progress)


class Connection:
    """Answers DiagQL statements about one model over one data set."""

    def __init__(self, model: nn.Module | None, data=None, *, batch_size: int = 256, device=None,
                 latent: str | None = None, cache_dir=None, cache_limit=None,
                 progress: bool | None = None):
        self.settings = Settings()
        self.settings.batch_size = self.settings.coerce("batch_size", batch_size)
        self.settings.latent = latent
        self.cache_dir = cache_dir
        self.cache = Cache.resolve(cache_dir, cache_limit)
        # Forward passes run and items sent through the model by queries (not the profile).
        self.counters: dict[str, int] = {"passes": 0, "items": 0}
        self.progress = Progress(progress)
        self.model = model
        self._catalog: LayerCatalog | None = None
        self._profile: Profile | None = None
        self._samples: dict[str, tuple[np.ndarray, float]] = {}
        self._data = data  # only to fingerprint it for the disk cache
        self._fingerprints: tuple[str | None, str | None] | None = None
        self.activations: ActivationStore | None = None
        if model is None:
            self.source = None
            return
        if not isinstance(model, nn.Module):
            raise DiagQLError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.source = ItemSource(data)
        self.device = _resolve_device(device, model)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                          torch.float32)
        self.activations = ActivationStore(self.cache, self._activation_key,
                                           lambda layer: self.catalog[layer].neurons,
                                           len(self.source), row_dtype(self.dtype))

    @classmethod
    def detached(cls, cache_dir=None, cache_limit=None) -> "Connection":
        """A connection without a model: SHOW SAMPLERS, SHOW CACHE, CLEAR CACHE and SET work,
        queries explain why not."""
        return cls(None, cache_dir=cache_dir, cache_limit=cache_limit)

    # --- what can be queried ------------------------------------------------------------------

    @property
    def catalog(self) -> LayerCatalog:
        self._require_model()
        if self._catalog is None:
            key = self._catalog_key()
            if key is not None:
                self._catalog = self.cache.load("catalog", key, _decode_catalog)
            if self._catalog is None:
                _, x, _ = next(self.source.batches(np.array([0]), 1))
                from diagql.model.data import call_model, to_device

                self._catalog = probe(self.model, to_device(x, self.device, self.dtype),
                                      call_model)
                if key is not None:
                    self.cache.store("catalog", key, _encode_catalog(self._catalog),
                                     meta={"model": type(self.model).__qualname__})
        return self._catalog

    @property
    def layers(self) -> list[str]:
        """Qualified names of the modules a query can name, in registration order."""
        return [layer.name for layer in self.catalog.layers if layer.shape is not None]

    @property
    def n_classes(self) -> int:
        shape = self.catalog.output_shape
        if len(shape) != 1:
            raise DiagQLError(f"the model's output has per-item shape {shape}; DiagQL needs one "
                              f"score per class")
        return shape[0]

    @property
    def profile(self) -> Profile:
        """Labels, predictions, confidence and latents of every item: one pass, then reused
        (from memory, else from the disk cache, else computed and stored there)."""
        self._require_model()
        if self._profile is None:
            key = self._profile_key()
            if key is not None:
                self._profile = self.cache.load("profile", key, self._decode_profile)
            if self._profile is None:
                self._profile = self._compute_profile()
                if key is not None:
                    self._store_profile(key, self._profile)
        return self._profile

    def _compute_profile(self) -> Profile:
        latent = self.settings.latent
        if latent is None:
            name, is_input = default_latent(self.model), True
        else:
            name = bind_layer(ast.LayerRef(latent), self.catalog).name
            is_input = False
        return compute_profile(
            self.model, self.source, latent=name, latent_is_input=is_input,
            device=self.device, dtype=self.dtype, batch_size=self.settings.batch_size,
            progress=self.progress)

    # --- the disk cache ---------------------------------------------------------------------

    def _profile_key(self) -> str | None:
        """The profile's cache key; None when the model or the data cannot be fingerprinted
        exactly (or the cache is off), and then the profile lives in memory only."""
        if not self.cache.enabled:
            return None
        if self._fingerprints is None:  # hashed once: the connection assumes they do not change
            self._fingerprints = (model_fingerprint(self.model), data_fingerprint(self._data))
        model_fp, data_fp = self._fingerprints
        if model_fp is None or data_fp is None:
            return None
        # The device is part of it: CPU and GPU kernels (TF32) differ enough to flip a near
        # tie. The batch size is not: on one device it changes outputs by rounding at most.
        return cache_key("profile", model_fp, data_fp, self.settings.latent, str(self.dtype),
                         self.device.type, source_digest(profile_module))

    def _decode_profile(self, arrays: dict[str, np.ndarray]) -> Profile:
        profile = Profile(
            labels=arrays["labels"], predictions=arrays["predictions"],
            confidence=arrays["confidence"], latents=arrays["latents"],
            n_classes=int(arrays["n_classes"]), latent_layer=str(arrays["latent_layer"]),
            seconds=float(arrays["seconds"]),
            # compute_profile stores -1 for every label of data without labels.
            has_labels=bool(np.all(arrays["labels"] >= 0)))
        n = len(self.source)
        # The types compute_profile makes, one row per item: the rest of DiagQL relies on them.
        if not (profile.labels.shape == profile.predictions.shape == profile.confidence.shape
                == (n,) and profile.latents.ndim == 2 and len(profile.latents) == n
                and profile.labels.dtype == profile.predictions.dtype == np.int64
                and profile.confidence.dtype == np.float64
                and profile.latents.dtype == np.float32):
            raise ValueError(f"it does not describe {n:,} items")
        return profile

    def _store_profile(self, key: str, profile: Profile) -> None:
        arrays = {"labels": profile.labels, "predictions": profile.predictions,
                  "confidence": profile.confidence, "latents": profile.latents,
                  "n_classes": np.int64(profile.n_classes),
                  "latent_layer": np.str_(profile.latent_layer),
                  "seconds": np.float64(profile.seconds)}
        self.cache.store("profile", key, arrays, meta={
            "model": type(self.model).__qualname__, "items": len(profile),
            "latent": profile.latent_layer, "dtype": str(self.dtype),
            "device": str(self.device)})

    def _catalog_key(self) -> str | None:
        """The layer catalog depends on the model and the items' shape, so on both fingerprints."""
        profile_key = self._profile_key()  # None when either cannot be fingerprinted
        if profile_key is None:
            return None
        from diagql.model import layers

        return cache_key("catalog", *self._fingerprints, str(self.dtype), self.device.type,
                         source_digest(layers))

    def _activation_key(self, layer: str) -> str | None:
        profile_key = self._profile_key()
        if profile_key is None:
            return None
        from diagql.engine import executor
        from diagql.model import hooks

        # The code that produces rows is part of the key: a change to it never reuses them.
        return cache_key("activations", profile_key, layer,
                         [source_digest(module) for module in (executor, hooks)])

    def _sample_key(self, sampler: samplers.Sampler) -> str | None:
        """None for a sampler without a seed: its draws differ each time, so it is not kept."""
        profile_key = self._profile_key()
        if profile_key is None or getattr(sampler, "random_state", None) is None:
            return None
        # The sampler's code (its modules, helpers included) is part of the key, so that a
        # changed sampler draws afresh.
        modules = dict.fromkeys(inspect.getmodule(cls) for cls in type(sampler).__mro__
                                if issubclass(cls, samplers.Sampler))
        code = [source_digest(module) for module in modules]
        return cache_key("sample", profile_key, sampler.spec(), code)

    # --- running statements ---------------------------------------------------------------------

    def query(self, text: str) -> Result:
        """Run one statement and return its Result."""
        started = time.perf_counter()
        try:
            statement = parse(text)
        except DiagQLError as exc:
            raise exc.with_source(text) from None
        parsed = time.perf_counter()
        result = self._run(statement, text)
        result.timings["parse"] = parsed - started
        result.timings["total"] = time.perf_counter() - started
        return result

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
        ``--keep-going`` and the REPL stop or continue as they choose.

        Consecutive queries share one forward pass over the union of their items (each still
        gets its own answer, or its own error); any other statement runs on its own."""
        queries: list = []  # (statement, seconds to parse) of the queries waiting to run
        for piece in split_statements(script):
            started = time.perf_counter()
            try:
                statement = parse_piece(piece, script)
            except DiagQLError as exc:
                yield from self._run_queries(queries, script)
                yield exc.with_source(script)
                continue
            parsed = time.perf_counter() - started
            if isinstance(statement, ast.Query):
                queries.append((statement, parsed))
                continue
            yield from self._run_queries(queries, script)
            yield self._run_timed(statement, script, parsed)
        yield from self._run_queries(queries, script)

    def _run_timed(self, statement: ast.Statement, script: str, parsed: float
                   ) -> Result | DiagQLError:
        started = time.perf_counter()
        try:
            result = self._run(statement, script)
        except DiagQLError as exc:
            return exc
        result.timings["parse"] = parsed
        result.timings["total"] = parsed + time.perf_counter() - started
        return result

    def _run_queries(self, queries: list, script: str) -> Iterator[Result | DiagQLError]:
        """Answer the waiting queries (emptying the list): one alone as usual, several
        together in one forward pass."""
        waiting, queries[:] = list(queries), []
        if len(waiting) == 1:
            statement, parsed = waiting[0]
            yield self._run_timed(statement, script, parsed)
            return
        outcomes: list = []
        planned: list = []  # (position, plan, timings) of the queries that planned
        for statement, _ in waiting:
            try:
                plan, timings = self._plan(statement)
            except DiagQLError as exc:
                outcomes.append(exc.with_source(script))
                continue
            planned.append((len(outcomes), plan, timings))
            outcomes.append(None)
        if planned:
            started = time.perf_counter()
            try:
                answers = self._runner().answer_many([plan for _, plan, _ in planned])
            except DiagQLError as exc:  # the pass itself failed (the model's forward raised)
                answers = [exc] * len(planned)
            seconds = time.perf_counter() - started
            for (position, _, timings), answer in zip(planned, answers):
                if isinstance(answer, Result):
                    answer.timings.update(timings)
                    answer.timings["parse"] = waiting[position][1]
                    answer.timings["total"] = seconds
                outcomes[position] = answer if isinstance(answer, Result) else \
                    answer.with_source(script)
        yield from outcomes

    def sample(self, spec: str) -> np.ndarray:
        """The sorted item indices a sampler call selects, e.g. ``db.sample("stratified(0.05)")``."""
        try:
            call = parse_sampler(spec)
            sampler = bind_sampler(call, self.settings.seed, len(self.source))
            return self._sample(sampler)[0].copy()
        except DiagQLError as exc:
            raise exc.with_source(spec) from None

    def _run(self, statement: ast.Statement, source: str) -> Result:
        try:
            return self._dispatch(statement)
        except DiagQLError as exc:
            raise exc.with_source(source) from None

    def _dispatch(self, statement: ast.Statement) -> Result:
        if isinstance(statement, ast.Query):
            return self._query(statement)
        if isinstance(statement, ast.Explain):
            return self._explain(statement)
        if isinstance(statement, ast.SetStatement):
            return self._set(statement)
        if isinstance(statement, ast.ClearCache):
            from diagql.session.show import clear_cache

            return clear_cache(self, statement)
        if isinstance(statement, ast.Evaluate):
            from diagql.evaluate.evaluation import evaluate_statement

            return evaluate_statement(self, statement)
        if isinstance(statement, ast.Describe):
            from diagql.session.show import describe

            return describe(self, statement)
        from diagql.session.show import show

        return show(self, statement)

    def _plan(self, query: ast.Query):
        started = time.perf_counter()
        bound = bind_query(query, self.catalog, n_classes=self.n_classes, seed=self.settings.seed,
                           n_items=len(self.source))
        bound_at = time.perf_counter()
        profile = self.profile
        profiled_at = time.perf_counter()
        if not profile.has_labels:
            require_labels(query)
        sample, sample_seconds = (None, 0.0)
        if bound.sampler is not None:
            sample, sample_seconds = self._sample(bound.sampler)
        planned_at = time.perf_counter()
        plan = plan_query(bound, profile, sample, bound.sampler.spec() if bound.sampler else None)
        timings = {"bind": bound_at - started, "profile": profiled_at - bound_at,
                   "sample": sample_seconds,
                   "plan": time.perf_counter() - planned_at}
        return plan, timings

    def _query(self, query: ast.Query) -> Result:
        plan, timings = self._plan(query)
        result = self._runner().answer(plan)
        result.timings.update(timings)
        return result

    def _runner(self) -> Runner:
        return Runner(self.model, self.source, device=self.device, dtype=self.dtype,
                      batch_size=self.settings.batch_size, progress=self.progress,
                      counters=self.counters, activations=self.activations)

    def _explain(self, statement: ast.Explain) -> Result:
        plan, _ = self._plan(statement.query)
        rows = plan.explain()
        if plan.n_sample is not None:
            layer = plan.bound.layer
            held = self.activations.held(layer.name, plan.items)
            if held == len(plan.items):
                detail = (f"all {held:,} items' activations of {layer.name} are cached: no "
                          f"forward pass")
            elif self.activations.fits(layer, plan.items):
                detail = (f"{held:,} of {len(plan.items):,} items' activations of {layer.name} "
                          f"are cached; the other {len(plan.items) - held:,} go through the "
                          f"model and are kept")
            else:
                detail = (f"{len(plan.items):,} items' activations of {layer.name} exceed the "
                          f"activation cache's memory budget: streamed, not kept")
            rows.insert([step for step, _ in rows].index("forward"), ("cache", detail))
        return Result(kind="explain", statement=statement.text, title=f"plan: {statement.query.text}",
                      columns=["step", "detail"], rows=rows, plan=plan)

    def _set(self, statement: ast.SetStatement) -> Result:
        name = statement.name
        if name not in Settings.names():
            from diagql.suggest import did_you_mean

            where = statement.name_span or statement.span
            raise BindError(f"unknown setting {name!r}{did_you_mean(name, Settings.names())}; "
                            f"settings are {', '.join(Settings.names())}",
                            line=where.line, column=where.column, end_column=where.end_column)
        try:
            value = self.settings.coerce(name, statement.value)
            if name == "latent" and value is not None and self.model is not None:
                bind_layer(ast.LayerRef(value, span=statement.value_span), self.catalog)
        except BindError as exc:
            span = statement.value_span
            if exc.line is None and span is not None:
                exc.line, exc.column, exc.end_column = span.line, span.column, span.end_column
            raise
        if name == "latent" and value != self.settings.latent:
            self._profile = None  # the samplers' space changed: profile and samples are stale
            self._samples.clear()
            if self.activations is not None:
                self.activations.clear()
        setattr(self.settings, name, value)
        return Result(kind="set", statement=statement.text, columns=["setting", "value"],
                      rows=[(name, "default" if value is None else value)])

    def _sample(self, sampler: samplers.Sampler) -> tuple[np.ndarray, float]:
        """The sample's indices and the seconds it took to draw (0 when it was cached)."""
        spec = sampler.spec()
        if spec in self._samples:
            return self._samples[spec][0], 0.0
        profile = self.profile
        if not profile.has_labels and sampler.needs_labels:
            raise BindError(sampler_needs_labels(sampler.name))
        key = self._sample_key(sampler)
        if key is not None:
            cached = self.cache.load("sample", key, self._decode_sample)
            if cached is not None:
                self._samples[spec] = cached
                return cached[0], 0.0
        data = samplers.SampleData(profile.latents, profile.labels, profile.predictions,
                                   profile.n_classes)
        started = time.perf_counter()
        indices = sampler.fit(data).indices_
        seconds = time.perf_counter() - started
        self._samples[spec] = (indices, seconds)
        if key is not None:
            self.cache.store("sample", key, {"indices": indices, "seconds": np.float64(seconds)},
                             meta={"sampler": spec, "items": len(indices)})
        return indices, seconds

    def _decode_sample(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        indices, n = arrays["indices"], len(self.source)
        seconds = float(arrays["seconds"])
        # Sorted, distinct and in range: what fit() returns, and what the executor relies on.
        if (indices.dtype != np.int64 or indices.ndim != 1 or len(indices) == 0
                or indices[0] < 0 or indices[-1] >= n or np.any(np.diff(indices) <= 0)):
            raise ValueError(f"it is not a sample of {n:,} items")
        return indices, seconds

    def _require_model(self) -> None:
        if self.model is None:
            raise BindError("no model is connected: start diagql with --demo, or with --model "
                            "MODULE:CALLABLE --data MODULE:CALLABLE")

    def __repr__(self) -> str:
        if self.model is None:
            return "<diagql.Connection (no model)>"
        return (f"<diagql.Connection {type(self.model).__name__} over {len(self.source):,} items "
                f"on {self.device}>")


def _encode_catalog(catalog: LayerCatalog) -> dict[str, np.ndarray]:
    layers = [[layer.name, layer.type_name, None if layer.shape is None else list(layer.shape),
               layer.calls] for layer in catalog.layers]
    return {"layers": np.str_(json.dumps(layers)),
            "output_shape": np.array(catalog.output_shape, dtype=np.int64)}


def _decode_catalog(arrays: dict[str, np.ndarray]) -> LayerCatalog:
    layers = []
    for name, type_name, shape, calls in json.loads(str(arrays["layers"])):
        if not (isinstance(name, str) and isinstance(type_name, str) and isinstance(calls, int)
                and (shape is None or all(isinstance(d, int) for d in shape))):
            raise ValueError("it does not list layers")
        layers.append(LayerInfo(name, type_name, None if shape is None else tuple(shape), calls))
    return LayerCatalog(layers, tuple(int(d) for d in arrays["output_shape"]))


def _resolve_device(device, model: nn.Module) -> torch.device:
    current = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is None:
        return current
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DiagQLError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiagQLError(f"device {str(device)!r} was requested but this machine has no CUDA "
                          f"GPU; use device='cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiagQLError("device 'mps' was requested but MPS is not available here")
    if device != current:
        model.to(device)
    return device
