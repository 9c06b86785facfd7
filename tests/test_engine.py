"""Only the work a query needs: the activation cache, early exit, one pass shared by a script's
queries, a bounded disk cache that can be listed and cleared. Answers are checked against
plain torch over materialised activations (tests/models.py), never against DiagQL itself.
"""
from __future__ import annotations

import copy
import re
import time
import warnings

import numpy as np
import pytest
import torch

import diagql
from diagql.errors import BindError, DiagQLError, DiagQLWarning, ExecutionError
from diagql.storage.store import Cache, parse_size
from tests import cli_in_process

SAMPLE = "random(0.2, random_state=3)"


def activations(model, X, layer: str) -> np.ndarray:
    """The output of ``model[:layer + 1]`` per item, flattened, in float64: no hooks involved."""
    with torch.no_grad():
        return model[: int(layer) + 1](X).flatten(1).to(torch.float64).numpy()


def top(values: np.ndarray, k: int) -> list[int]:
    return np.argsort(-values, kind="stable")[:k].tolist()


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture
def world(cnn, digits, tmp_path):
    """A fresh copy of the trained CNN (so hooks added by a test stay in it), its data, a
    connection with its own cache directory."""
    model = copy.deepcopy(cnn)
    X, y = digits
    conn = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False)
    conn.execute("SET estimator = plain")  # sample answers here are the sample means
    return model, X, y, conn


# --- the activation cache ----------------------------------------------------------------------

def test_a_second_query_on_the_same_layer_and_sample_runs_no_forward_pass(world):
    model, X, y, conn = world
    sample = conn.sample(SAMPLE)
    acts = activations(model, X, "2")
    first = conn.query(f"TOPK 5 NEURONS IN 2 USING SAMPLE {SAMPLE}")
    assert conn.counters == {"passes": 1, "items": len(sample)}
    assert first.neurons.tolist() == top(acts[sample].mean(axis=0), 5)

    explain = conn.query(f"EXPLAIN AVG CHANNELS IN 2 WHERE incorrect USING SAMPLE {SAMPLE}")
    rows = dict(explain.rows)
    assert "are cached: no forward pass" in rows["cache"]
    # Not the pass it will not run, nor its cost, beside it.
    assert rows["forward"].startswith("none: every item's rows are cached")
    assert rows["cost"].startswith("no forward pass")
    wrong = sample[conn.profile.predictions[sample] != y.numpy()[sample]]
    assert len(wrong) > 0
    second = conn.query(f"AVG CHANNELS IN 2 WHERE incorrect USING SAMPLE {SAMPLE}")
    assert conn.counters == {"passes": 1, "items": len(sample)}  # no forward pass
    channels = acts[wrong].reshape(len(wrong), 8, 36).mean(axis=(0, 2))
    np.testing.assert_allclose(second.values, channels, rtol=1e-6, atol=1e-9)


def test_only_the_items_a_query_lacks_go_through_the_model(world):
    model, X, y, conn = world
    sample = conn.sample(SAMPLE)
    labels = y.numpy()
    conn.query(f"AVG NEURONS IN 6 WHERE class = 1 USING SAMPLE {SAMPLE}")
    ones = int((labels[sample] == 1).sum())
    assert conn.counters["items"] == ones
    explain = dict(conn.query(f"EXPLAIN AVG NEURONS IN 6 USING SAMPLE {SAMPLE}").rows)
    assert f"{ones:,} of {len(sample):,} items' activations of 6 are cached" in explain["cache"]
    every = conn.query(f"AVG NEURONS IN 6 USING SAMPLE {SAMPLE}")
    assert conn.counters == {"passes": 2, "items": len(sample)}
    np.testing.assert_allclose(every.values, activations(model, X, "6")[sample].mean(axis=0),
                               rtol=1e-6, atol=1e-9)


def test_a_new_session_starts_warm(world, tmp_path):
    model, X, y, conn = world
    query = f"AVG NEURONS IN 6 WHERE correct USING SAMPLE {SAMPLE}"
    answer = conn.query(query)

    again = copy.deepcopy(model)
    calls = count_calls(again)
    fresh = diagql.connect(again, (X, y), cache_dir=tmp_path, progress=False)
    fresh.execute("SET estimator = plain")  # sample answers here are the sample means
    assert fresh.query(query).values.tolist() == answer.values.tolist()
    assert calls[0] == 0  # no profile pass, no probe, no query pass
    assert fresh.counters["passes"] == 0
    assert {kind: counts["hits"] for kind, counts in fresh.cache.by_kind.items()} == \
        {"profile": 1, "sample": 1, "catalog": 1, "activations": 1}


