"""What a connection derives once from its model and data and then reuses: the layer catalog,
the profile and the samples, each from memory, else the disk cache, else computed and stored.

The cache keys live here too: each key names everything its value depends on — the model's
and the data's fingerprints, the settings that shape it, and the digest of the code that
computes it — so that no change ever reuses a stale entry (docs/ARCHITECTURE.md, "storage").
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Callable, TypeVar


from diagql import samplers
from diagql.engine import covariates, executor
from diagql.errors import BindError, warn
from diagql.language import ast
from diagql.language.binder import bind_layer, bind_view, sampler_needs_labels
from diagql.model import (auxiliaries, hooks, layers, probing, repeatable, row_order,
                          same_rows, view_aliases)
from diagql.model import input_masks, layouts, views, winners
from diagql.model import profile as profile_module, profile_pass, score_notices, scores
from diagql.model.call_sites import SharedCalls
from diagql.model.forward import call_model, to_device
from diagql.model.layers import LayerCatalog, default_latent, module_aliases
from diagql.model.probing import probe
from diagql.model.profile import Profile
from diagql.model.profile_pass import compute_profile
from diagql.model.scores import Scores
from diagql.samplers import space
from diagql.storage.fingerprint import (Unfingerprintable, cache_key, model_fingerprint,
                                        scores_fingerprint, source_digest)
from diagql.storage.store import touch

T = TypeVar("T")


def load_or_compute(cache, kind: str, key: str | None, compute: Callable[[], T],
                    encode: Callable[[T], dict], decode: Callable[[dict], T],
                    meta: Callable[[T], dict], usable: Callable[[T], bool] | None = None) -> T:
    """The one way a cached artifact is had: read it under ``key`` (None: memory only), else
    compute it and store it there, unless computing it again costs less than reading it back
    would (the cache weighs the seconds it took). A damaged entry is a miss (storage/store.py
    reports it), as is one read back that ``usable`` refuses (made for other settings than
    its key holds: it is made again and stored over it)."""
    if key is not None:
        value = cache.load(kind, key, decode)
        if value is not None and (usable is None or usable(value)):
            return value
    started = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - started
    if key is not None:
        cache.store(kind, key, encode(value), meta=meta(value), seconds=seconds)
    return value


# The modules whose code makes a catalog (part of its cache key).
_PROBE_CODE = (layers, probing, layouts, repeatable, row_order, views, input_masks,
               scores)

def latent_view(latent: str, catalog: LayerCatalog):
    """The view the profile reads the latent layer named ``latent`` through; an unknown name
    is refused as the latent's, since no statement named it."""
    try:
        layer = bind_layer(ast.LayerRef(latent), catalog)
    except BindError as exc:
        raise BindError(f"the latent layer (connect(latent=...), --latent or SET "
                        f"latent): {exc.message}", hint=exc.hint) from None
    return bind_view(ast.Query("avg", "neurons", ast.LayerRef(latent)), layer)


