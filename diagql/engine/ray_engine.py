"""Passes on a Ray cluster (docs/ARCHITECTURE.md, "Engines"): one actor per worker (per GPU
where the cluster has GPUs) rebuilds the model and the data once, runs the same pass code as
the local engine on the shards it is given, and sends back mergeable states; the driver merges
them in shard order. The workers themselves, and this process's Ray instance, are
engine/ray_workers.py's. ``ray`` is imported only when a pass first needs it.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
import time

import numpy as np

from diagql.engine.ray_data import DatasetBlocks, DatasetHead
from diagql.engine.ray_workers import (ENGINES, Tally, Worker, free_for, holders, killed,
                                       other_reads, put_once, start_ray, too_few)
from diagql.engine.shards import feed_shard, merge_parts, parts_for, shard_items
from diagql.errors import DiagQLError, ExecutionError, warn
from diagql.model import pass_clock
from diagql.model.data_forms import is_factory
from diagql.model.profile import Profile
from diagql.model.profile_pass import (assemble_profile, fit_items, fit_part, profile_part,
                                       projected_part, with_blocks)

SHARDS_PER_WORKER = 4  # smaller shards: less work lost to a dead worker, better balance
IN_FLIGHT = 2  # shards queued per actor, so that none idles between two of them
RETRIES = 3  # a shard whose worker died is run again this many times before the pass fails
POLL_SECONDS = 0.2  # how often the driver looks at the workers' progress


class RayEngine:
    """Runs a connection's passes on Ray: the model and the data reach each worker once (as
    themselves, pickled, or as factories that the workers call)."""

    name = "ray"

    def __init__(self, model, data, *, label_key: str | None = None, address: str | None = None,
                 workers: int | None = None):
        # A module, a factory, or a mapping of them (several models): built on each worker.
        self.model, self.data, self.label_key = model, data, label_key
        self.several = False  # whether the connection names its models (open_engine says)
        self.address, self.workers = address, workers
        self.retried = 0  # shards run again after their worker died, over the engine's life
        # Bytes of pickled tasks sent to workers and of results sent back (the model and the
        # data travel once per worker, apart): what docs/SCALING.md's traffic model counts.
        self.traffic = {"tasks": 0, "results": 0}
        self._ray = None
        self._blocks: DatasetBlocks | None = None  # a Ray Dataset's, made by dataset_head()
        self._actors: list = []
        self._job = None  # the Ray session the workers were started in (``_session``)
        self._tally = None
        self._passes = 0
        self._device_type: str | None = None
        self._warned = False  # whether an ignored ray_address was warned of
        # What every worker's own must equal (open_engine): the weights digest of each model a
        # factory built, a data factory's items as read (ray_workers.other_weights,
        # other_data), and the driver's code's reads of globals (code_reads).
        self.digests, self.data_digest, self.reads = {}, None, {}

    def dataset_head(self) -> DatasetHead:
        """For a Ray Dataset: turn it into blocks in the object store (now, while no worker
        holds a CPU that its reading tasks need) and return what the driver keeps of it."""
        self._ray = self._started_ray()
        self._blocks = _read(self._ray, self.data, self)
        return self._blocks.head()

    def device_type(self) -> str:
        """What the workers run on: "cuda" where the cluster has GPUs, else "cpu" (whatever the
        driver has). Outputs depend on it, so the cache keys of what passes make name it."""
        if self._device_type is None:
            ray = self._ray = self._started_ray()
            self._device_type = "cuda" if int(ray.cluster_resources().get("GPU", 0)) else "cpu"
        return self._device_type

    def _started_ray(self):
        """``start_ray``, its warning of an ignored ``address`` said once per connection."""
        ray = start_ray(self.address, warn=not self._warned)
        self._warned = True
        return ray

    def actors_held(self) -> list:
        """The workers this engine holds now (none before its first pass, after close(), or
        after the Ray they ran in was shut down: ``ray.shutdown()`` between statements)."""
        if self._actors and not (self._ray.is_initialized() and self._job == _session(self._ray)):
            self._actors, self._tally = [], None  # gone with their Ray: started again
        return self._actors

    def resource_kind(self) -> str:
        """What each of its workers holds one of: "GPU" on a cluster with GPUs, else "CPU"."""
        return "GPU" if self._device_type == "cuda" else "CPU"

    def start(self) -> list:
        """The actors, created on the first pass: one per GPU if the cluster has GPUs, else
        one per CPU (or ``workers``)."""
        if self.actors_held():
            return self._actors
        ray = self._ray = self._started_ray()
        resources = ray.cluster_resources()
        gpus = self.device_type() == "cuda"  # the device the cache keys name
        kind = "GPU" if gpus else "CPU"
        total = int(resources.get(kind, 0))
        count = _count(ray, kind, total, self)
        # Put once: every actor reads the same copy from the object store.
        model = self.model if is_factory(self.model) else put_once(ray, self.model, "model")
        data = None if self._blocks is not None else \
            self.data if is_factory(self.data) else put_once(ray, self.data, "data")
        # Not restarted by Ray: a dead worker is replaced by a new one here (run()), so that
        # the shard it held is run again exactly once per death, and merged once.
        worker = ray.remote(Worker).options(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0)
        self._new_worker = lambda: worker.remote(model, data, self.label_key, self.digests,
                                                 self.data_digest)
        self._actors = [self._new_worker() for _ in range(count)]
        with _discarded_on_failure(ray, self._actors):
            _compare_reads(ray, self._actors[0], self.reads)
            self._tally = ray.remote(Tally).options(num_cpus=0).remote()
        self._job = _session(ray)
        ENGINES.add(self)  # what holds the cluster's CPUs (GPUs), said when they are too few
        return self._actors

    def close(self) -> None:
        """Hand the workers back to the cluster."""
        for actor in self.actors_held():
            self._ray.kill(actor)
        if self._actors:
            killed()
        self._actors = []
        if self._tally is not None:
            self._ray.kill(self._tally)
            self._tally = None

    # --- passes -----------------------------------------------------------------------------

    def on(self, name: str) -> ModelEngine:
        """This engine as one model of the connection sees it: its passes run that model."""
        return ModelEngine(self, name if self.several else None)

    def feed(self, passes: list, items: np.ndarray, description: str, *, batch_size: int,
             progress) -> None:
        """The executor's pass (``run_together``) on the cluster: ``passes`` are (model key,
        dtype, consumers) each; each shard's parts of every model's consumers are fed on one
        worker, each batch through each model, and merged back in shard order."""
        shards = self._shards(items, batch_size)
        # A shard's parts of every model travel in one task: consumers that share state
        # across models (SIMILARITY's feeds) share it in the worker too.
        tasks = [_task(feed_shard, passes=[(key, dtype, parts_for(consumers, shard))
                                           for key, dtype, consumers in passes],
                       batch_size=batch_size) for shard in shards]
        results = self.run(tasks, shards, description, progress)
        for p, (_, _, consumers) in enumerate(passes):
            merge_parts(consumers, [result[p] for result in results])

    def profile(self, n_items: int, *, model=None, latent, latent_is_input: bool, view,
                batch_size: int, dtype, cast, progress,
                compare: tuple = ((), (), False), blocks: list | tuple = (),
                winners: list | tuple = (), scores=None, pairs: list | tuple = (),
                shared=None) -> Profile:
        """The profile pass on the cluster: each shard's profile, concatenated in order (the
        layers that hold the latent's or the logits' rows: those that did in every shard).
        The ``blocks``' directions are fitted once, by one worker on the spread items the
        local pass fits them on (their profile part too, in the same batches), and every shard
        of the other items projects on them: the local pass's auxiliaries (the first worker
        compares the layers of ``pairs`` with the blocks' views too: fit_part). Its
        ``pass_seconds`` are the workers' model time, summed as the local pass's are: not the
        wall time, which holds the workers' start, which no later pass pays (it had made
        USING AUTO's exact pass look 190x dearer: docs/ARCHITECTURE.md, "Engines")."""
        if n_items == 0:
            raise DiagQLError("the data set is empty")
        started = time.perf_counter()
        options = {"key": model, "latent": latent, "latent_is_input": latent_is_input,
                   "dtype": cast, "batch_size": batch_size, "view": view, "compare": compare,
                   "winners": list(winners), "shared": shared}
        if scores is not None:  # where the class scores are in the model's output
            options["scores"] = scores
        views = list(blocks)
        if not views:
            shards = self._shards(np.arange(n_items), batch_size)
            parts = self.run([_task(_on_model, task=profile_part, **options)] * len(shards),
                             shards, "profiling the data", progress)
            profile = assemble_profile(parts, latent, latent_is_input, 0.0, view=view,
                                       dtype=dtype)
        else:
            fit, spread, rest = fit_items(views, n_items)
            fits, first = self.run([_task(_on_model, task=fit_part, views=views,
                                          pairs=list(pairs), **options)],
                                   [spread], "fitting the blocks' directions", progress)[0]
            shards = self._shards(rest, batch_size) if len(rest) else []
            task = _task(_on_model, task=projected_part, views=views, fits=fits, **options)
            parts = self.run([task] * len(shards), shards, "profiling the data", progress) \
                if shards else []  # none when the spread items are all of them
            profile = with_blocks([(spread, first), *zip(shards, parts)], n_items, views, fits,
                                  fit, latent, latent_is_input, view=view, dtype=dtype)
            parts = [first, *parts]
        return dataclasses.replace(profile, seconds=time.perf_counter() - started,
                                   **pass_clock.merged(parts))

    def _shards(self, items: np.ndarray, batch_size: int) -> list[np.ndarray]:
        return shard_items(items, batch_size, len(self.start()) * SHARDS_PER_WORKER)

    def run(self, tasks: list, shards: list[np.ndarray], description: str, progress) -> list:
        """Each task run on its shard by some worker; the results in shard order. A shard
        whose worker died runs again (its result is taken once: a failed attempt returns
        none); Ctrl-C cancels what is still running and leaves nothing half merged."""
        from ray import cloudpickle
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        self.start()  # a pass's first task may come before any shard is cut (the blocks' fit)
        ray = self._ray
        tasks = [cloudpickle.dumps(task) for task in tasks]
        self.traffic["tasks"] += sum(len(task) for task in tasks)
        actors = self._actors
        self._passes += 1
        pass_id = self._passes
        results: list = [None] * len(shards)
        finished = [False] * len(shards)
        attempts = [0] * len(shards)
        pending = collections.deque(range(len(shards)))
        flying: dict = {}  # ObjectRef -> (shard, actor)
        load = [0] * len(actors)
        total = sum(len(s) for s in shards)
        tally = self._tally if progress.enabled else None  # nobody to show it to: no reports
        with progress.task(description, total) as advance:
            shown = 0
            try:
                while pending or flying:
                    for a, actor in enumerate(actors):
                        while load[a] < IN_FLIGHT and pending:
                            s = pending.popleft()
                            blocks = None if self._blocks is None else \
                                self._blocks.overlapping(int(shards[s][0]), int(shards[s][-1]) + 1)
                            ref = actor.run.remote(tasks[s], shards[s], tally, (pass_id, s),
                                                   attempts[s], blocks)
                            flying[ref] = (s, a, actor)
                            load[a] += 1
                    ready, _ = ray.wait(list(flying), num_returns=1, timeout=POLL_SECONDS)
                    for ref in ready:
                        s, a, actor = flying.pop(ref)
                        load[a] -= 1
                        try:
                            value = ray.get(ref)
                            self.traffic["results"] += len(value)
                            value = cloudpickle.loads(value)
                        except (RayActorError, WorkerCrashedError) as exc:
                            if getattr(exc, "actor_init_failed", False):
                                # Not a death: the worker cannot be made (the model's module
                                # is not importable there); a new one would fail alike.
                                raise ExecutionError(_init_failure(exc)) from None
                            attempts[s] += 1
                            self.retried += 1
                            if attempts[s] > RETRIES:
                                raise ExecutionError(
                                    f"a Ray worker died {attempts[s]} times running "
                                    f"{_items_text(shards[s])}: {_first_line(exc)}") from None
                            if actors[a] is actor:  # its other shards fail too: replace it once
                                actors[a] = self._new_worker()
                            pending.appendleft(s)
                            continue
                        except RayTaskError as exc:
                            raise exc.as_instanceof_cause() from None
                        if isinstance(value, DiagQLError):
                            raise value
                        results[s], finished[s] = value, True
                    counts = {} if tally is None else ray.get(tally.counts.remote(pass_id))
                    done = sum(len(shards[s]) if finished[s] else counts.get(s, 0)
                               for s in range(len(shards)))
                    if done > shown:
                        advance(done - shown)
                        shown = done
            except BaseException:
                for ref in flying:
                    ray.cancel(ref)  # queued ones never start; running ones stop at a batch
                raise
            finally:
                if tally is not None:
                    tally.forget.remote(pass_id)
        return results