def test_an_argmax_runs_no_forward_pass(world, tmp_path):
    """The profile keeps every item's winner of each layer it can read (a block, 6, and a
    ReLU that is none, 1): an ARGMAX on one, sampled or exact, counts them and runs the model
    on no item, in this session and in a new one reading the profile from disk; the answers
    are plain torch's."""
    model, X, y, conn = world
    correct = np.flatnonzero(conn.profile.correct)
    conn.cache.flush()
    again = diagql.connect(copy.deepcopy(model), (X, y), cache_dir=tmp_path, progress=False)
    again.execute("SET estimator = plain")
    for db in (conn, again):
        for layer in ("6", "1"):
            winners = activations(model, X, layer).argmax(axis=1)
            width = db.catalog[layer].neurons
            db.counters.clear()
            full = db.query(f"ARGMAX NEURONS IN {layer} WHERE correct USING FULL")
            sampled = db.query(f"ARGMAX NEURONS IN {layer} WHERE correct USING SAMPLE {SAMPLE}")
            assert db.counters.get("passes", 0) == 0 and db.counters.get("items", 0) == 0
            np.testing.assert_allclose(full.values, np.bincount(
                winners[correct], minlength=width) / len(correct), atol=1e-12)
            items = sampled.plan.items  # the plain estimator: the sample's own shares
            np.testing.assert_allclose(sampled.values, np.bincount(
                winners[items], minlength=width) / len(items), atol=1e-12)
            assert f"winner of {layer}" in dict(sampled.plan.explain())["forward"]
    auto = conn.query("ARGMAX NEURONS IN 6 USING AUTO")
    assert "winner of 6 is in the profile" in auto.plan.choice
    # CHANNELS counts each item's winning channel; another layer's TOPK runs the model.
    conn.query(f"ARGMAX CHANNELS IN 2 USING SAMPLE {SAMPLE}")
    assert conn.counters.get("passes", 0) == 0
    conn.query(f"TOPK 3 CHANNELS IN 2 USING SAMPLE {SAMPLE}")
    assert conn.counters["passes"] == 1


def test_a_changed_weight_never_reuses_activations(world, tmp_path):
    model, X, y, conn = world
    query = f"AVG NEURONS IN 6 USING SAMPLE {SAMPLE}"
    conn.query(query)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[6].bias += 0.5
    fresh = diagql.connect(changed, (X, y), cache_dir=tmp_path, progress=False)
    fresh.execute("SET estimator = plain")  # sample answers here are the sample means
    answer = fresh.query(query)
    assert fresh.cache.by_kind["activations"] == {"hits": 0, "misses": 1}
    sample = fresh.sample(SAMPLE)
    np.testing.assert_allclose(answer.values, activations(changed, X, "6")[sample].mean(axis=0),
                               rtol=1e-6, atol=1e-9)