class Artifacts:
    """The catalog, profile and samples of one model of a connection (``conn`` is its
    session.models.ModelEntry), and the cache keys they are kept under. A model or data
    changed in place gets new Artifacts (session/changes.py)."""

    def __init__(self, conn):
        self.conn = conn
        self.catalog: LayerCatalog | None = None
        self.profile: Profile | None = None
        self.profile_read = False  # whether the profile was read from the cache, not computed
        self.samples: dict[str, samplers.Sample] = {}  # by sampler spec
        self._fingerprints: tuple[str, str, object] | None = None
        # "model" / "data" -> why it cannot be fingerprinted, so its artifacts stay in memory.
        self.memory_only: dict[str, str] = {}
        self._fingerprinted = False

    # --- the artifacts ----------------------------------------------------------------------

    def _probe(self) -> LayerCatalog:
        conn = self.conn
        return probe(conn.model, conn.source, lambda x: to_device(x, conn.device, conn.cast),
                     call_model, conn.given_scores, conn.progress)

    def scores(self, catalog: LayerCatalog) -> Scores:
        """Where the class scores are in the model's output, as the probe found them (a
        function given as scores= is not in a catalog read from disk: it is given again)."""
        given = self.conn.given_scores
        if given is not None and given.pick is not None and catalog.scores.pick is None:
            return dataclasses.replace(catalog.scores, pick=given.pick)
        return catalog.scores

    def get_catalog(self) -> LayerCatalog:
        if self.catalog is None:
            conn, computed = self.conn, []

            def compute() -> LayerCatalog:  # its probe warns of what it finds
                computed.append(self._probe())
                return computed[0]

            self.catalog = load_or_compute(
                conn.cache, "catalog", self.catalog_key(), compute, LayerCatalog.to_arrays,
                LayerCatalog.from_arrays, lambda _: {"model": type(conn.model).__qualname__})
            self.catalog.aliases = module_aliases(conn.model)
            if not computed:  # read from the cache: what the probe found still holds
                for notice in self.catalog.notices:
                    warn(notice)
            _warn_guessed_scores(self.catalog, conn.given_scores)
        return self.catalog

    def get_profile(self) -> Profile:
        if self.profile is None:
            conn = self.conn
            n_items = len(conn.source)
            key = self.profile_key()
            computed = []

            def compute() -> Profile:
                computed.append(self._compute_profile())
                return computed[0]

            def read_auxiliary(view_key: str, layer: str):
                return self._read_auxiliary(key, view_key, layer)

            self.profile = load_or_compute(
                conn.cache, "profile", key, compute, Profile.to_arrays,
                lambda arrays: Profile.from_arrays(arrays, n_items, read_auxiliary),
                lambda p: {"model": type(conn.model).__qualname__, "items": len(p),
                           "latent": p.latent_layer, "dtype": str(conn.dtype),
                           "device": str(conn.device)},
                # A batch-dependent model's profile from batches of another size (its key
                # holds no batch size: a profile loaded from disk needs no catalog to say so)
                # had answered WHERE incorrect with their mistakes (SW5): made again.
                usable=lambda p: p.batch_size in (None, conn.settings.batch_size))
            _say_notices(self.profile, self.catalog)
            self.profile_read = not computed
            if key is not None and computed:
                self._store_auxiliaries(key, computed[0])
            elif key is not None:
                # Used with their profile, so that least-recently-used eviction takes them
                # together, not the blocks' entries first (a block query reads them rarely).
                for view_key, _ in self.profile.auxiliaries.names:
                    touch(conn.cache, "auxiliary", self.auxiliary_key(key, view_key))
        return self.profile

    def _store_auxiliaries(self, key: str, profile: Profile) -> None:
        """Each block's auxiliary in its own entry, which the profile entry names: a new
        process reads only the queried block's (docs/ARCHITECTURE.md, "Storage"). Remaking
        one costs the profile pass."""
        for a in profile.auxiliaries.held():
            self.conn.cache.store("auxiliary", self.auxiliary_key(key, a.key),
                                  auxiliaries.entry_arrays(a), meta={"layer": a.layer},
                                  seconds=profile.seconds)

    def _read_auxiliary(self, key: str, view_key: str, layer: str) -> tuple:
        """A block's auxiliary from its entry; when that was evicted or is damaged, the
        profile pass again, whose auxiliaries are kept and stored (docs/ARCHITECTURE.md,
        "Storage": an answer never depends on which entries the cache still holds)."""
        found = self.conn.cache.load(
            "auxiliary", self.auxiliary_key(key, view_key),
            lambda arrays: auxiliaries.from_entry(arrays, view_key, layer, len(self.conn.source)))
        if found is not None:
            return (found,)
        fresh = _profile_pass(self)
        self._store_auxiliaries(key, fresh)
        return fresh.auxiliaries.held()

    def _compute_profile(self) -> Profile:
        """The profile pass, and the estimator's latent covariates, kept with it; the batch
        size of a batch-dependent model's (``Profile.batch_size``)."""
        profile = _profile_pass(self)
        return dataclasses.replace(profile, covariates=covariates.reduced(profile.latents))

    def has_sample(self, sampler: samplers.Sampler) -> bool:
        """Whether the sampler's sample is had without drawing it: in memory, or read back
        from the cache (and then kept in memory)."""
        spec, key = sampler.spec(), self.sample_key(sampler)
        if spec not in self.samples and key is not None:
            found = self.conn.cache.load("sample", key, lambda arrays: samplers.Sample.from_arrays(
                arrays, spec, len(self.conn.source)))
            if found is not None:
                self.samples[spec] = found
        return spec in self.samples

    def get_sample(self, sampler: samplers.Sampler) -> tuple[samplers.Sample, bool]:
        """The sampler's sample and whether it was drawn just now (False: from a cache)."""
        spec = sampler.spec()
        if self.has_sample(sampler):
            return self.samples[spec], False
        profile = self.get_profile()
        if not profile.has_labels and sampler.needs_labels:
            raise BindError(sampler_needs_labels(sampler.name))
        data = samplers.SampleData.of(profile)
        started = time.perf_counter()
        sample = samplers.Sample(spec, sampler.fit(data).indices_, time.perf_counter() - started)
        if (key := self.sample_key(sampler)) is not None:
            self.conn.cache.store("sample", key, sample.to_arrays(), seconds=sample.seconds,
                                  meta={"sampler": spec, "items": len(sample.indices)})
        self.samples[spec] = sample
        return sample, True

    def forget_latent_space(self) -> None:
        """SET latent changed the samplers' space: the profile and samples are stale."""
        self.profile = None
        self.samples.clear()

    # --- cache keys ---------------------------------------------------------------------------

    def derived(self) -> bool:
        return bool(self.catalog or self.profile or self.samples or self._fingerprinted)

    def fingerprints(self) -> tuple[str, str, object] | None:
        """(model, data, scores choice) digests, hashed once; None when one cannot be hashed
        completely (``memory_only`` says why) or the cache is off."""
        if not self.conn.cache.enabled:
            return None
        if not self._fingerprinted:
            self._fingerprinted = True
            parts = {}
            for what, fingerprint in (("model", lambda: model_fingerprint(self.conn.model)),
                                      ("data", self.conn.data_digest),
                                      ("scores", lambda: _scores_digest(self.conn))):
                try:
                    parts[what] = fingerprint()
                except Unfingerprintable as exc:
                    self.memory_only[what] = str(exc)
            _warn_memory_only(self.memory_only, self.conn.cache)
            if not self.memory_only:
                self._fingerprints = (parts["model"], parts["data"], parts["scores"])
        return self._fingerprints

    def profile_key(self) -> str | None:
        fingerprints = self.fingerprints()
        if fingerprints is None:
            return None
        conn = self.conn
        # The device is part of it: CPU and GPU kernels (TF32) differ enough to flip a near
        # tie. The batch size is not: on one device it changes outputs by rounding at most.
        # On Ray, the workers' device, which makes the passes, not the driver's.
        device = conn.device.type if conn.engine is None else conn.engine.device_type()
        return cache_key("profile", *fingerprints, conn.latent, str(conn.dtype),
                         device, *map(source_digest, (profile_module, profile_pass, views, input_masks)),
                         source_digest(scores),  # where the class scores are read
                         source_digest(layers), source_digest(probing),  # the catalog
                         *map(source_digest, (auxiliaries, view_aliases)),  # blocks, aliases
                         source_digest(winners),  # every layer's winners
                         source_digest(same_rows),  # which layers hold its rows
                         # the estimator's covariates, kept with it
                         source_digest(covariates.reduced), covariates.DIMS,
                         source_digest(space))

    def catalog_key(self) -> str | None:
        """The catalog depends on the model and the items' shape, so on both fingerprints,
        and on the probe's code, its checks' too (a fixed check refuses what one listed)."""
        fingerprints = self.fingerprints()
        if fingerprints is None:
            return None
        return cache_key("catalog", *fingerprints, str(self.conn.dtype), self.conn.device.type,
                         *map(source_digest, _PROBE_CODE))

    def auxiliary_key(self, profile_key: str, view_key: str) -> str:
        """The key of a block's auxiliary: its profile's, and the block's view."""
        return cache_key("auxiliary", profile_key, view_key)

    def activation_key(self, view_key: str) -> str | None:
        """The key of a view's rows (``View.key``: the layer and how its tokens reduce)."""
        profile_key = self.profile_key()
        if profile_key is None:
            return None
        # The code that produces rows is part of the key: a change to it never reuses them.
        return cache_key("activations", profile_key, view_key,
                         [source_digest(module) for module in (executor, hooks, views)],
                         *self.batch_size_key())

    def sample_key(self, sampler: samplers.Sampler) -> str | None:
        """None for a sampler without a seed: its draws differ each time, so it is not kept."""
        profile_key = self.profile_key()
        if profile_key is None or getattr(sampler, "random_state", None) is None:
            return None
        # The sampler's code (its modules, helpers included) is part of the key, so that a
        # changed sampler draws afresh.
        modules = dict.fromkeys(inspect.getmodule(cls) for cls in type(sampler).__mro__
                                if issubclass(cls, samplers.Sampler))
        return cache_key("sample", profile_key, sampler.spec(),
                         [source_digest(module) for module in modules], *self.batch_size_key())

    def batch_size_key(self) -> tuple:
        """The profile's batch size, where the model is batch-dependent (``Profile.batch_size``):
        in the keys of what was made from it, as it is not in the profile's own key."""
        size = None if self.profile is None else self.profile.batch_size
        return () if size is None else (size,)