def _compare_reads(ray, actor, driver: dict) -> None:
    """Warn where the first worker's code reads other values of the user's globals than the
    driver's (ray_workers.other_reads); a worker that failed to build says so at its task."""
    try:
        theirs = ray.get(actor.read_globals.remote())
    except Exception:  # noqa: BLE001 - a worker that died building: its task says why
        return
    notice = None if theirs is None else other_reads(driver, theirs)
    if notice:
        warn(notice)


def _count(ray, kind: str, total: int, engine: RayEngine) -> int:
    """How many workers ``engine`` starts: its ``workers``, else one per free CPU (GPU).
    A dropped connection's workers are collected; it waits only while workers that this
    process killed free theirs (it had waited 10 s whatever held them)."""
    free = free_for(ray, kind, engine.workers or total, but=engine)
    count = engine.workers or free
    if count < 1 or count > free:
        # An actor that no node can place would wait for ever: say so instead.
        raise DiagQLError(too_few(ray, kind, total, free, max(count, 1), but=engine))
    return count


def _task(function, **options):
    import functools

    return functools.partial(function, **options)


def _on_model(models: dict, source, items: np.ndarray, *, task, key, **options):
    """``task`` (a one-model task) on the worker's model ``key``."""
    return task(models[key], source, items, **options)


