"""A Ray connection's workers (docs/ARCHITECTURE.md, "Engines"): the actor that builds the
model and the data once and runs the driver's tasks on its shards, the tally of their progress,
what a worker is sent (a factory, or a value put once in the object store), and this process's
Ray instance. ``ray`` is imported only when a pass first needs it."""
from __future__ import annotations

import gc
import time
import weakref

import numpy as np

from diagql.engine.ray_data import ShardSource, is_ray_dataset
from diagql.errors import DiagQLError
from diagql.model.data_forms import is_factory
from diagql.model.hooks import hookable

REPORT_SECONDS = 0.25  # how often a worker tells the driver of its shard's progress


class Cancelled(Exception):
    """Raised inside a worker's shard once the driver has cancelled it (Ctrl-C)."""


class Tally:
    """The items each shard of each pass has done (its latest attempt's), for one bar."""

    def __init__(self):
        self.done: dict = {}

    def report(self, key: tuple, attempt: int, n: int) -> None:
        seen = self.done.get(key)
        if seen is None or seen[0] <= attempt:
            self.done[key] = (attempt, n)

    def counts(self, pass_id: int) -> dict:
        return {shard: n for (p, shard), (_, n) in self.done.items() if p == pass_id}

    def forget(self, pass_id: int) -> None:
        self.done = {k: v for k, v in self.done.items() if k[0] != pass_id}


class Worker:
    """One model replica and one view of the data, built once; runs tasks on shards."""

    def __init__(self, model, data, label_key, digests: dict, data_digest: str | None = None):
        import ray
        import torch

        from diagql.model.data import ItemSource

        self.label_key = label_key
        # What went wrong building the model or the data here (a module the node cannot
        # import, weights it cannot read, other weights than the driver's): told once by
        # every task, not retried as a death.
        self.failure: DiagQLError | None = None
        try:
            self.models = built_models(model)  # by name: every model of the connection
            hook_ids_past(self.models.values())
            self.failure = other_weights(model, self.models, digests)
            # None: a Ray Dataset, whose blocks come with each shard (engine/ray_data.py).
            made = None if data is None else data() if is_factory(data) else data
            self.source = None if made is None else ItemSource(made, label_key=label_key)
            if self.failure is None and data_digest is not None:
                self.failure = other_data(data, self.source, data_digest)
            # The globals its code reads, as the driver compares them (``other_reads``).
            self.globals_read = code_reads(self.models, made)
            self.device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
            for module in self.models.values():
                module.to(self.device)
        except Exception as exc:  # noqa: BLE001 - the user's factories, on another machine
            self.models = {}
            message = exc.message if isinstance(exc, DiagQLError) else \
                f"{type(exc).__name__}: {exc}"
            self.failure = DiagQLError(f"building the model and the data on a Ray worker "
                                       f"failed: {message}")

    def read_globals(self) -> dict | None:
        """``code_reads`` of what this worker built; None where building failed."""
        return None if self.failure is not None else self.globals_read

    def run(self, task: bytes, items: np.ndarray, tally, key: tuple, attempt: int,
            blocks: list | None = None) -> bytes:
        """``task(models, source, items, device=, advance=)`` over the shard; a DiagQLError is
        returned, not raised, so that the driver raises it as it was. The task and its result
        travel pickled, as bytes: arrays that Ray hands over itself are read-only views of
        its object store, and parts write into theirs."""
        import ray
        from ray import cloudpickle

        context = ray.get_runtime_context()
        done, last = [0], [time.perf_counter()]

        def advance(n: int) -> None:
            done[0] += n
            if context.is_canceled():
                raise Cancelled
            if tally is not None and time.perf_counter() - last[0] >= REPORT_SECONDS:
                last[0] = time.perf_counter()
                tally.report.remote(key, attempt, done[0])

        if self.failure is not None:
            return cloudpickle.dumps(self.failure)
        source = self.source if blocks is None else ShardSource(blocks, self.label_key)
        try:
            result = cloudpickle.loads(task)(self.models, source, items, device=self.device,
                                             advance=advance)
        except DiagQLError as exc:
            result = exc
        except Cancelled:
            # Nobody waits for it; a value, not an error, so that Ray does not log an error
            # that nobody read.
            result = None
        return cloudpickle.dumps(result)


def put_once(ray, value, what: str):
    """``ray.put(value)``, or a one-line DiagQLError where Ray cannot pickle it (a lock, an
    open file): Ray's own TypeError is a hundred lines of its serializability report."""
    try:
        return ray.put(value)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raised, said in one line
        root = exc.__cause__ or exc.__context__ or exc  # pickle's own reason, under Ray's
        first = (str(root).strip().splitlines() or [type(root).__name__])[0]
        raise DiagQLError(f"the {what} cannot be sent to Ray's workers ({first}); pass a "
                          f"factory that builds it on each worker instead: connect(factory, "
                          f"...), or --{what} MODULE:CALLABLE") from None