def _profile_pass(artifacts: Artifacts) -> Profile:
    """The profile pass (its directions, winners and comparisons with it), on the connection's
    engine; a batch-dependent model's stamped with its batch size (``Profile.batch_size``)."""
    conn = artifacts.conn
    latent = conn.latent
    view = None
    if latent is None:
        # The catalog as it is, or probed (three items) for the pass alone: a profile
        # loaded from disk needs none, and one computed touches no other cache entry.
        catalog = artifacts.catalog or artifacts._probe()
        name, is_input = default_latent(conn.model, catalog), True
    else:
        view = latent_view(latent, artifacts.get_catalog())
        name, is_input = view.layer.name, False
        catalog = artifacts.catalog
    batch = conn.settings.batch_size if catalog is not None and catalog.batch_dependent \
        else None  # Profile.batch_size
    if conn.engine is not None:
        n = len(conn.source)
        compare = same_rows.comparisons(conn.model, catalog, name, is_input, view,
                                        conn.dtype, n)
        blocks = auxiliaries.blocks(conn.model, catalog, n, name, is_input)
        profile = conn.engine.profile(
            n, latent=name, latent_is_input=is_input, view=view, dtype=conn.dtype,
            cast=conn.cast,
            batch_size=conn.settings.batch_size, progress=conn.progress, compare=compare,
            blocks=blocks, winners=winners.views(catalog, n), scores=artifacts.scores(catalog),
            pairs=view_aliases.candidates(catalog, blocks), shared=SharedCalls.of(catalog))
    else:
        profile = compute_profile(
            conn.model, conn.source, latent=name, latent_is_input=is_input, device=conn.device,
            dtype=conn.dtype, cast=conn.cast, batch_size=conn.settings.batch_size,
            progress=conn.progress,
            view=view, catalog=catalog, scores=artifacts.scores(catalog))
    return dataclasses.replace(profile, batch_size=batch)