def test_a_truncated_activation_entry_is_recomputed_with_a_warning(world, tmp_path):
    model, X, y, conn = world
    query = f"TOPK 4 NEURONS IN 0 USING SAMPLE {SAMPLE}"
    conn.query(query)
    conn.cache.flush()  # entries land in the background
    [path] = (tmp_path / "activations").glob("*.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fresh = diagql.connect(copy.deepcopy(model), (X, y), cache_dir=tmp_path, progress=False)
    fresh.execute("SET estimator = plain")  # sample answers here are the sample means
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        answer = fresh.query(query)
    messages = [str(w.message) for w in record if issubclass(w.category, DiagQLWarning)]
    assert len(messages) == 1 and "damaged cache entry" in messages[0]
    assert fresh.counters["passes"] == 1
    sample = fresh.sample(SAMPLE)
    assert answer.neurons.tolist() == top(activations(model, X, "0")[sample].mean(axis=0), 4)


def test_the_disk_cost_model_weighs_the_model_s_time_not_the_reduction_s(world, monkeypatch):
    """Rows read back from disk are reduced again, so a slow reduction is not what keeping
    them saves: the seconds per item the activation store weighs against a read are the
    pass's less what its consumers spent taking rows."""
    import time

    from diagql.engine import executor
    from diagql.storage.activations import ActivationStore

    conn = world[3]
    weighed, calls = [], [0]
    add_chunks, take = ActivationStore.add_chunks, executor.Reducer.take

    def recording(self, view, chunks, seconds_per_item=None):
        weighed.append(seconds_per_item)
        return add_chunks(self, view, chunks, seconds_per_item)

    def slow(self, rows, idx):
        calls[0] += 1
        time.sleep(0.05)
        return take(self, rows, idx)

    monkeypatch.setattr(ActivationStore, "add_chunks", recording)
    monkeypatch.setattr(executor.Reducer, "take", slow)
    n = len(conn.sample(SAMPLE))
    conn.query(f"AVG NEURONS IN 2 USING SAMPLE {SAMPLE}")
    assert calls[0] >= 1 and len(weighed) == 1
    assert weighed[0] * n < 0.05  # the tiny CNN's pass alone, without the 0.05 s per batch


def test_a_sample_over_the_memory_budget_streams_instead(world):
    model, X, y, conn = world
    conn.activations.budget = 1000  # bytes: no layer fits
    query = f"AVG NEURONS IN 2 USING SAMPLE {SAMPLE}"
    assert "streamed, not kept" in dict(conn.query("EXPLAIN " + query).rows)["cache"]
    first, second = conn.query(query), conn.query(query)
    # The rows were not kept, but the second query reused the first one's reduced means.
    assert conn.counters["passes"] == 1
    sample = conn.sample(SAMPLE)
    acts = activations(model, X, "2")
    np.testing.assert_allclose(first.values, acts[sample].mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(first.values, second.values)
    wrong = conn.query(f"TOPK 3 NEURONS IN 2 WHERE incorrect USING SAMPLE {SAMPLE}")
    assert conn.counters["passes"] == 2  # other items: streamed again
    chosen = sample[conn.profile.predictions[sample] != y.numpy()[sample]]
    assert wrong.neurons.tolist() == top(acts[chosen].mean(axis=0), 3)


def test_topk_then_avg_on_the_same_items_reuse_the_reduced_means(world):
    model, X, y, conn = world
    topk = conn.query(f"TOPK 3 NEURONS IN 6 WHERE class = 4 USING SAMPLE {SAMPLE}")
    items = conn.counters["items"]
    avg = conn.query(f"AVG NEURONS IN 6 WHERE class = 4 USING SAMPLE {SAMPLE}")
    assert conn.counters["items"] == items
    sample = conn.sample(SAMPLE)
    fours = sample[y.numpy()[sample] == 4]
    np.testing.assert_allclose(avg.values, activations(model, X, "6")[fours].mean(axis=0),
                               rtol=1e-6, atol=1e-9)
    assert topk.neurons.tolist() == top(avg.values, 3)
    assert avg.estimate is not None and avg.estimate.reliable


def test_groups_from_cached_rows_merge_with_groups_from_the_pass(world):
    """The ones' rows are cached by the first query; the grouped query reduces them and passes
    only the other items, its states merged: group 1 comes from the cache alone."""
    model, X, y, conn = world
    sample = conn.sample(SAMPLE)
    labels = y.numpy()
    conn.query(f"TOPK 2 NEURONS IN 6 WHERE class = 1 USING SAMPLE {SAMPLE}")
    grouped = conn.query(f"AVG NEURONS IN 6 WHERE class <= 3 GROUP BY class USING SAMPLE {SAMPLE}")
    chosen = sample[labels[sample] <= 3]
    assert conn.counters == {"passes": 2, "items": len(chosen)}
    acts = activations(model, X, "6")
    assert list(grouped.groups) == [0, 1, 2, 3]
    for key, group in grouped.groups.items():
        members = chosen[labels[chosen] == key]
        assert group.n_items == len(members) > 0
        np.testing.assert_allclose(group.values, acts[members].mean(axis=0), rtol=1e-6, atol=1e-9)


def test_nan_rows_from_the_cache_and_the_pass_are_counted_together(monkeypatch):
    """Item 7 (class 1) is cached with its NaN; items 3 and 30 (class 0) come through the pass:
    the merged count and the first bad item cover both. (The profile's winners, which mark
    such items for a refusal before any pass, are not kept here: a layer past their budget.)"""
    from diagql.model import winners
    from tests import bad_models

    monkeypatch.setattr(winners, "BUDGET", 0)
    db = diagql.connect(bad_models.nan_net(), bad_models.nan_data(), cache_dir=False,
                        progress=False)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    with pytest.raises(ExecutionError, match=r"for 1 of 13 items \(the first is item 7\)"):
        db.query("AVG NEURONS IN bn WHERE class = 1 USING SAMPLE random(40)")
    with pytest.raises(ExecutionError, match=r"for 3 of 40 items \(the first is item 3\)"):
        db.query("AVG NEURONS IN bn USING SAMPLE random(40)")
    assert db.counters["items"] == 40  # the second query passed only the 27 it lacked


# --- early exit --------------------------------------------------------------------------------

def test_the_pass_stops_after_the_queried_layer(world):
    model, X, y, conn = world
    conn.profile, conn.catalog  # their passes run the whole model, once
    later = count_calls(model[8])
    answer = conn.query("AVG NEURONS IN 2 WHERE class IN (3, 5)")
    assert later[0] == 0
    mask = np.isin(y.numpy(), [3, 5])
    np.testing.assert_allclose(answer.values, activations(model, X, "2")[mask].mean(axis=0),
                               rtol=1e-6, atol=1e-9)
    conn.query("AVG NEURONS IN 8")  # the logits: read from the profile, no pass at all
    assert later[0] == 0
    ran = count_calls(model[6])
    conn.query("AVG NEURONS IN 6")  # a later layer: the model runs up to it
    assert ran[0] > 0


# --- one pass for a script's queries -----------------------------------------------------------

SCRIPT = f"""
TOPK 5 NEURONS IN 0 WHERE class = 3;
AVG CHANNELS IN 2 GROUP BY correct;
ARGMAX NEURONS IN 6 WHERE incorrect USING SAMPLE {SAMPLE} WITH BASELINE;
AVG NEURONS IN 6 USING SAMPLE {SAMPLE};
"""


def test_a_script_s_queries_share_one_forward_pass(world):
    model, X, y, conn = world
    results = list(conn.run_script(SCRIPT))
    assert conn.counters == {"passes": 1, "items": len(X)}
    labels, predictions = y.numpy(), conn.profile.predictions
    sample = conn.sample(SAMPLE)

    conv0 = activations(model, X, "0")
    assert results[0].neurons.tolist() == top(conv0[labels == 3].mean(axis=0), 5)
    conv2 = activations(model, X, "2").reshape(len(X), 8, 36).mean(axis=2)
    correct = predictions == labels
    for key, mask in ((True, correct), (False, ~correct)):
        np.testing.assert_allclose(results[1].groups[key].values, conv2[mask].mean(axis=0),
                                   rtol=1e-6, atol=1e-9)
    fc = activations(model, X, "6")
    wrong = sample[predictions[sample] != labels[sample]]
    histogram = np.bincount(fc[wrong].argmax(axis=1), minlength=32) / len(wrong)
    np.testing.assert_allclose(results[2].values, histogram)
    exact = np.bincount(fc[~correct].argmax(axis=1), minlength=32) / (~correct).sum()
    np.testing.assert_allclose(results[2].baseline.values, exact)
    np.testing.assert_allclose(results[3].values, fc[sample].mean(axis=0), rtol=1e-6, atol=1e-9)

    alone = diagql.connect(copy.deepcopy(model), (X, y), cache_dir=False, progress=False)
    alone.execute("SET estimator = plain")  # sample answers here are the sample means
    for shared, statement in zip(results, [s for s in SCRIPT.split(";") if s.strip()]):
        single = alone.query(statement)
        np.testing.assert_allclose(shared.values, single.values, rtol=1e-9, atol=1e-12)
        assert shared.neurons.tolist() == single.neurons.tolist()
    # Four statements, one with a baseline; the ARGMAX on block 6 and its baseline count the
    # profile's winners instead of running a pass.
    assert alone.counters["passes"] == 3


def test_each_statement_of_a_shared_pass_keeps_its_own_error(world):
    model, X, y, conn = world
    script = ("AVG NEURONS IN 6; TOPK 3 NEURONS IN 9; AVG NEURONS IN 0 WHERE confidence > 2; "
              "TOPK 2 NEURONS IN 2")
    outcomes = list(conn.run_script(script))
    assert [type(o).__name__ for o in outcomes] == ["Result", "BindError", "NoMatchError",
                                                    "Result"]
    assert isinstance(outcomes[1], BindError) and "unknown layer '9'" in str(outcomes[1])
    assert outcomes[1].column == script.index("9") + 1
    assert isinstance(outcomes[2], ExecutionError) and "no items match" in str(outcomes[2])
    assert conn.counters["passes"] == 1
    assert outcomes[3].neurons.tolist() == top(activations(model, X, "2").mean(axis=0), 2)


def test_a_shared_pass_whose_samples_outgrow_the_budget_still_answers_every_item(world):
    model, X, y, conn = world
    sample = conn.sample(SAMPLE)
    ones = sample[y.numpy()[sample] == 1]
    # Room for the rows of the first query's items, not for the whole sample's.
    conn.activations.budget = (len(ones) + 1) * 32 * 4
    first, every = conn.run_script(f"AVG NEURONS IN 6 WHERE class = 1 USING SAMPLE {SAMPLE}; "
                                   f"AVG NEURONS IN 6 USING SAMPLE {SAMPLE}")
    assert conn.counters["passes"] == 1
    acts = activations(model, X, "6")
    np.testing.assert_allclose(first.values, acts[ones].mean(axis=0), rtol=1e-6, atol=1e-9)
    assert every.n_items == len(sample)
    np.testing.assert_allclose(every.values, acts[sample].mean(axis=0), rtol=1e-6, atol=1e-9)


def test_a_shared_pass_keeping_two_layers_answers_each_from_its_own_rows(cnn, digits):
    """Either layer's rows fit the memory budget alone, both together do not: the second
    layer's rows must not push out the first's before its query has read them (with the disk
    cache off, nothing could bring them back)."""
    model, (X, y) = copy.deepcopy(cnn), digits
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    conn.execute("SET estimator = plain")  # sample answers here are the sample means
    spec = "random(0.5, random_state=1)"
    sample = conn.sample(spec)
    sizes = [len(sample) * conn.catalog[layer].neurons * 4 for layer in ("0", "2")]
    conn.activations.budget = max(sizes)
    assert sum(sizes) > conn.activations.budget
    first, second = conn.execute(f"AVG NEURONS IN 0 USING SAMPLE {spec}; "
                                 f"TOPK 4 NEURONS IN 2 BY MEAN USING SAMPLE {spec}")
    assert conn.counters["passes"] == 1
    assert first.n_items == second.n_items == len(sample)
    np.testing.assert_allclose(first.values, activations(model, X, "0")[sample].mean(axis=0),
                               rtol=1e-6, atol=1e-9)
    means = activations(model, X, "2")[sample].mean(axis=0)
    assert second.neurons.tolist() == top(means, 4)
    np.testing.assert_allclose(second.values, means[top(means, 4)], rtol=1e-6, atol=1e-9)

# --- the disk cache: bounded, listed, cleared --------------------------------------------------

def _store(cache: Cache, key: str, nbytes: int) -> None:
    cache.store("sample", key, {"indices": np.zeros(nbytes // 8, dtype=np.int64)}, meta={})
    cache.flush()  # on disk now: the tests set its time and read the directory


def test_the_least_recently_used_entries_leave_first(tmp_path):
    cache = Cache(tmp_path, limit=30_000)
    for key, when in (("a", 1), ("b", 2), ("c", 3)):
        _store(cache, key, 8_000)
        path = cache.path("sample", key)
        import os

        os.utime(path, (when, when))
    assert cache.load("sample", "a") is not None  # a read makes "a" the most recently used
    _store(cache, "d", 8_000)
    assert sorted(e.key for e in cache.entries()) == ["a", "c", "d"]
    assert cache.evictions == 1 and cache.usage() <= 30_000
    _store(cache, "huge", 40_000)  # larger than the whole limit: not kept, nothing evicted
    assert sorted(e.key for e in cache.entries()) == ["a", "c", "d"]


def test_show_cache_and_clear_cache(world, tmp_path):
    model, X, y, conn = world
    conn.query(f"TOPK 3 NEURONS IN 2 USING SAMPLE {SAMPLE}")
    shown = {row[0]: row for row in conn.query("SHOW CACHE").rows}
    kinds = ("profile", "sample", "activations", "catalog", "auxiliary")
    # The auxiliaries: one entry per block the profile names (0, 2, 6; 8 is the logits).
    assert {kind: shown[kind][1] for kind in kinds} == \
        {"profile": 1, "sample": 1, "activations": 1, "catalog": 1, "auxiliary": 3}
    assert shown["total"][1] == 7 and shown["activations"][4] == 1  # one miss, this session
    cleared = conn.query("CLEAR CACHE")
    assert cleared.title.startswith("removed 7 entries")
    assert list(tmp_path.rglob("*.npz")) == []
    # This session keeps what it holds in memory; the next session recomputes.
    conn.query(f"TOPK 3 NEURONS IN 2 USING SAMPLE {SAMPLE}")
    assert conn.counters["passes"] == 1
    fresh = diagql.connect(copy.deepcopy(model), (X, y), cache_dir=tmp_path, progress=False)
    fresh.execute("SET estimator = plain")  # sample answers here are the sample means
    fresh.query(f"TOPK 3 NEURONS IN 2 USING SAMPLE {SAMPLE}")
    assert fresh.counters["passes"] == 1 and fresh.cache.hits == 0


@pytest.mark.parametrize("text, size", [("500MB", 500 * 1024 ** 2), ("2 GiB", 2 * 1024 ** 3),
                                        ("1.5k", 1536), (4096, 4096), ("0", 0)])
def test_cache_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5XB", "-1GB", "", "lots", True])
def test_bad_cache_sizes_are_named(text):
    with pytest.raises(DiagQLError, match="cache size"):
        parse_size(text)


def test_the_cli_lists_and_clears_the_cache_without_a_model(tmp_path):
    cache = Cache(tmp_path)
    _store(cache, "a", 800)

    def run(*args):
        return cli_in_process.diagql("--cache-dir", str(tmp_path), *args)

    shown = run("--format", "csv", "-e", "SHOW CACHE")
    assert shown.returncode == 0, shown.stderr
    assert "sample,1," in shown.stdout
    cleared = run("-e", "CLEAR CACHE")
    assert cleared.returncode == 0 and "removed 1 entries" in cleared.stdout
    assert list(tmp_path.rglob("*.npz")) == []
    bad = run("--cache-limit", "5XB", "-e", "SHOW CACHE")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "cannot read the cache size '5XB'" in bad.stderr


def test_with_baseline_s_speedup_counts_the_draw_and_reports_the_profile_apart(cnn, digits):
    """The sample side of WITH BASELINE is everything the sample cost this statement (binding,
    drawing, planning, its pass, its accuracy estimate), not its pass alone; the one-time
    profile is in neither."""
    X, y = digits
    db = diagql.connect(cnn, (X, y), cache_dir=False, progress=False)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    result = db.query("TOPK 3 NEURONS IN 2 USING SAMPLE maxmargin(0.2) WITH BASELINE")
    t = result.timings
    assert t["sample"] > 0 and t["profile"] > 0  # drawn and profiled by this very statement
    assert 0 < t["estimate"] < t["answer"]
    side = t["bind"] + t["sample"] + t["plan"] + t["query"] + t["estimate"]
    assert t["sample_side"] == pytest.approx(side)
    assert result.metrics["speedup"] == pytest.approx(t["baseline"] / side)
    assert result.metrics["speedup"] < t["baseline"] / t["query"]
    # A second statement reuses the sample: its draw costs nothing now.
    again = db.query("TOPK 3 NEURONS IN 2 USING SAMPLE maxmargin(0.2) WITH BASELINE")
    assert again.timings["sample"] == 0.0


def test_with_baseline_s_mean_over_groups_says_what_the_groups_the_sample_missed_score(
        cnn, digits):
    """A group the sample missed scores the metric's worst (1 for a cosine distance): the
    summary's mean over groups says so, beside the mean over the groups the sample holds,
    which their expected distances describe."""
    db = diagql.connect(cnn, digits, cache_dir=False, progress=False)
    result = db.query("AVG NEURONS IN 2 WHERE incorrect GROUP BY class "
                      "USING SAMPLE random(0.05, random_state=1) WITH BASELINE")
    scores = {key: g.metrics["cosine_distance"] for key, g in result.groups.items()}
    held = [v for key, v in scores.items() if len(result.groups[key].values)]
    missed = len(scores) - len(held)
    assert held and missed and result.metrics["cosine_distance"] == pytest.approx(
        (sum(held) + missed) / len(scores))
    line = " ".join(str(result).split())
    assert (f"mean cosine distance {result.metrics['cosine_distance']:.3f} over groups "
            f"({sum(held) / len(held):.3f} over the {len(held)} the sample holds; the "
            f"{missed} it missed score") in line


def test_explain_says_when_running_the_query_would_fail_on_no_match(world):
    """The profile already knows that no item matches: EXPLAIN says the query would fail, and
    why, instead of showing a plan over 0 items as if it would run."""
    conn = world[3]
    rows = dict(conn.query("EXPLAIN AVG NEURONS IN 6 WHERE confidence > 2").rows)
    assert "running it fails: no items match WHERE confidence > 2" in rows["refused"]
    assert "refused" not in dict(conn.query("EXPLAIN AVG NEURONS IN 6 WHERE class = 3").rows)



def test_explain_says_when_it_drew_the_sample_and_how_long_that_took(cnn, digits, monkeypatch):
    """A 1,000-class maxmargin draw took 13.7 s of an EXPLAIN whose cost line said 0.0003 s
    (sweep SS6): the sample row says it was drawn now, in how long; once kept, it does not."""
    from diagql.samplers.random import RandomSampler

    slow = RandomSampler._select

    def select(self, data, n, rng):
        time.sleep(0.05)
        return slow(self, data, n, rng)

    monkeypatch.setattr(RandomSampler, "_select", select)
    conn = diagql.connect(cnn, digits, cache_dir=False, progress=False)
    query = "EXPLAIN AVG NEURONS IN 2 USING SAMPLE random(0.07)"
    first = dict(conn.query(query).rows)["sample"]
    assert re.search(r"\(drawn now, in 0\.\d+ s; kept for the statements after\)$", first)
    assert "drawn now" not in dict(conn.query(query).rows)["sample"]


def test_a_timed_comparison_runs_one_untimed_item_first():
    """A process's first forward pass pays its kernels' set-up (0.9 s for the demo's convs),
    which WITH BASELINE charged to the exact side: a sample answered from cached rows showed
    '130x faster'. One item goes through the model, untimed, before the first comparison."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    X, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False, batch_size=16)
    conn.profile, conn.catalog  # noqa: B018 - their passes first
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    conn.query("AVG NEURONS IN 1 USING SAMPLE random(0.5) WITH BASELINE")
    assert sizes[0] == 1 and 1 not in sizes[1:]  # the warm-up, then the passes' batches
    sizes.clear()
    conn.query("AVG NEURONS IN 1 USING SAMPLE random(0.5) WITH BASELINE")
    assert 1 not in sizes  # once per model and process


def test_rows_a_pass_gave_before_ctrl_c_are_kept(world):
    """A sample query cancelled half way had kept nothing: rerun, it sent every item through
    the model again. The rows of the batches that came are kept; the rerun reads them back
    and answers as plain torch."""
    model, X, y, conn = world
    conn.execute("SET batch_size = 128")
    conn.profile, conn.catalog  # noqa: B018 - their passes before the interrupting hook
    seen, stop = [], [3]

    def interrupt(module, args):
        seen.append(len(args[0]))
        if len(seen) == stop[0]:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            conn.query("AVG NEURONS IN 3 USING SAMPLE random(0.5)")
        before = sum(seen[:-1])  # the batches that completed
        seen.clear()
        stop[0] = -1
        result = conn.query("AVG NEURONS IN 3 USING SAMPLE random(0.5)")
    finally:
        handle.remove()
    items = conn.sample("random(0.5)")
    assert sum(seen) == len(items) - before  # only the items the cancelled pass lacked
    with torch.no_grad():
        want = model[:4](X[items]).flatten(1).double().mean(dim=0).numpy()
    np.testing.assert_allclose(result.values, want, rtol=1e-5, atol=1e-6)


def test_neuron_labels_of_every_neuron_are_their_coordinates():
    """Every neuron's names are made once per layer and shape (a hot AVG's fifth): the same
    names as one at a time."""
    from diagql.model.neuron_labels import neuron_labels
    every = neuron_labels("conv1", (6, 28, 28), np.arange(4704))
    assert every[0] == "conv1[0,0,0]" and every[29] == "conv1[0,1,1]" and \
        every[-1] == "conv1[5,27,27]" and len(every) == 4704
    every[0] = "changed"  # a caller's own list: the next answer's names are whole
    assert neuron_labels("conv1", (6, 28, 28), np.arange(4704))[0] == "conv1[0,0,0]"
    assert neuron_labels("conv1", (6, 28, 28), [29, 0]) == ["conv1[0,1,1]", "conv1[0,0,0]"]
    assert neuron_labels("enc", (7, 4), np.arange(28), flat=True)[27] == "enc[27]"
    assert neuron_labels("fc", (3,), np.arange(3)) == ["fc[0]", "fc[1]", "fc[2]"]