def start_ray(address: str | None, warn: bool = True):
    """Ray, connected to ``address``, else to the instance this process already runs, else to
    a new local instance with the CPUs Ray finds (a container's quota, not the host's cores).
    ``warn``: whether to say that ``address`` is ignored, where this process runs another
    instance (a RayEngine says it once: each step of its first pass had said it again)."""
    try:
        import ray
    except ImportError:
        raise DiagQLError('engine="ray" needs Ray: pip install "diagql[ray]"') from None
    if not ray.is_initialized():
        options = {"include_dashboard": False, "log_to_driver": False,
                   "logging_level": "warning"}
        try:
            if address is None:
                ray.init(**options)
            else:
                _reachable(address)
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise DiagQLError(f"cannot start Ray at {address or 'a local instance'}: "
                              f"{exc}") from None
    elif address is not None and warn:
        # One Ray per process: the instance it already runs answers, not the one named.
        from diagql.errors import warn as say

        running = getattr(ray.get_runtime_context(), "gcs_address", None) or "another instance"
        if address not in (running, "auto"):
            # Attributed to the user's line (a connect, a statement), not to DiagQL's.
            say(f"ray_address {address!r} is ignored: this process is connected to Ray "
                f"already ({running}); call ray.shutdown() first to use another cluster")
    return ray


def _reachable(address: str, seconds: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) address that takes no connection
    within ``seconds``: Ray itself retries such a one for minutes, unsaid."""
    import re
    import socket

    found = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)", address)
    if found is None:
        return  # "auto", or a form Ray reads itself
    try:
        socket.create_connection((found[1], int(found[2])), timeout=seconds).close()
    except OSError as exc:
        raise DiagQLError(f"cannot reach Ray at {address}: {exc.strerror or exc} (is the head "
                          f"node running, and is that its address? `ray status` on it says)"
                          ) from None


def built_models(model) -> dict:
    """The modules a worker (or the driver) runs, by name (None: a connection's one model):
    from a module, a factory of one or of a mapping of them, or a mapping of modules and
    factories."""
    from collections.abc import Mapping

    made = model() if is_factory(model) else model
    if not isinstance(made, Mapping):
        return {None: hookable(made)}  # as connect hooks it: a compiled model's original
    return {name: hookable(m() if is_factory(m) else m) for name, m in made.items()}


def hook_ids_past(modules) -> None:
    """Torch keys a module's hooks by a counter of this process: the user's hooks came
    unpickled under the driver's ids, and DiagQL's own, counted here from 0, took the same
    keys, overwriting an early hook (an ablation's) and removing it with theirs. The counter
    moves past every id the models' hooks (and torch's global ones) hold."""
    from torch.nn.modules import module as torch_module
    from torch.utils.hooks import RemovableHandle

    tables = [value for name, value in vars(torch_module).items()
              if name.startswith("_global") and isinstance(value, dict)]
    for model in modules:
        for part in model.modules():
            tables += [value for name, value in vars(part).items()
                       if name.endswith("hooks") and isinstance(value, dict)]
    ids = [key for table in tables for key in table if isinstance(key, int)]
    if ids:
        RemovableHandle.next_id = max(RemovableHandle.next_id, max(ids) + 1)


def weights_digests(model, made: dict) -> dict:
    """A digest of the weights of each model in ``made`` (``built_models(model)``) that a
    factory built, by name: the workers' copies must have the same ones (``other_weights``).
    Cheap at any size (storage/sampled.py: a tensor of at most a page whole, about 1 MB of
    spread pages of the others), and a model initialised at random differs in every page."""
    from collections.abc import Mapping

    from torch.nn.parameter import is_lazy

    from diagql.storage.sampled import sampled_digest

    built = set(made) if is_factory(model) else \
        {name for name, m in model.items() if is_factory(m)} if isinstance(model, Mapping) \
        else set()
    return {name: sampled_digest([t for t in (*module.parameters(), *module.buffers())
                                  if not is_lazy(t)])
            for name, module in made.items() if name in built}


def other_weights(model, made: dict, digests: dict) -> DiagQLError | None:
    """The error for a worker whose factory-built models' weights are not the driver's
    (``digests``): a factory that initialises them at random, such as a model class given as
    its own factory, gives every worker a different model, and a pass's shards would mix
    their answers (docs/ARCHITECTURE.md, "Engines")."""
    from collections.abc import Mapping

    mine = weights_digests(model, made)
    differ = [name for name, digest in digests.items() if mine.get(name) != digest]
    if not differ:
        return None
    name = differ[0]
    factory = model[name] if isinstance(model, Mapping) and is_factory(model[name]) else model
    whose = "" if name is None else f" (model {name!r})"
    return DiagQLError(
        f"the model factory {_called(factory)}{whose} built other weights on a Ray worker than "
        f"on the driver: it initialises them at random, so each worker would answer for a "
        f"different model; pass a factory that builds the same weights every time: one that "
        f"loads saved weights (model.load_state_dict(torch.load(path)); on the command line, "
        f"--weights) or seeds torch first (torch.manual_seed(0))")


def code_reads(models: dict, data) -> dict:
    """The globals that the user's code of each model (by name) and of the data's items
    reads, each by its digest (storage/fingerprint.globals_digests): taken on the driver at
    connect, before DiagQL runs the model there (a cache its forward fills, a counter it
    moves, are then as a fresh worker has them), and again where a change is followed before
    any worker started; compared with the first worker's (``other_reads``)."""
    from diagql.storage.fingerprint import globals_digests, item_functions, model_functions

    reads = {("model", name): globals_digests(model_functions(module, script=True), shipped=True)
             for name, module in models.items()}
    if data is not None:
        reads["data", None] = globals_digests(item_functions(data, script=True), shipped=True)
    return reads


def driver_reads(engine, models: dict, data) -> dict:
    """``code_reads`` of the driver's models and data (its copy of a factory's, not a Ray
    Dataset's head, whose blocks the workers read as they are)."""
    return code_reads(models, None if is_ray_dataset(engine.data) else data)


def other_reads(driver: dict, mine: dict) -> str | None:
    """The warning for a worker whose models' or data's code reads other values of the user's
    globals than the driver's (``code_reads``): a worker imports the user's modules afresh,
    so a value set at run time on the driver (``settings.SCALE = 2.0`` in a script) is not
    its, and its answers are for the module's own value (docs/ARCHITECTURE.md, "Engines").
    A warning, not a refusal: a value the module computes per process (its device, its
    threads) differs alike and changes nothing."""
    for (kind, name), values in driver.items():
        theirs = mine.get((kind, name), {})
        differ = sorted(var for var, digest in values.items() if theirs.get(var) != digest)
        if not differ:
            continue
        what = "the data's items" if kind == "data" else \
            "the model" if name is None else f"model {name!r}"
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3
                                         else "")
        whose = "whose value on a Ray worker is" if len(differ) == 1 else \
            "whose values on a Ray worker are"
        return (f"the code of {what} reads {shown}, {whose} not the driver's: a worker imports "
                f"your modules afresh, so a value set while this program runs does not reach "
                f"it, and the answers are for the worker's; where that changes the outputs, set "
                f"it in the module's file, or give a factory that sets it before building the "
                f"{'data' if kind == 'data' else 'model'} (connect(make, ...), which each "
                f"worker calls)")
    return None