def _say_notices(profile: Profile, catalog: LayerCatalog | None) -> None:
    """The profile's notices, said to each session that reads it, as to the one that
    computed it (a statement binds on the catalog first: where the scores were found)."""
    for notice in score_notices.profile_notices(profile, None if catalog is None else
                                                catalog.scores):
        warn(notice)


def _warn_guessed_scores(catalog: LayerCatalog, given) -> None:
    """Say that the default took the first of several score vectors of one width: an
    auxiliary head given first would make every prediction another head's."""
    if catalog.scores.why == scores.EQUAL_WIDTHS and given is None:
        warn(f"the model's output holds several vectors of class scores of one width; DiagQL "
             f"reads output[{catalog.scores.at!r}], the first (the main head, by convention: "
             f"Inception's (logits, aux)); if another is, name it with scores= (--scores)")


def _warn_memory_only(memory_only: dict, cache) -> None:
    """Say once that a connection's artifacts stay in memory: always for the model (other
    models would share its key if it pretended to see what it cannot), for the data when the
    user named the cache directory (which would stay empty without a word)."""
    if memory_only.get("model"):
        warn(f"the model is cached in memory only: {memory_only['model']}")
    elif memory_only.get("data") and cache.asked:
        warn(f"the data is cached in memory only, nothing in {cache.root}: "
             f"{memory_only['data']}")


def _scores_digest(conn):
    """The user's choice of the class scores (a function: its digest, as a model
    attribute's), or the default's, which the data's fingerprint decides."""
    given = conn.given_scores
    if given is None or given.pick is None:
        return (given or Scores()).key()
    try:
        return ["function", scores_fingerprint(given.pick)]
    except Unfingerprintable as exc:
        raise Unfingerprintable(f"the scores= function: {exc}") from None


KEEP_IN_USE = 60.0  # seconds between marks of a session's profile and catalog as used


def keep_in_use(artifacts: Artifacts) -> None:
    """Mark the profile and catalog a session holds in memory as used now, at most once a
    KEEP_IN_USE: read once per session, they had looked least recently used, and a cache
    over its limit evicted them first (a sweep's, 15 MB), the profile costing a full pass
    to make again while its activations stayed."""
    now = time.monotonic()
    if artifacts.profile is None or now - getattr(artifacts, "marked", -KEEP_IN_USE) < \
            KEEP_IN_USE:
        return
    artifacts.marked = now
    key = artifacts.profile_key()
    if key is not None:
        touch(artifacts.conn.cache, "profile", key)
        touch(artifacts.conn.cache, "catalog", artifacts.catalog_key())

