"""The Ray engine (docs/ARCHITECTURE.md, "Engines"; docs/SCALING.md): the same answers as the
local engine and as plain torch, to 1e-12, for full-data queries, GROUP BY, samples, the
profile, EVALUATE and SIMILARITY, and the same items for TOPK k INPUTS and its index; a worker that dies mid-shard is replaced and its shard counted once;
Ctrl-C cancels the pass and leaves the model and the activation cache as they were.

One local Ray instance (2 CPUs, no dashboard) and one two-worker connection serve every test.
The test process runs torch on one thread, as each Ray worker does: a float32 kernel rounds
differently with the number of threads, and the claim is about merging, not about kernels.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.errors import DiagQLError
from tests import models, ray_models

ray = pytest.importorskip("ray", reason="the Ray engine's tests need ray: "
                                        "pip install 'diagql[ray]'")

BATCH = 64  # 1,797 digits: 29 batches, 8 shards over 2 workers
TOL = 1e-12


@pytest.fixture(scope="module")
def cluster():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started_here:
        ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    weights = folder / "cnn.pt"
    torch.save(models.trained_cnn().state_dict(), weights)
    signal = folder / "die"
    # A factory: the driver and each worker build the model from the same weights.
    factory = functools.partial(ray_models.build, str(weights), str(signal), os.getpid())
    X, y = models.digits()
    conn = diagql.connect(factory, (X, y), batch_size=BATCH, cache_dir=folder / "cache",
                          engine="ray", ray_workers=2, progress=False)
    local = diagql.connect(factory(), (X, y), batch_size=BATCH, cache_dir=False, progress=False)
    assert conn.catalog  # probed here, on the driver, before any signal file exists
    return SimpleNamespace(conn=conn, local=local, model=factory(), X=X, y=y, signal=signal,
                           folder=folder)


def activations(model, X, layer: str) -> np.ndarray:
    """Plain torch: the layer's output per item, flattened, in the engine's batches."""
    module = dict(model.named_modules())[layer]
    rows = []
    handle = module.register_forward_hook(lambda m, i, o: rows.append(o.detach().flatten(1)
                                                                      .clone()))
    with torch.no_grad():
        for start in range(0, len(X), BATCH):
            model(X[start:start + BATCH])
    handle.remove()
    return torch.cat(rows).double().numpy()


def predictions(model, X) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(X[s:s + BATCH]).argmax(1) for s in range(0, len(X), BATCH)]).numpy()


def close(got, want) -> None:
    want = np.asarray(want)
    assert np.shape(got) == want.shape
    if want.size:
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * float(np.max(np.abs(want))))


def same(a, b) -> None:
    """Two Results agree: the same neurons, groups and items, values to 1e-12."""
    assert a.neurons.tolist() == b.neurons.tolist() and a.n_items == b.n_items
    close(a.values, b.values)
    if a.dense is not None:
        close(a.dense, b.dense)
    assert (a.groups is None) == (b.groups is None)
    for key in a.groups or {}:
        same(a.groups[key], b.groups[key])
    if a.baseline is not None:
        same(a.baseline, b.baseline)


def test_a_ray_dataset_is_read_by_the_workers_shard_by_shard(world):
    """A Ray Dataset of dict rows in several blocks: the workers read only the blocks that
    overlap their shards, batched as the local engine batches (X, y). Runs first, on its own
    one-worker connection, before the shared one's workers hold both CPUs (reading the
    dataset takes one)."""
    pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow: pip install 'diagql[ray]'")
    world.conn.engine.close()
    rows = [{"x": x, "y": int(label)} for x, label in zip(world.X.numpy(), world.y.numpy())]
    # A first block of 2 rows: the catalog's probe had failed on its third item.
    dataset = ray.data.from_items(rows[:2]).union(
        ray.data.from_items(rows[2:], override_num_blocks=4))
    conn = diagql.connect(world.conn.model, dataset, batch_size=BATCH, cache_dir=False,
                          engine="ray", ray_workers=1, progress=False)
    assert len(conn.source) == len(world.X)
    for field in ("labels", "predictions", "confidence", "latents"):
        assert np.array_equal(getattr(conn.profile, field), getattr(world.local.profile, field))
    statement = "TOPK 5 NEURONS IN net.6 WHERE incorrect USING SAMPLE random(0.2) WITH BASELINE"
    same(conn.query(statement), world.local.query(statement))
    # Top inputs had failed on their previews, read on the driver, which holds 3 rows.
    top = conn.query("TOPK 4 INPUTS FOR net.6[3]")
    scores = activations(world.model, world.X, "net.6")[:, 3]
    assert top.items.tolist() == np.lexsort((np.arange(len(scores)), -scores))[:4].tolist()
    conn.engine.close()
    with pytest.raises(DiagQLError, match="Ray Dataset is read by Ray's workers"):
        diagql.connect(world.conn.model, dataset)


def test_a_ray_dataset_of_sequences_of_other_lengths_in_each_block_is_refused_in_words(world):
    """Rows padded within each block but not across them: numpy's "all the input array
    dimensions except for the concatenation axis must match exactly", with its traceback."""
    pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow: pip install 'diagql[ray]'")
    world.conn.engine.close()
    rows = [{"input_ids": np.arange(1 + i // 2), "labels": i % 2} for i in range(4)]
    dataset = ray.data.from_items(rows[:2]).union(ray.data.from_items(rows[2:]))
    with pytest.raises(DiagQLError, match=r"^the Ray Dataset's column 'input_ids' holds rows "
                                          r"of different shapes \(\(1,\), \(2,\)\): "
                                          r"sequences of different lengths must be padded"):
        diagql.connect(world.conn.model, dataset, engine="ray", ray_workers=1, cache_dir=False,
                       progress=False)


def test_the_profile_is_the_local_engine_s_and_plain_torch_s(world):
    ray_profile, local = world.conn.profile, world.local.profile
    assert np.array_equal(ray_profile.predictions, predictions(world.model, world.X))
    assert np.array_equal(ray_profile.labels, world.y.numpy())
    for field in ("predictions", "confidence", "latents"):
        assert np.array_equal(getattr(ray_profile, field), getattr(local, field)), field
    # The latent space: the input of the last Linear, i.e. the output of the ReLU before it.
    assert np.array_equal(ray_profile.latents, activations(world.model, world.X, "net.7")
                          .astype(np.float32))
    # Exact answers from the profile: each shard compared the candidate layers with its latent
    # and logits; a layer holds them when it did in every shard, as the local pass finds.
    assert ray_profile.latent_views == local.latent_views and len(local.latent_views) >= 1
    assert ray_profile.logit_views == local.logit_views
    logits = world.model(world.X).detach().numpy()
    assert np.array_equal(ray_profile.logits, local.logits)
    assert np.allclose(ray_profile.logits, logits, rtol=1e-5, atol=1e-6)
    # Its cache key names the device the workers ran it on, not the driver's.
    engine, artifacts = world.conn.engine, world.conn.current.artifacts
    local_key = diagql.connect(world.model, (world.X, world.y), cache_dir=world.folder,
                               progress=False).current.artifacts.profile_key()
    assert artifacts.profile_key() == local_key is not None
    engine._device_type = "cuda"  # as on a cluster with GPUs, the driver on the CPU
    try:
        assert artifacts.profile_key() != local_key
    finally:
        engine._device_type = "cpu"


def test_auto_weighs_the_pass_without_the_workers_start(world, monkeypatch):
    """USING AUTO weighs an exact pass by the profile pass's model time: on Ray that time had
    held the workers' start (import torch, build the model: ~10 s here, beside a pass of
    0.1 s), so AUTO sampled where the local engine answers exactly. Runs before any test
    draws a maxmargin sample: a drawn one is weighed at no cost."""
    from diagql.samplers.maxmargin import MaxMarginSampler

    # A draw of 2 s: far dearer than a pass over the digits, far cheaper than a worker's start.
    monkeypatch.setattr(MaxMarginSampler, "draw_seconds", lambda self, n, k, d, kept=False: 2.0)
    statement = "AVG NEURONS IN net.4 WHERE correct USING AUTO"
    want = world.local.query(statement)
    assert not want.approximate, want.provenance.choice
    got = world.conn.query(statement)
    assert not got.approximate, got.provenance.choice
    assert "costs less than drawing a maxmargin" in got.provenance.choice
    assert "the Ray workers' start not counted" in got.provenance.choice
    same(got, want)
    correct = predictions(world.model, world.X) == world.y.numpy()
    close(got.values, activations(world.model, world.X, "net.4")[correct].mean(axis=0))


def test_a_ray_dataset_while_workers_hold_every_cpu_is_refused_not_waited_for(world, cluster):
    """Reading a Ray Dataset takes a CPU per read task: with another connection's workers
    holding both, connect had waited for ever."""
    import faulthandler
    import time

    pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow: pip install 'diagql[ray]'")
    from diagql.engine.ray_workers import FREEING_SECONDS

    world.conn.engine.start()
    deadline = time.monotonic() + 60
    while cluster.available_resources().get("CPU", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the workers' CPUs are taken as Ray places them
    assert cluster.available_resources().get("CPU", 0) == 0
    rows = [{"x": x, "y": int(label)} for x, label in zip(world.X[:100].numpy(),
                                                           world.y[:100].numpy())]
    dataset = ray.data.from_items(rows, override_num_blocks=2)
    faulthandler.dump_traceback_later(120, exit=True)  # the old hang: end the run, loudly
    started = time.monotonic()
    try:
        with pytest.raises(DiagQLError, match=r"^reading the Ray Dataset takes a free CPU of "
                                              r"the Ray cluster, and 0 of its 2 CPUs are free: "
                                              r"2 held by the workers of 1 other open "
                                              r"connection of this process \(conn\.close\(\)"):
            diagql.connect(world.conn.model, dataset, batch_size=BATCH, cache_dir=False,
                           engine="ray", ray_workers=1, progress=False)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert time.monotonic() - started < FREEING_SECONDS


def test_too_many_workers_are_refused_at_once_saying_what_holds_the_cpus(world, cluster,
                                                                         monkeypatch):
    """The refusal had waited 10 s for CPUs whatever held them, then blamed "other
    connections' workers", also where the cluster was merely smaller than asked for. It waits
    only while workers this process killed may still be freeing theirs."""
    import time

    from diagql.engine import ray_workers

    monkeypatch.setattr(ray_workers, "_KILLED", [float("-inf")])  # none killed lately
    world.conn.engine.start()  # the shared connection's 2 workers hold both CPUs
    X, y = world.X[:100], world.y[:100]
    for workers, message in (
            (3, r"^the Ray cluster has 2 CPUs in all, too few for 3 workers \(one CPU each\): "
                r"connect with ray_workers=2 or fewer \(on the command line, --ray-workers 2\)$"),
            (1, r"^the Ray cluster has too few free CPUs for 1 worker \(one CPU each\): 0 of "
                r"its 2 CPUs are free: 2 held by the workers of 1 other open connection of "
                r"this process \(conn\.close\(\), or a with block, hands them back\); free "
                r"some and run the statement again$")):
        conn = diagql.connect(world.conn.model, (X, y), batch_size=BATCH, cache_dir=False,
                              engine="ray", ray_workers=workers, progress=False)
        started = time.monotonic()
        with pytest.raises(DiagQLError, match=message):
            conn.query("AVG NEURONS IN net.6 USING FULL")
        assert time.monotonic() - started < 3  # the profile's pass refused before any wait
        conn.close()


def test_full_data_queries_equal_plain_torch_and_the_local_engine(world):
    conn, X = world.conn, world.X
    labels, wrong = world.y.numpy(), predictions(world.model, X) != world.y.numpy()
    before = dict(conn.counters)

    avg = conn.query("AVG NEURONS IN net.6")
    close(avg.values, activations(world.model, X, "net.6").mean(axis=0))

    grouped = conn.query("TOPK 5 NEURONS IN net.2 GROUP BY class")
    acts = activations(world.model, X, "net.2")
    for c in range(10):
        mean = acts[labels == c].mean(axis=0)
        assert grouped.groups[c].neurons.tolist() == np.argsort(-mean, kind="stable")[:5].tolist()
        close(grouped.groups[c].values, mean[grouped.groups[c].neurons])

    argmax = conn.query("ARGMAX NEURONS IN net.7 WHERE incorrect")
    winners = activations(world.model, X, "net.7")[wrong].argmax(axis=1)
    assert np.array_equal(argmax.values, np.bincount(winners, minlength=32) / wrong.sum())
    # net.7's rows are the profile's latents (the profile pass found so on every shard): no pass.
    assert conn.counters["items"] - before["items"] == 2 * len(X)

    for query in ("AVG NEURONS IN net.6", "TOPK 5 NEURONS IN net.2 GROUP BY class",
                  "ARGMAX NEURONS IN net.7 WHERE incorrect", "TOPK 3 NEURONS IN net.0 BY MAX"):
        same(conn.query(query), world.local.query(query))


def test_a_sample_query_sends_only_its_items_and_answers_as_the_local_engine(world):
    conn = world.conn
    statement = "TOPK 5 NEURONS IN net.4 WHERE class = 3 USING SAMPLE random(0.2) WITH BASELINE"
    sample = conn.sample("random(0.2)")
    assert np.array_equal(sample, world.local.sample("random(0.2)"))  # drawn on the driver
    threes = sample[world.y.numpy()[sample] == 3]
    before = dict(conn.counters)
    got = conn.query(statement)
    # The sampled threes, then the baseline's every three: nothing else reaches the model.
    assert conn.counters["items"] - before["items"] == len(threes) + (world.y == 3).sum()
    # The model-assisted estimate: each shard's Reducer part carries its items' covariate rows.
    same(got, world.local.query(statement))
    conn.settings.estimator = "plain"  # the sample's own mean, against plain torch
    try:
        plain = conn.query(statement)
    finally:
        conn.settings.estimator = "assisted"
    acts = activations(world.model, world.X, "net.4")
    close(plain.dense, acts[threes].mean(axis=0))


def test_a_sample_whose_variance_takes_some_rows_has_the_local_intervals(world, monkeypatch):
    """With fewer fit rows than sampled items (engine/prediction.py: fit_rows), a shard holds
    its fit rows until they are summed, at the latest when its state is pickled back to the
    driver: the cluster's answer and intervals are the local engine's."""
    from diagql.engine import prediction

    monkeypatch.setattr(prediction, "FIT_ROWS", 40)
    monkeypatch.setattr(prediction, "FIT_FLOOR", 10)
    statement = "AVG NEURONS IN net.4 GROUP BY correct USING SAMPLE random(0.5, random_state=4)"
    world.conn.activations.clear()
    before = world.conn.counters["items"]
    got, want = world.conn.query(statement), world.local.query(statement)
    # Most through the cluster (earlier tests left a few of net.4's rows in the disk cache).
    assert world.conn.counters["items"] - before > want.n_items // 2
    same(got, want)
    for key, group in want.groups.items():
        np.testing.assert_allclose(got.groups[key].estimate.ci_high, group.estimate.ci_high,
                                   rtol=1e-9)


def test_a_script_s_queries_share_one_pass_on_the_cluster(world):
    script = ("AVG NEURONS IN net.6 GROUP BY correct; TOPK 4 NEURONS IN net.2 USING SAMPLE "
              "stratified(0.1); ARGMAX NEURONS IN net.7 WHERE predicted = 1")
    before = world.conn.counters["passes"]
    got = world.conn.execute(script)
    assert world.conn.counters["passes"] == before + 1
    for a, b in zip(got, world.local.execute(script)):
        same(a, b)


def test_a_grouped_assisted_sample_answers_as_the_local_engine(world):
    """GROUP BY's codes and the covariates travel in each shard's Reducer part."""
    statement = "AVG NEURONS IN net.2 GROUP BY class USING SAMPLE random(0.2)"
    same(world.conn.query(statement), world.local.query(statement))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Plain numpy: ‖XcᵀYc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F)."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_similarity_s_pass_runs_on_the_workers_and_equals_plain_cka(world):
    """The feeds of a shard share one part of the CKA reducer: moments merged by Chan's
    update (GROUP BY), or rows concatenated in shard order (a narrow WHERE)."""
    conn, X = world.conn, world.X
    acts = {layer: activations(world.model, X, layer) for layer in ("net.0", "net.2", "net.6")}
    correct = predictions(world.model, X) == world.y.numpy()
    threes = world.y.numpy() == 3
    for statement in ("SIMILARITY net.2, net.6 GROUP BY correct",
                      "SIMILARITY net.0, net.2, net.6 WHERE class = 3"):
        sent = conn.engine.traffic["tasks"]
        got, want = conn.query(statement), world.local.query(statement)
        assert conn.engine.traffic["tasks"] > sent  # the pass went to the workers
        for a, b in zip([got, *(got.groups or {}).values()],
                        [want, *(want.groups or {}).values()]):
            assert a.n_items == b.n_items
            if a.matrix is not None:
                close(a.matrix, b.matrix)
    grouped = conn.query("SIMILARITY net.2, net.6 GROUP BY correct")
    for key, mask in ((True, correct), (False, ~correct)):
        close(grouped.groups[key].value, linear_cka(acts["net.2"][mask], acts["net.6"][mask]))
    narrow = conn.query("SIMILARITY net.0, net.2, net.6 WHERE class = 3").matrix
    for i, a in enumerate(("net.0", "net.2", "net.6")):
        for j, b in enumerate(("net.0", "net.2", "net.6")):
            if i != j:
                close(narrow[i, j], linear_cka(acts[a][threes], acts[b][threes]))


def test_top_inputs_and_the_inputs_index_are_built_on_the_workers(world):
    """A ReLU's zeros tie across shards: merged, they still go to the lowest item indices,
    and the index (lists, values, codes) is the local engine's, bit for bit."""
    from diagql.session import inputs

    conn, X = world.conn, world.X
    acts = activations(world.model, X, "net.7")
    zeros = (acts == 0).sum(axis=0)
    # A dead unit (every item ties) and one that is zero for about half of the items.
    dead, half = int(zeros.argmax()), int(np.abs(zeros - len(X) / 2).argmin())
    assert zeros[dead] > len(X) / 2 and 0 < zeros[half] < len(X)
    order = np.arange(len(X))
    threes = np.flatnonzero(world.y.numpy() == 3)
    passes = []
    for neuron in (dead, half):
        scores = acts[:, neuron]
        for statement, want in (
                (f"BOTTOMK 5 INPUTS FOR net.7[{neuron}]", np.lexsort((order, scores))[:5]),
                # k past the index's lists: the codes choose the items to read, on the workers
                (f"TOPK 150 INPUTS FOR net.7[{neuron}] WHERE class = 3",
                 threes[np.lexsort((threes, -scores[threes]))[:150]])):
            sent, read = conn.engine.traffic["tasks"], conn.counters["items"]
            got = conn.query(statement)
            # Every item read went through the workers' models, none through the driver's.
            passes.append((conn.counters["items"] > read, conn.engine.traffic["tasks"] > sent))
            assert got.items.tolist() == want.tolist()
            close(got.values, scores[want])
            assert got.items.tolist() == world.local.query(statement).items.tolist()
    # The first pass built the index; the second neuron's bottom 5 are in its lists.
    assert passes == [(True, True), (True, True), (False, False), (True, True)]
    built, local = (next(iter(inputs._MEMORY[c.current].values())) for c in (conn, world.local))
    for name, array in built.to_arrays().items():
        assert np.array_equal(array, local.to_arrays()[name]), name


def test_evaluate_scores_as_the_local_engine_does(world):
    statement = "EVALUATE SAMPLERS random, stratified AT 0.1 K 3 LAYERS net.2, net.6 SEEDS 2"
    got, want = world.conn.query(statement), world.local.query(statement)
    assert [row[:4] for row in got.rows] == [row[:4] for row in want.rows]
    close(np.array([row[4:-1] for row in got.rows]), np.array([row[4:-1] for row in want.rows]))


def test_a_worker_that_dies_mid_shard_is_replaced_and_its_shard_counted_once(world):
    conn, X = world.conn, world.X
    recorded = []

    class Recorder:
        enabled = True  # the workers report progress to the driver's one bar

        def task(self, description, total):
            recorded.append([description, total, 0])
            return _Advance(recorded[-1])

    conn.profile  # noqa: B018 - made first: alone, this test's query had made it, a 2nd bar
    retried = conn.engine.retried
    world.signal.write_text("")
    conn.progress = Recorder()
    try:
        got = conn.query("AVG NEURONS IN net.6 GROUP BY predicted")
    finally:
        conn.progress = world.local.progress
    assert not world.signal.exists()  # a worker took it, and died
    assert conn.engine.retried > retried  # its shard (and any queued behind it) ran again
    acts, predicted = activations(world.model, X, "net.6"), predictions(world.model, X)
    for c in range(10):
        close(got.groups[c].values, acts[predicted == c].mean(axis=0))
        assert got.groups[c].n_items == (predicted == c).sum()
    assert recorded == [[recorded[0][0], len(X), len(X)]]  # the bar: every item, once


class _Advance:
    def __init__(self, record):
        self.record = record

    def __enter__(self):
        def advance(n):
            self.record[2] += n
            assert self.record[2] <= self.record[1]
        return advance

    def __exit__(self, *exc):
        return False


def test_ctrl_c_cancels_the_pass_and_leaves_model_and_cache_as_they_were(world):
    conn = world.conn

    class Interrupt:
        enabled = False

        def task(self, description, total):
            return _Raising()

    statement = "AVG NEURONS IN net.4 USING SAMPLE random(0.3, random_state=5)"
    conn.sample("random(0.3, random_state=5)")  # the profile, before the pass to interrupt
    held = conn.activations.held(conn.plan(statement).bound.view, np.arange(len(world.X)))
    entries = sorted((e.kind, e.key) for e in conn.cache.entries())
    counters = dict(conn.counters)
    conn.progress = Interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            conn.query(statement)
    finally:
        conn.progress = world.local.progress
    assert conn.counters == counters
    assert conn.activations.held(conn.plan(statement).bound.view,
                                 np.arange(len(world.X))) == held
    assert sorted((e.kind, e.key) for e in conn.cache.entries()) == entries
    assert not any(m._forward_hooks for m in conn.model.modules()) and not conn.model.training
    # Nothing of the cancelled pass is merged into the next one.
    same(conn.query(statement), world.local.query(statement))


class _Raising:
    def __enter__(self):
        def advance(n):
            raise KeyboardInterrupt
        return advance

    def __exit__(self, *exc):
        return False


def test_ctrl_c_while_the_workers_start_kills_them_and_the_next_statement_runs(
        world, monkeypatch):
    """Ctrl-C while the first worker built the model left the workers holding both CPUs,
    unrecorded: the next statement (or a new connection) was refused for CPUs 'held by other
    Ray jobs' (sweep PP2). The workers an interrupted start made are killed."""
    from diagql.engine import ray_engine

    world.conn.engine.close()  # hands the shared workers back: this connection needs both CPUs
    conn = diagql.connect(world.conn.engine.model, (world.X, world.y), batch_size=BATCH,
                          engine="ray", ray_workers=2, cache_dir=False, progress=False)
    made = []
    real = ray_engine._compare_reads

    def interrupted(ray, actor, reads):
        made.append(actor)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_engine, "_compare_reads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conn.query("AVG NEURONS IN net.4")
    assert made and conn.engine.actors_held() == []
    monkeypatch.setattr(ray_engine, "_compare_reads", real)
    same(conn.query("AVG NEURONS IN net.4"), world.local.query("AVG NEURONS IN net.4"))
    conn.engine.close()


def test_a_model_a_worker_cannot_build_is_one_error_not_a_retried_death(world):
    world.conn.engine.close()  # hands the shared workers back: this connection needs a CPU
    conn = diagql.connect(functools.partial(ray_models.built_only_in, os.getpid()),
                          (world.X, world.y), engine="ray", ray_workers=1, cache_dir=False,
                          progress=False)
    with pytest.raises(DiagQLError, match="building the model and the data on a Ray worker "
                                          "failed: FileNotFoundError: no weights on this node"):
        conn.query("AVG NEURONS IN 6")
    assert conn.engine.retried == 0
    conn.engine.close()


def test_a_factory_that_builds_other_weights_on_a_worker_is_refused(world):
    """A model class given as its own factory initialises its weights at random in every
    process: each worker answered for a model of its own, the driver's profile for another,
    silently (an AVG over two workers mixed two models)."""
    world.conn.engine.close()  # hands the shared workers back: this connection needs a CPU
    conn = diagql.connect(models.MLP, (world.X, world.y), engine="ray", ray_workers=1,
                          cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=r"^the model factory tests\.models\.MLP built other "
                                          r"weights on a Ray worker than on the driver: .*"
                                          r"torch\.manual_seed\(0\)"):
        conn.query("AVG NEURONS IN encoder.3")
    assert conn.engine.retried == 0
    conn.close()


def test_a_worker_s_weights_are_compared_with_each_factory_built_model_s():
    """Of several models, the one whose factory is not deterministic is named; a seeded
    factory's and a module's (pickled to the workers as it is) are not blamed."""
    from diagql.engine.ray_workers import built_models, other_weights, weights_digests

    # "fresh" first: built after the seeded one, it would draw from the seed's sequence.
    given = {"fresh": models.MLP, "seeded": functools.partial(models.build_mlp, 3),
             "module": models.MLP()}
    driver = weights_digests(given, built_models(given))
    assert set(driver) == {"seeded", "fresh"}
    error = other_weights(given, built_models(given), driver)
    assert "tests.models.MLP (model 'fresh') built other weights" in error.message
    same_weights = {name: given[name] for name in ("seeded", "module")}
    driver = weights_digests(same_weights, built_models(same_weights))
    assert other_weights(same_weights, built_models(same_weights), driver) is None


def test_a_data_factory_that_gives_a_worker_other_items_is_refused(world):
    """A validation split made by random_split without a generator gives every process other
    items: each worker answered for its own split, the driver's catalog for another,
    silently. A seeded split answers as the local engine does on the same split."""
    world.conn.engine.close()  # hands the shared workers back: this connection needs a CPU
    model = models.build_cnn()
    for seeded in (False, True):
        data = functools.partial(ray_models.split_per_process, world.X, world.y, seeded)
        conn = diagql.connect(model, data, engine="ray", ray_workers=1, cache_dir=False,
                              progress=False)
        try:
            if not seeded:
                with pytest.raises(DiagQLError, match=r"^the data factory .*split_per_process"
                                                      r"\(<Tensor>, <Tensor>, False\) gave a "
                                                      r"Ray worker other data than the "
                                                      r"driver \(other items at the same "
                                                      r"places\)"):
                    conn.query("AVG NEURONS IN 1")
                continue
            local = diagql.connect(model, data(), cache_dir=False, progress=False)
            np.testing.assert_allclose(conn.query("AVG NEURONS IN 1").values,
                                       local.query("AVG NEURONS IN 1").values, atol=1e-12)
        finally:
            conn.close()


def test_a_model_whose_module_the_workers_cannot_import_is_one_error(world, tmp_path,
                                                                    monkeypatch):
    """Its class's module is on the driver's path only (the usual mistake on a cluster): it
    had been retried as 4 deaths, the cause (ModuleNotFoundError) nowhere in the message."""
    world.conn.engine.close()  # hands the shared workers back: this connection needs a CPU
    (tmp_path / "driver_only_models.py").write_text(
        "import torch\n\nclass Net(torch.nn.Sequential):\n    def __init__(self):\n"
        "        super().__init__(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import driver_only_models

    conn = diagql.connect(driver_only_models.Net(), (world.X, world.y), engine="ray",
                          ray_workers=1, cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="a Ray worker could not be started: "
                                          "ModuleNotFoundError: No module named "
                                          "'driver_only_models'"):
        conn.query("AVG NEURONS IN 1")
    assert conn.engine.retried == 0
    conn.engine.close()


def test_similarity_across_two_models_runs_both_on_every_worker(world):
    """Several models: every worker builds each from its factory, and SIMILARITY's one pass
    sends each batch of a shard through both, their feeds sharing the shard's CKA part."""
    world.conn.engine.close()  # hands the shared workers back: this connection needs a CPU
    factories = {"a": functools.partial(ray_models.build, str(world.folder / "cnn.pt"),
                                        str(world.signal), os.getpid()),
                 "b": functools.partial(models.build_cnn, 1)}
    conn = diagql.connect(factories, (world.X, world.y), batch_size=BATCH, cache_dir=False,
                          engine="ray", ray_workers=1, progress=False)
    local = diagql.connect({name: f() for name, f in factories.items()}, (world.X, world.y),
                           batch_size=BATCH, cache_dir=False, progress=False)
    try:
        statement = "SIMILARITY a.net.2, b.2 WHERE class = 3"
        assert conn.current.profile is not None  # its pass, before SIMILARITY's
        sent = conn.engine.traffic["tasks"]
        got = conn.query(statement)
        assert conn.engine.traffic["tasks"] > sent  # SIMILARITY's pass went to the workers
        assert got.labels == ["a.net.2", "b.2"]
        close(got.matrix, local.query(statement).matrix)
        threes = world.y.numpy() == 3
        close(got.value, linear_cka(activations(world.model, world.X, "net.2")[threes],
                                    activations(models.build_cnn(1), world.X, "2")[threes]))
        # Each model's own pass and profile run there too.
        same(conn.query("AVG NEURONS IN b.6 WHERE incorrect"),
             local.query("AVG NEURONS IN b.6 WHERE incorrect"))
    finally:
        conn.engine.close()


def test_an_address_the_running_ray_is_not_is_warned_of(cluster):
    """It was ignored without a word: the process's Ray instance answered instead."""
    from diagql.engine.ray_engine import start_ray

    with pytest.warns(diagql.DiagQLWarning, match="ray_address '10.255.255.1:6379' is ignored"):
        start_ray("10.255.255.1:6379")


def test_an_ignored_address_is_warned_of_once_per_connection(world):
    """A connection's first pass had warned twice (its workers' device, then their start),
    each time at a line of DiagQL's; once now, at the user's line."""
    import warnings

    world.conn.engine.close()  # hands the shared workers back: this connection needs a CPU
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with diagql.connect(model, (X, y), engine="ray", ray_workers=1, cache_dir=False,
                            progress=False, ray_address="10.255.255.1:6379") as conn:
            got = conn.query("AVG NEURONS IN 1 USING FULL").values
            conn.query("AVG NEURONS IN 2 USING FULL")
    ignored = [w for w in seen if "ray_address '10.255.255.1:6379' is ignored" in str(w.message)]
    assert len(ignored) == 1 and ignored[0].filename == __file__
    with torch.no_grad():
        close(got, model[:2](X).double().mean(0).numpy())


def test_engine_options_are_checked():
    with pytest.raises(DiagQLError, match="unknown engine 'rya'.*did you mean 'ray'"):
        diagql.connect(models.build_cnn(), models.digits(), engine="rya")
    with pytest.raises(DiagQLError, match="need engine=\"ray\""):
        diagql.connect(models.build_cnn(), models.digits(), ray_address="auto")
    with pytest.raises(DiagQLError, match="positive number of workers"):
        diagql.connect(models.build_cnn(), models.digits(), engine="ray", ray_workers=0)
    # Checkpoints take turns in one copy of the model on the driver: the local engine's.
    with pytest.raises(DiagQLError, match='engine="ray" runs no checkpoints'):
        diagql.connect(models.build_cnn(), models.digits(), engine="ray",
                       checkpoints={"epoch1": models.build_cnn(1).state_dict()})


def test_the_command_line_runs_a_query_on_the_cluster(world, capsys, tmp_path):
    """``--engine ray``: the workers build the models and the data from the --model, --weights
    and --data specs themselves (two named models: each worker builds both). Runs last: it
    hands the shared connection's workers back."""
    import json

    from diagql.shell.cli import main

    world.conn.engine.close()
    torch.save(models.trained_mlp().state_dict(), tmp_path / "mlp.pt")
    code = main(["--model", "mlp=tests.models:build_mlp", "--model", "cnn=tests.models:build_cnn",
                 "--weights", f"mlp={tmp_path / 'mlp.pt'}", "--data", "tests.models:digits",
                 "--engine", "ray", "--ray-workers", "1", "--batch-size", str(BATCH),
                 "--no-cache", "--no-progress", "--format", "json",
                 "-e", "AVG NEURONS IN mlp.encoder.3 WHERE class = 2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    values = json.loads(out.out)["values"]
    acts = activations(models.trained_mlp(), world.X, "encoder.3")
    close(np.array(values), acts[world.y.numpy() == 2].mean(axis=0))



def test_a_ray_profile_finds_the_layers_equal_to_a_blocks_view_as_the_local_pass(world):
    """The worker that fits the blocks' directions compares the layers with their views too
    (model/view_aliases.py): a global pooling and its Flatten equal conv 2's channel means."""
    from diagql.model.view_aliases import Alias

    world.conn.engine.close()  # its workers hold both CPUs; they are made again when needed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(),
                          nn.Linear(16, 10)).eval()
    conn = diagql.connect(model, (world.X, world.y), batch_size=BATCH, cache_dir=False,
                          engine="ray", ray_workers=1, progress=False)
    local = diagql.connect(model, (world.X, world.y), batch_size=BATCH, cache_dir=False,
                           progress=False)
    try:
        want = {'["3"]': Alias('["2"]', 8), '["4"]': Alias('["2"]', 8)}
        assert local.profile.auxiliaries.aliases == want
        assert conn.profile.auxiliaries.aliases == want
        statement = "AVG NEURONS IN 3 WHERE class = 2 USING SAMPLE random(0.2, random_state=1)"
        got, expected = conn.query(statement), local.query(statement)
        np.testing.assert_allclose(got.values, expected.values, rtol=1e-9, atol=1e-12)
        truth = activations(model, world.X, "3")[world.y.numpy() == 2].mean(axis=0)
        assert np.abs(np.asarray(got.values) - truth[got.neurons]).max() < 0.05
    finally:
        conn.engine.close()


def test_a_ray_profile_keeps_the_local_pass_s_block_auxiliaries(world):
    """The blocks' directions are fitted once, on the items the local pass fits them on (FIT
    of them spread over the data: not a multiple of the batch, fewer than the items), and
    every shard of the others projects on them: the local profile's auxiliaries, checked
    against plain torch and numpy; so a sample query on a block answers as the local engine."""
    from diagql.model import auxiliaries

    world.conn.engine.close()  # its workers hold both CPUs; they are made again when needed
    model, fit = models.trained_cnn(), 300  # a Sequential: its blocks are 0, 2 and 6
    with pytest.MonkeyPatch.context() as patch:  # the driver's count is the workers' too
        patch.setattr(auxiliaries, "FIT_ITEMS", fit)
        conn = diagql.connect(model, (world.X, world.y), batch_size=BATCH,
                              cache_dir=world.folder / "blocks", engine="ray", ray_workers=1,
                              progress=False)  # 4 shards
        local = diagql.connect(model, (world.X, world.y), batch_size=BATCH, cache_dir=False,
                               progress=False)
        ray_aux = {a.key: a for a in conn.profile.auxiliaries}
        local_aux = {a.key: a for a in local.profile.auxiliaries}
    try:
        assert ray_aux.keys() == local_aux.keys() and len(local_aux) == 3
        for key, want in local_aux.items():
            got = ray_aux[key]
            assert (got.layer, got.fitted_on) == (want.layer, fit)
            for field in ("mean", "basis", "z"):
                a, b = getattr(got, field), getattr(want, field)
                assert a.shape == b.shape and a.dtype == b.dtype == np.float32
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(np.abs(b).max()))
            rows = activations(model, world.X, got.layer)
            spread = auxiliaries.spread_items(len(rows), fit)
            assert np.allclose(got.mean, rows[spread].mean(0), rtol=1e-5, atol=1e-6)
            z = (rows - got.mean.astype(np.float64)) @ got.basis.astype(np.float64)
            np.testing.assert_allclose(got.z, z, rtol=0, atol=1e-4 * float(np.abs(z).max()))
            # Every item's winner, in item order across the fit part and the shards.
            winners = conn.profile.winners[key]
            np.testing.assert_array_equal(winners, local.profile.winners[key])
            assert np.mean(winners == rows.argmax(axis=1)) > 0.999  # float32 near-ties
        for layer in sorted({a.layer for a in local_aux.values()}):
            statement = f"AVG NEURONS IN {layer} USING SAMPLE random(0.2, random_state=4)"
            got, want = conn.query(statement), local.query(statement)
            assert got.neurons.tolist() == want.neurons.tolist()
            np.testing.assert_allclose(got.values, want.values, rtol=1e-9,
                                       atol=1e-9 * float(np.abs(want.values).max()))
        # Stored as a local pass's are: a connection over the same cache reads the profile,
        # then each block's auxiliary from its own entry when first asked for it.
        conn.cache.flush()
        reader = diagql.connect(model, (world.X, world.y), batch_size=BATCH,
                                cache_dir=world.folder / "blocks", progress=False)
        profile = reader.profile
        assert reader.cache.by_kind["profile"]["hits"] == 1 and not profile.auxiliaries.held()
        for count, (key, want) in enumerate(ray_aux.items(), start=1):
            got = profile.auxiliary(key)
            assert reader.cache.by_kind["auxiliary"]["hits"] == count
            for field in ("mean", "basis", "z"):
                np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        assert profile.winners.keys() == conn.profile.winners.keys()
        for key, winners in conn.profile.winners.items():
            np.testing.assert_array_equal(profile.winners[key], winners)
    finally:
        conn.engine.close()


def test_a_dropped_connection_frees_its_workers_and_with_closes(world, cluster):
    """A connection dropped without close() (a notebook cell run again) held both CPUs until
    the cycle collector reached it, so the next connection was refused "0 free CPUs"; the
    next one's start now collects. ``with connect(...)`` hands them back at the block's end."""
    import gc
    import time

    world.conn.engine.close()
    X, y = world.X[:120], world.y[:120]

    def once() -> np.ndarray:
        conn = diagql.connect(world.conn.model, (X, y), batch_size=BATCH, cache_dir=False,
                              engine="ray", ray_workers=2, progress=False)
        return conn.query("AVG NEURONS IN net.6 USING FULL").values  # conn dropped here

    gc.disable()  # the collector would free the first connection on its own schedule
    try:
        first, second = once(), once()
    finally:
        gc.enable()
    close(first, activations(world.model, X, "net.6").mean(axis=0))
    close(second, first)
    with diagql.connect(world.conn.model, (X, y), batch_size=BATCH, cache_dir=False,
                        engine="ray", ray_workers=2, progress=False) as conn:
        conn.query("AVG NEURONS IN net.6 USING FULL")
        assert int(cluster.available_resources().get("CPU", 0)) == 0  # both workers held
    deadline = time.monotonic() + 10
    while int(cluster.available_resources().get("CPU", 0)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert int(cluster.available_resources().get("CPU", 0)) == 2


class _WithLock(torch.nn.Module):
    """A model Ray cannot pickle: it holds a lock."""

    def __init__(self):
        super().__init__()
        import threading

        self.fc = torch.nn.Linear(64, 10)
        self.lock = threading.Lock()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_model_ray_cannot_pickle_is_one_clear_error(world):
    """Ray's own TypeError was a hundred lines of its serializability report."""
    world.conn.engine.close()
    conn = diagql.connect(_WithLock(), (world.X[:50], world.y[:50]), cache_dir=False,
                          engine="ray", ray_workers=1, progress=False)
    with pytest.raises(DiagQLError, match=r"^the model cannot be sent to Ray's workers \(cannot "
                                          r"pickle '_thread.lock' object\); pass a factory"):
        conn.query("AVG NEURONS IN fc USING FULL")
    conn.close()


def _small_on_ray(seed: int):
    """An MLP on 60 random items (its seed's), and a one-worker Ray connection to it."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    return model, X, y, diagql.connect(model, (X, y), engine="ray", ray_workers=1,
                                       cache_dir=False, progress=False)


def test_a_model_or_data_changed_in_place_is_refused_not_answered_from_old_copies(cluster):
    """The workers hold copies made when they started: after `weight.mul_(2)` on the driver,
    the next answer had been the old model's (0.8 off), silently."""
    model, X, y, conn = _small_on_ray(14)
    with torch.no_grad():
        want = model[:2](X).double().mean(0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN 1").values, want, rtol=1e-6)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN 1").values, want, rtol=1e-6)
    with torch.no_grad():
        model[0].weight.mul_(2)
    with pytest.raises(DiagQLError, match="the model or the data changed in place since the "
                                          "last statement, but the Ray engine's workers"):
        conn.query("AVG NEURONS IN 1")
    again = diagql.connect(model, (X, y), engine="ray", ray_workers=1, cache_dir=False,
                           progress=False)
    with torch.no_grad():
        want = model[:2](X).double().mean(0).numpy()
    np.testing.assert_allclose(again.query("AVG NEURONS IN 1").values, want, rtol=1e-6)
    X.mul_(3)
    with pytest.raises(DiagQLError, match="changed in place"):
        again.query("AVG NEURONS IN 1")
    conn.close()
    again.close()


def test_a_model_changed_before_any_worker_started_is_followed(cluster):
    """A hook added after connect, before any statement, had been refused as a change 'since
    the last statement', though no worker held a copy yet: they take the model as it is."""
    model, X, y, conn = _small_on_ray(16)
    try:
        assert conn.catalog and not conn.engine.actors_held()
        handle = model[1].register_forward_hook(_ablate_unit_3)
        with pytest.warns(Warning, match="the model changed"):
            got = conn.query("AVG NEURONS IN 1")
        with torch.no_grad():
            want = model[:2](X).double().mean(0).numpy()
        assert want[3] == 0.0
        np.testing.assert_allclose(got.values[np.argsort(got.neurons)], want, atol=1e-7)
        handle.remove()  # now the workers hold their copies: refused, as before
        with pytest.raises(DiagQLError, match="changed in place since the last statement"):
            conn.query("AVG NEURONS IN 1")
    finally:
        conn.close()


def test_data_changed_before_any_worker_started_is_followed(cluster):
    """Inputs scaled and labels rewritten after connect, before any pass, had been refused as
    copies the workers "made when they started", though none had: they take the data as it
    is, and the labels are read again."""
    model, X, y, conn = _small_on_ray(17)
    try:
        assert conn.catalog and not conn.engine.actors_held()
        X.mul_(0.5)
        y.fill_(2)
        with pytest.warns(Warning, match="the data changed"):
            got = conn.query("AVG NEURONS IN 1 WHERE class = 2")
        with torch.no_grad():
            want = model[:2](X).double().mean(0).numpy()
        assert got.n_items == 60
        np.testing.assert_allclose(got.values[np.argsort(got.neurons)], want, atol=1e-7)
    finally:
        conn.close()


def _ablate_unit_3(module, inputs, output):
    return output.index_fill(1, torch.tensor([3]), 0.0)


def test_a_users_early_hook_keeps_its_place_on_a_worker():
    """Torch keys hooks by a counter of each process: an ablation registered early in a
    script (id 2 here) came to a fresh worker under that id, where DiagQL's own hooks, counted
    from 0 there, took the same keys, overwrote it and removed it with theirs (a sweep: the
    ablated unit read 0.08-0.21 instead of 0, silently). The worker's counter now starts past
    every id its models' hooks hold. A fresh worker is played here in this process."""
    from ray import cloudpickle
    from torch.utils.hooks import RemovableHandle

    from diagql.engine.ray_workers import Worker

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    counter = RemovableHandle.next_id
    try:
        RemovableHandle.next_id = 2
        model[1].register_forward_hook(_ablate_unit_3)
        shipped = cloudpickle.loads(cloudpickle.dumps(model))
        RemovableHandle.next_id = 0  # a fresh process's counter
        worker = Worker(shipped, None, None, {})
        built = worker.models[None]
        handles = [built[1].register_forward_hook(lambda *args: None) for _ in range(5)]
        assert _ablate_unit_3 in built[1]._forward_hooks.values()
        for handle in handles:
            handle.remove()
        assert list(built[1]._forward_hooks.values()) == [_ablate_unit_3]
    finally:
        RemovableHandle.next_id = max(counter, RemovableHandle.next_id)


@pytest.mark.parametrize("n, batch_size, shards", [(257, 64, 2), (129, 64, 3), (200, 64, 2),
                                                   (65, 64, 4), (1, 64, 2)])
def test_shards_cut_the_local_passs_batches_a_lone_last_item_included(n, batch_size, shards):
    """Shards cut plain multiples of the batch size, so 257 items in batches of 64 made a
    last batch of one item on a worker where the local pass folds it into the one before:
    other kernels, answers 7e-9 apart, and a forward ending in .squeeze() broken."""
    from diagql.engine.shards import shard_items
    from diagql.model.data import spans

    items = np.arange(n) * 3
    cut = shard_items(items, batch_size, shards)
    assert np.array_equal(np.concatenate(cut), items) and len(cut) <= shards
    local = [tuple(items[a:b]) for a, b in spans(n, batch_size)]
    sharded = [tuple(part[a:b]) for part in cut for a, b in spans(len(part), batch_size)]
    assert sharded == local


def test_a_connection_outlives_a_ray_shutdown_between_statements(world, cluster):
    """``ray.shutdown()`` between two statements (a notebook restarting its Ray): the next
    statement raised Ray's "Can't find actor ... from a different cluster", and so did close()
    and every statement after. The workers are started again in the Ray running now."""
    world.conn.engine.close()
    X, y = world.X[:150], world.y[:150]
    conn = diagql.connect(world.conn.model, (X, y), batch_size=BATCH, cache_dir=False,
                          engine="ray", ray_workers=1, progress=False)
    truth = activations(world.model, X, "net.6").mean(axis=0)
    close(conn.query("AVG NEURONS IN net.6 USING FULL").values, truth)
    cluster.shutdown()
    cluster.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    close(conn.query("AVG NEURONS IN net.6 USING FULL").values, truth)
    conn.close()
    conn.close()


def test_an_address_nothing_listens_at_is_refused_at_once():
    """Ray retries an unreachable head for minutes, a log line every 30 s, and DiagQL's "cannot
    start Ray" never came; an address that takes no connection is refused first."""
    import socket

    from diagql.engine.ray_workers import _reachable

    with socket.socket() as free:  # a port nothing listens at once this socket is closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(DiagQLError, match=rf"^cannot reach Ray at {address}: "):
            _reachable(address, seconds=2)
    _reachable("auto")  # Ray's own forms are left to Ray


def test_a_global_the_code_reads_set_on_the_driver_only_is_warned_of(cluster, monkeypatch):
    """A worker imports the model's and the data's modules afresh: a global set at run time
    on the driver (``SCALE = 2.0`` before connect, or after it before the first pass) had
    left every worker answering for the module's own value (0.31 off), silently. The first
    worker's reads are compared with the driver's, and a difference warned of, naming the
    global; a cache the model's forward fills on the driver (the catalog's probe) is not
    one. At the module's value, answered as plain torch."""
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    model = ray_models.Scaled().eval()
    for name, data, before in (("SCALE", (X, y), True), ("NORM", ray_models.Normed(X, y), True),
                               ("SCALE", (X, y), False)):
        if before:
            monkeypatch.setattr(ray_models, name, 2.0)
        conn = diagql.connect(model, data, engine="ray", ray_workers=1, cache_dir=False,
                              progress=False)
        try:
            assert conn.catalog
            if not before:
                monkeypatch.setattr(ray_models, name, 2.0)
            what = "the model" if name == "SCALE" else "the data's items"
            with pytest.warns(Warning, match=rf"the code of {what} reads "
                                             rf"tests\.ray_models\.{name}, whose value on a "
                                             rf"Ray worker is not the driver's"):
                conn.query("AVG NEURONS IN net.1")
        finally:
            conn.close()
        monkeypatch.setattr(ray_models, name, 1.0)
    ray_models.SEEN.clear()
    conn = diagql.connect(model, ray_models.Normed(X, y), engine="ray", ray_workers=1,
                          cache_dir=False, progress=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert conn.catalog and ray_models.SEEN  # the probe filled the driver's cache
            got = conn.query("AVG NEURONS IN net.1")
        with torch.no_grad():
            want = model.net[:2](X).double().mean(0).numpy()
        np.testing.assert_allclose(got.values[np.argsort(got.neurons)], want, atol=1e-7)
    finally:
        conn.close()


def test_the_globals_a_worker_must_share_are_named_by_module():
    """code_reads takes the user's globals that the models' and the items' code reads, by
    digest; other_reads names the first that differs, a config dict edited in place too."""
    from diagql.engine.ray_workers import code_reads, other_reads

    models_ = {None: ray_models.Scaled()}
    data = ray_models.Normed(torch.zeros(3, 6), torch.zeros(3))
    driver = code_reads(models_, data)
    assert "tests.ray_models.SCALE" in driver["model", None]
    assert "tests.ray_models.NORM" not in driver["model", None]
    assert "tests.ray_models.NORM" in driver["data", None]
    assert other_reads(driver, code_reads(models_, data)) is None
    ray_models.SCALE = 3.0
    try:
            notice = other_reads(driver, code_reads(models_, data))
    finally:
        ray_models.SCALE = 1.0
    assert notice.startswith("the code of the model reads tests.ray_models.SCALE, whose value")


def test_a_call_shifted_in_one_shard_is_refused_as_locally(cluster):
    """A shared module's call shifted by a branch on the data in one batch (model/
    call_sites.py) is refused on Ray as in the local pass, whichever part of the pass holds
    that batch; without it, both answer alike. (Shards of one batch each, compared only as
    they join: test_reused_modules.py.)"""
    torch.manual_seed(0)
    X, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    X[:, 2] = X[:, 2].clamp(max=3.0)
    plain = diagql.connect(ray_models.ExtraCall().eval(), (X, y), batch_size=30,
                           cache_dir=False, progress=False)
    on_ray = diagql.connect(ray_models.ExtraCall().eval(), (X, y), batch_size=30,
                            cache_dir=False, engine="ray", ray_workers=2, progress=False)
    np.testing.assert_allclose(on_ray.query("AVG NEURONS IN blk#1").values,
                               plain.query("AVG NEURONS IN blk#1").values, rtol=0, atol=TOL)
    on_ray.close()
    X[100, 2] = 4.0
    for engine in ({}, {"engine": "ray", "ray_workers": 2}):
        db = diagql.connect(ray_models.ExtraCall().eval(), (X, y), batch_size=30,
                            cache_dir=False, progress=False, **engine)
        with pytest.raises(DiagQLError, match="'blk#1' did not run in every batch"):
            db.query("AVG NEURONS IN blk#1")
        db.close()


def test_a_class_is_a_factory_of_its_instances_a_datasets_too():
    """A Dataset class has __getitem__, which had made it read as a data set, refused as "not
    type" (sweep SY9); its instances stay data sets, a module stays a module."""
    from diagql.model.data_forms import is_factory

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2), 0

    assert is_factory(Items) and is_factory(nn.Linear) and is_factory(lambda: Items())
    assert not is_factory(Items()) and not is_factory(nn.Linear(2, 2))


def test_a_dead_workers_items_are_named_as_a_range_only_where_they_are_one():
    from diagql.engine.ray_engine import _items_text

    assert _items_text(np.arange(1280, 1536)) == "items 1,280..1,535"
    spread = np.linspace(0, 49_999, 2000).round().astype(int)
    assert _items_text(spread) == "2,000 items spread over 0..49,999"