class ModelEngine:
    """A RayEngine bound to one model of the connection (``key``: its name on the workers,
    None for a connection's one model): what that model's Runner and Artifacts use."""

    def __init__(self, cluster: RayEngine, key):
        self.cluster, self.key = cluster, key

    def profile(self, n_items: int, **options) -> Profile:
        return self.cluster.profile(n_items, model=self.key, **options)

    def device_type(self) -> str:
        return self.cluster.device_type()


def _init_failure(exc: BaseException) -> str:
    """What made a worker fail to start, from Ray's report (its last 'SomethingError: ...'
    line, without terminal colours), and what to do about it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    causes = re.findall(r"^\s*(\w+(?:Error|Exception): .+)$", text, flags=re.M)
    cause = causes[-1].strip() if causes else _first_line(exc)
    return (f"a Ray worker could not be started: {cause}; the workers must import the model's "
            f"and the data's code: put their module on every node's path (Ray's runtime_env "
            f"py_modules or working_dir), or connect factories that build them there")


def _items_text(items) -> str:
    """'items 0..1,999', or where they are not consecutive (the profile's items spread over
    the data) '2,000 items spread over 0..49,999' (sweep SY9: a range had pointed at none)."""
    first, last = int(min(items)), int(max(items))
    if last - first + 1 == len(items):
        return f"items {first:,}..{last:,}"
    return f"{len(items):,} items spread over {first:,}..{last:,}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _discarded_on_failure(ray, actors: list):
    """Ctrl-C (or a refusal) while the first worker builds the model: the workers just made
    are killed, and their CPUs counted as coming free (``killed``), not left holding them
    unrecorded, the next statement refused as if another job held them (sweep PP2)."""
    try:
        yield
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        actors.clear()
        killed()
        raise


def _session(ray) -> tuple:
    """This process's Ray session: its job and the node it joined (a Ray started again after
    ``ray.shutdown()`` numbers its jobs from 1 again, on a node of a new id)."""
    context = ray.get_runtime_context()
    return context.get_job_id(), context.get_node_id()


def _read(ray, data, engine: RayEngine) -> DatasetBlocks:
    """A Ray Dataset's blocks in the object store. Its read tasks take a CPU each: where
    workers hold every one, reading had waited for ever (docs/ARCHITECTURE.md, "Engines")."""
    free = free_for(ray, "CPU", 1, but=engine)
    if free < 1:
        raise DiagQLError(f"reading the Ray Dataset takes a free CPU of the Ray cluster, and "
                          f"{holders(ray, 'CPU', free, but=engine)}; free one and connect again")
    blocks = DatasetBlocks(data)
    killed()  # its read tasks' CPUs, as killed workers', come free soon, not at once
    return blocks