# Items read from a data factory's data on the driver and on each worker, spread over it.
CHECKED_ITEMS = 16


def items_digest(source) -> str | None:
    """A digest of the data's length and of CHECKED_ITEMS items spread over it, as read
    (inputs and labels): a data factory's data on a worker must give the driver's
    (``other_data``). None where two reads on the driver differ (a random augmentation, which
    the probe warns of): then no worker's can be compared."""
    from diagql.storage.sampled import sampled_digest

    n = len(source)
    if n == 0:
        return None
    positions = np.unique(np.linspace(0, n - 1, min(n, CHECKED_ITEMS)).round().astype(np.int64))

    def read() -> str:
        _, x, y = next(source.batches(positions, len(positions)))
        return f"{n}:" + sampled_digest(list(_tensors((x, y))), budget=None)

    first = read()
    return first if read() == first else None


def _tensors(value):
    """The tensors and arrays of a batch (nested in tuples, lists and mappings)."""
    from collections.abc import Mapping

    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _tensors(value[key])
    elif isinstance(value, (tuple, list)):
        for part in value:
            yield from _tensors(part)
    elif hasattr(value, "data_ptr") or isinstance(value, np.ndarray):
        yield value


def other_data(data, source, digest: str) -> DiagQLError | None:
    """The error for a worker whose data, made by the data factory, is not the driver's
    (``digest``: ``items_digest`` there): a random split or shuffle without a seed gives each
    process other items, and a pass's shards would answer for a mix of them."""
    mine = items_digest(source)
    if mine is None or mine == digest:
        return None
    length = int(digest.partition(":")[0])
    which = (f"{len(source):,} items there, {length:,} on the driver" if len(source) != length
             else "other items at the same places")
    return DiagQLError(
        f"the data factory {_called(data)} gave a Ray worker other data than the driver "
        f"({which}): it splits, shuffles or samples at random, so each worker would answer "
        f"for other items; pass a factory that gives the same items every time (random_split("
        f"..., generator=torch.Generator().manual_seed(0)), a fixed list of indices)")


