"""The activation cache on disk: an entry grows by appending a part with the new rows only, reads
back as exactly the rows stored, drops a damaged part, stays within the cache's size limit; and
the cost model: an entry cheaper to compute than to read back is not written, whoever stores it
(the artifacts, the activation store, a query's pass)."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diagql
from diagql.errors import DiagQLWarning
from diagql.session.artifacts import load_or_compute
from diagql.storage import activations as activations_module
from diagql.storage import store
from diagql.storage.activations import ActivationStore
from diagql.storage.store import Cache

N_ITEMS, WIDTH = 1_000, 64
VIEW = SimpleNamespace(key="conv1", width=WIDTH, text=lambda: "", layer=SimpleNamespace(name="conv1"))
TRUTH = np.random.default_rng(5).normal(size=(N_ITEMS, WIDTH)).astype(np.float32)


def make_store(root: Path, limit: int = store.DEFAULT_LIMIT) -> ActivationStore:
    return ActivationStore(Cache(root, limit=limit), lambda view_key: f"k{view_key}", N_ITEMS,
                           np.float32)


def add(activations: ActivationStore, items, seconds_per_item=None) -> None:
    items = np.asarray(sorted(items), dtype=np.int64)
    activations.add_chunks(VIEW, [(items, TRUTH[items])], seconds_per_item)
    activations.cache.flush()


def parts(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each part file: (size, inode, content); a rewrite renames a new file into place."""
    return {path.name: (path.stat().st_size, path.stat().st_ino, path.read_bytes())
            for path in sorted((root / "activations").glob("*.npz"))}


def rows_held(activations: ActivationStore, items) -> tuple[np.ndarray, np.ndarray]:
    """(items held, their rows), in item order, as a query reads them."""
    items = np.arange(N_ITEMS) if items is None else np.asarray(items)
    found = [(held, table[positions]) for table, positions, held in
             activations.held_rows(VIEW, items)]
    if not found:
        return np.empty(0, dtype=np.int64), np.empty((0, WIDTH), dtype=np.float32)
    held = np.concatenate([h for h, _ in found])
    rows = np.concatenate([r for _, r in found])
    order = np.argsort(held)
    return held[order], rows[order]


def test_growing_an_entry_writes_only_the_new_rows(tmp_path):
    first = range(400)
    add(make_store(tmp_path), first)
    before = parts(tmp_path)
    assert len(before) == 1

    grown = make_store(tmp_path)  # a new session: it reads the part, then adds items
    add(grown, range(300, 500))  # 100 of them are new
    after = parts(tmp_path)
    new = {name: stat for name, stat in after.items() if name not in before}
    assert all(after[name] == stat for name, stat in before.items())  # not rewritten
    assert len(new) == 1
    [(written, _, _)] = new.values()
    new_bytes = 100 * (WIDTH * 4 + 8)  # rows and item indices
    assert new_bytes < written < new_bytes + 4_096  # plus the npz's headers

    held, rows = rows_held(make_store(tmp_path), None)
    np.testing.assert_array_equal(held, np.arange(500))
    assert np.array_equal(rows, TRUTH[:500])