def _called(factory) -> str:
    """A factory as its user wrote it: module.name, and a partial's arguments (the command
    line's specs, which it passes as ``partial(load_models, specs, weights)``)."""
    import functools

    function = factory.func if isinstance(factory, functools.partial) else factory
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None)
    called = f"{module}.{name}" if module else name
    if isinstance(factory, functools.partial):
        given = [_short(a) for a in factory.args] + [f"{k}={_short(v)}" for k, v in
                                                     factory.keywords.items()]
        text = ", ".join(given)
        called += f"({text if len(text) <= 80 else text[:77] + '...'})"
    return called


def _short(value) -> str:
    """An argument as a message writes it: a plain value's repr (a list of the command line's
    specs too), else its type (a tensor, a data set)."""
    plain = (str, int, float, bool, type(None))
    if isinstance(value, plain) or (isinstance(value, (list, tuple))
                                    and all(isinstance(v, plain) for v in value)):
        return repr(value)
    return f"<{type(value).__name__}>"


# --- the cluster's CPUs and GPUs --------------------------------------------------------------

FREEING_SECONDS = 10  # how long Ray may take to free the CPUs or GPUs of killed workers
ENGINES: weakref.WeakSet = weakref.WeakSet()  # this process's RayEngines that started workers
_KILLED = [float("-inf")]  # when this process last killed workers (time.monotonic())


def killed() -> None:
    """This process just killed workers (a connection closed, or one dropped and collected)
    or read a Ray Dataset: their CPUs or GPUs come free soon, not at once."""
    _KILLED[0] = time.monotonic()


def held_here(kind: str, but=None) -> tuple[int, int]:
    """(workers, connections): the ``kind`` ("CPU" or "GPU") workers that this process's
    open connections other than ``but`` hold, one each."""
    holding = [len(e.actors_held()) for e in list(ENGINES)
               if e is not but and e.resource_kind() == kind and e.actors_held()]
    return sum(holding), len(holding)


def free_for(ray, kind: str, wanted: int, but=None) -> int:
    """The cluster's free ``kind``s, once at least ``wanted`` if they can be: a connection
    dropped without close() holds its workers until the cycle collector frees it, so this
    collects; and it waits, up to FREEING_SECONDS, only while workers that this process
    killed may still be freeing theirs (docs/ARCHITECTURE.md, "Engines")."""
    free = int(ray.available_resources().get(kind, 0))
    if free >= wanted:
        return free
    before = held_here(kind, but)[0]
    gc.collect()  # a dropped connection's models point back at it: a reference cycle
    if held_here(kind, but)[0] < before:
        killed()
    while free < wanted and time.monotonic() < _KILLED[0] + FREEING_SECONDS:
        time.sleep(0.1)
        free = int(ray.available_resources().get(kind, 0))
    return free


def holders(ray, kind: str, free: int, but=None) -> str:
    """Who holds the cluster's ``kind``s that are not free, as far as this process knows,
    and how to get them back."""
    total = int(ray.cluster_resources().get(kind, 0))
    mine, connections = held_here(kind, but)
    mine = min(mine, total - free)
    others = total - free - mine
    said = []
    if mine:
        said.append(f"{mine} held by the workers of {connections} other open connection"
                    f"{'s' if connections > 1 else ''} of this process (conn.close(), or a "
                    f"with block, hands them back)")
    if others:
        said.append(f"{others} held by other Ray jobs, actors or tasks on the cluster")
    return f"{free} of its {total} {kind}s {'is' if free == 1 else 'are'} free" + \
        (f": {', '.join(said)}" if said else "")


def too_few(ray, kind: str, total: int, free: int, count: int, but=None) -> str:
    """Why ``count`` workers cannot start, from what holds the cluster's ``kind``s: the
    cluster's size, this process's other connections (``but`` aside), or other jobs (it had
    blamed "other connections' workers" where there were none)."""
    each = f"{count} worker{'s' if count > 1 else ''} (one {kind} each)"
    if count > total:
        return (f"the Ray cluster has {total} {kind}s in all, too few for {each}: "
                + (f"connect with ray_workers={total} or fewer (on the command line, "
                   f"--ray-workers {total})" if total else
                   f"start Ray on nodes that have {kind}s"))
    fewer = f"connect with ray_workers={free} or fewer (--ray-workers {free}), or " \
        if free else ""
    return (f"the Ray cluster has too few free {kind}s for {each}: "
            f"{holders(ray, kind, free, but=but)}; {fewer}free some and run the statement "
            f"again")