def test_a_truncated_part_is_dropped_and_the_rest_still_serves(tmp_path):
    add(make_store(tmp_path), range(100))
    first = set(parts(tmp_path))
    add(make_store(tmp_path), range(100, 250))
    [second] = set(parts(tmp_path)) - first
    path = tmp_path / "activations" / second
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    reader = make_store(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        held, rows = rows_held(reader, None)
    messages = [str(w.message) for w in record if issubclass(w.category, DiagQLWarning)]
    assert len(messages) == 1 and "damaged cache entry" in messages[0]
    np.testing.assert_array_equal(held, np.arange(100))
    assert np.array_equal(rows, TRUTH[:100])
    assert not path.exists()
    # The dropped rows come back as a part of their own once recomputed.
    add(reader, range(100, 250))
    held, rows = rows_held(make_store(tmp_path), None)
    assert np.array_equal(held, np.arange(250)) and np.array_equal(rows, TRUTH[:250])


def test_parts_past_the_limit_are_merged_into_one(tmp_path):
    activations = make_store(tmp_path)
    chunks = [range(start, start + 10) for start in range(0, 10 * (activations_module.MAX_PARTS + 1), 10)]
    for chunk in chunks:
        add(activations, chunk)
    on_disk = parts(tmp_path)
    assert len(on_disk) == 1  # the merged part replaced the others once it had landed
    held, rows = rows_held(make_store(tmp_path), None)
    total = 10 * len(chunks)
    assert np.array_equal(held, np.arange(total)) and np.array_equal(rows, TRUTH[:total])


def test_the_size_limit_evicts_the_least_recently_used_parts(tmp_path):
    part = 100 * (WIDTH * 4 + 8)
    activations = make_store(tmp_path, limit=int(2.5 * part))
    for start in (0, 100, 200):
        add(activations, range(start, start + 100))
        time.sleep(0.01)  # distinct modification times: the first part is the oldest
    assert len(parts(tmp_path)) == 2
    assert sum(size for size, _, _ in parts(tmp_path).values()) <= int(2.5 * part)
    held, rows = rows_held(make_store(tmp_path), None)
    np.testing.assert_array_equal(held, np.arange(100, 300))
    assert np.array_equal(rows, TRUTH[100:300])


def test_two_sessions_appending_the_same_items_read_back_each_row_once(tmp_path):
    one, two = make_store(tmp_path), make_store(tmp_path)
    one._entry(VIEW), two._entry(VIEW)  # both have read the (empty) entry
    add(one, range(60))
    add(two, range(40, 100))
    held, rows = rows_held(make_store(tmp_path), None)
    np.testing.assert_array_equal(held, np.arange(100))
    assert np.array_equal(rows, TRUTH[:100])


# --- the cost model -----------------------------------------------------------------------------

@pytest.fixture
def read_costs(monkeypatch):
    """Reading an entry back costs 50 ms plus its bytes at 1 GB/s (tests/conftest.py makes it
    free for the other tests)."""
    monkeypatch.setattr(store, "READ_FIXED", 0.05)
    monkeypatch.setattr(store, "READ_RATE", 1e9)


def test_an_artifact_cheaper_to_compute_than_to_read_is_not_written(tmp_path, read_costs):
    cache = Cache(tmp_path)
    encode = lambda value: {"a": value}
    decode = lambda arrays: arrays["a"]

    cheap = load_or_compute(cache, "profile", "cheap", lambda: np.arange(3), encode, decode,
                            lambda _: {})
    cache.flush()
    assert cheap.tolist() == [0, 1, 2] and cache.skipped == 1
    assert not (tmp_path / "profile" / "cheap.npz").exists()

    def slow():
        time.sleep(0.1)  # twice what reading it back costs
        return np.arange(4)

    load_or_compute(cache, "profile", "slow", slow, encode, decode, lambda _: {})
    cache.flush()
    assert (tmp_path / "profile" / "slow.npz").exists() and cache.skipped == 1
    assert Cache(tmp_path).load("profile", "slow", decode).tolist() == [0, 1, 2, 3]


def test_a_part_cheaper_to_recompute_than_to_read_is_not_written(tmp_path, read_costs):
    activations = make_store(tmp_path)
    add(activations, range(100), seconds_per_item=1e-5)  # 1 ms for the part: not written
    assert parts(tmp_path) == {} and activations.cache.skipped == 1
    add(activations, range(100, 200), seconds_per_item=1e-3)  # 100 ms: written
    assert len(parts(tmp_path)) == 1
    held, rows = rows_held(make_store(tmp_path), None)
    assert np.array_equal(held, np.arange(100, 200)) and np.array_equal(rows, TRUTH[100:200])


def test_queries_pass_what_their_work_cost(cnn, digits, tmp_path, monkeypatch):
    """With reading back made dearer than any computing here, a query stores nothing: the
    artifacts and the pass's rows all carry their seconds to the cache."""
    monkeypatch.setattr(store, "READ_FIXED", 1e3)
    X, y = digits
    conn = diagql.connect(cnn, (X[:300], y[:300]), cache_dir=tmp_path, progress=False)
    conn.query("AVG NEURONS IN 2 USING SAMPLE random(0.1, random_state=1)")
    conn.cache.flush()
    assert list(tmp_path.rglob("*.npz")) == []
    # catalog, profile, sample, the pass's rows, and the 3 blocks' auxiliaries
    assert conn.cache.skipped == 7


# --- rows kept in chunks, as the pass gave them -------------------------------------------------

def test_chunks_read_back_as_stored_and_an_entry_of_one_table_still_loads(tmp_path):
    activations = make_store(tmp_path)
    items = np.arange(0, 300, 2)
    chunks = [(items[s:s + 64], TRUTH[items[s:s + 64]]) for s in range(0, len(items), 64)]
    activations.add_chunks(VIEW, chunks)
    activations.cache.flush()
    [name] = parts(tmp_path)
    with np.load(tmp_path / "activations" / name) as npz:
        assert sorted(npz.files) == ["__diagql__", "items", "rows-0", "rows-1", "rows-2"]
    held, rows = rows_held(make_store(tmp_path), None)
    np.testing.assert_array_equal(held, items)
    assert np.array_equal(rows, TRUTH[items])
    # Chunks overlapping what is held add only their new items' rows.
    more = np.arange(250, 350)
    activations.add_chunks(VIEW, [(more[:40], TRUTH[more[:40]]), (more[40:], TRUTH[more[40:]])])
    activations.cache.flush()
    held, rows = rows_held(make_store(tmp_path), None)
    np.testing.assert_array_equal(held, np.union1d(items, more))
    assert np.array_equal(rows, TRUTH[held])
    # An entry written before chunks holds one table, ``rows``.
    old = np.arange(900, 950)
    activations.cache.store("activations", "kconv1-old", {"items": old, "rows": TRUTH[old]}, {})
    activations.cache.flush()
    held, rows = rows_held(make_store(tmp_path), old)
    np.testing.assert_array_equal(held, old)
    assert np.array_equal(rows, TRUTH[old])


def test_a_pass_keeps_rows_that_a_later_in_place_op_does_not_overwrite(cnn, digits, tmp_path):
    """Layers 0 and 2 in one pass: after layer 0's hook the model runs on, and its in-place
    ReLU overwrites layer 0's output. The rows kept (in memory and on disk, in chunks of a
    batch) are the convolution's own, negatives included, as plain torch computes them."""
    X, y = digits
    X, y = X[:600], y[:600]
    sampler = "random(0.5, random_state=1)"
    conn = diagql.connect(cnn, (X, y), cache_dir=tmp_path, batch_size=64, progress=False)
    conn.execute("SET estimator = plain")
    conn.execute(f"AVG NEURONS IN 0 USING SAMPLE {sampler}; AVG NEURONS IN 2 USING SAMPLE "
                 f"{sampler}")
    conn.cache.flush()
    sample = conn.sample(sampler)
    chosen = sample[y.numpy()[sample] == 3]
    with torch.no_grad():
        truth = cnn[0](X[chosen]).flatten(1).double().numpy().mean(axis=0)
    assert truth.min() < 0  # what the ReLU would have zeroed
    later = diagql.connect(cnn, (X, y), cache_dir=tmp_path, progress=False)
    later.execute("SET estimator = plain")
    for session in (conn, later):  # the rows in memory, then on disk
        before = session.counters["items"]
        result = session.query(f"AVG NEURONS IN 0 WHERE class = 3 USING SAMPLE {sampler}")
        assert session.counters["items"] == before  # answered from the kept rows
        np.testing.assert_allclose(result.values, truth, rtol=1e-6, atol=1e-6)


def test_parts_appended_twice_are_read_once_each():
    """Two sessions may append the same items to a layer's entry: each item is read from the
    first part that holds it (by one flag per item: the parts had been checked against a union
    of the items so far, rebuilt per part, and 782 batch-sized parts took 14 s to read back;
    benchmarks/README.md, "2026-12-05 (twenty-sixth session)")."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(300):  # overlapping runs of items, each unique within its part
        items = np.sort(rng.choice(5_000, size=rng.integers(1, 40), replace=False))
        parts.append((items, items[:, None] + len(parts) / 1000))
    kept = activations_module._disjoint(parts)
    first = {}
    for number, (items, _) in enumerate(parts):
        for item in items.tolist():
            first.setdefault(item, number)
    got = {int(i): float(r[0]) for items, rows in kept for i, r in zip(items, rows)}
    assert sum(len(items) for items, _ in kept) == len(got) == len(first)
    assert got == {item: item + number / 1000 for item, number in first.items()}


def test_an_exact_query_reads_the_rows_a_sample_kept_and_sends_the_rest(cnn, digits):
    """A FULL after a sample (or UNTIL's exact answer after its rounds) sent every item again;
    it now reduces the kept rows and passes only the others, with the same answer."""
    X, y = digits
    X, y = X[:600], y[:600]
    conn = diagql.connect(cnn, (X, y), cache_dir=False, batch_size=64, progress=False)
    first = conn.query("AVG NEURONS IN 2 WHERE class = 3 USING FULL")
    sample = conn.query("AVG NEURONS IN 2 USING SAMPLE random(0.3, random_state=2)")
    kept = conn.sample("random(0.3, random_state=2)")
    before = conn.counters["items"]
    again = conn.query("AVG NEURONS IN 2 WHERE class = 3 USING FULL")
    matching = np.flatnonzero(y.numpy() == 3)
    assert conn.counters["items"] - before == len(np.setdiff1d(matching, kept))
    with torch.no_grad():
        truth = cnn[:3](X[matching]).flatten(1).double().numpy().mean(axis=0)
    np.testing.assert_allclose(again.values, truth, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(again.values, first.values, rtol=1e-12, atol=1e-15)
    assert sample.n_items == len(kept)


def test_held_bytes_counts_each_array_once_and_not_a_shared_prediction():
    """What the kept states' budget counts: every array and tensor in mappings, sequences and
    objects' attributes, a shared one once, a state's block prediction (the profile's) not."""
    shared = torch.zeros(10, 4, dtype=torch.float64)  # 320 bytes
    inner = SimpleNamespace(zy=np.zeros((3, 5, 7)), again=shared)  # 840 bytes
    state = SimpleNamespace(sum=torch.zeros(7, dtype=torch.float64), sums=inner,
                            rows=[shared, np.zeros(6, dtype=np.float32)],
                            prediction=SimpleNamespace(basis=np.zeros((64, 1000))))
    assert activations_module.held_bytes({"a": state, "b": shared}) == 56 + 840 + 320 + 24


def test_kept_sample_states_stay_within_their_byte_budget(cnn, digits, monkeypatch):
    """A sampled GROUP BY's assisted states hold groups x covariates x neurons sums: 64 of
    them, counted by number alone, had grown a session by gigabytes on a wide layer. Kept
    now within REDUCED_BYTES, the oldest dropped first, a state larger alone not kept; the
    answers are the same whether or not states were kept."""
    X, y = digits
    X, y = X[:600], y[:600]
    conn = diagql.connect(cnn, (X, y), cache_dir=False, batch_size=64, progress=False)
    query = "AVG NEURONS IN 2 GROUP BY class USING SAMPLE random(0.2, random_state={})"
    first = conn.query(query.format(0))
    store = conn.models["model"].activations
    (states, one), = store._reduced.values()
    neurons = cnn[:3](X[:1]).numel()
    # At least Σy, Σy² and the fit rows' two sums, float64, per group and neuron.
    assert one == activations_module.held_bytes(states) and one >= 4 * 10 * neurons * 8
    monkeypatch.setattr(activations_module, "REDUCED_BYTES", int(2.5 * one))
    for seed in range(1, 6):
        conn.query(query.format(seed))
        kept = [size for _, size in store._reduced.values()]
        assert len(kept) <= 2 and sum(kept) <= 2.5 * one
    monkeypatch.setattr(activations_module, "REDUCED_BYTES", one // 2)
    store.clear()
    again = conn.query(query.format(0))
    assert not store._reduced
    np.testing.assert_allclose(again.values, first.values, rtol=1e-12, atol=1e-15)
