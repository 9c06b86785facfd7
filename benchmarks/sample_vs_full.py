"""A query on a 5% sample against the same query USING FULL: cold, warm and hot.

    python benchmarks/sample_vs_full.py [--n 50000 100000] [--layer conv1 fc1] [--repeat 2]
                                        [--estimator assisted|plain]
                                        [--sampler 'stratified(0.05)' ...] [--threads 1]

On benchmarks/bigdata.py's data set (default 100,000 items; several sizes and layers may be
given, each measured in the same run, both sides with the same threads), for each sampler, the sample
query ``TOPK 10 NEURONS IN <layer> USING SAMPLE <sampler>`` and the same query ``USING FULL``
are timed (wall time of ``conn.query``, everything included) in three states, each side with
its own temporary cache directory:

- cold: a new connection over an empty cache directory: the profile pass, fingerprinting
  the model and data, drawing the sample and the query's own pass;
- warm: a new connection (a new session) over the directory the cold run filled. Two rows:
  "profile + sample on disk" removes the cached activations first (the directory holds what
  a session that only drew the sample would leave), "+ activations on disk" keeps them;
- warm session: a connection that already holds the profile and the sample in memory (a
  running session), its first query on the layer (no activations cached);
- hot: the warm connection's second query on the same layer and sample
  (``AVG NEURONS IN <layer>``), against the second FULL query on the warm FULL connection.

The ratio is FULL seconds / sample seconds (medians over ``--repeat`` runs). Targets (issue
14): a first-time query (the layer's activations not cached: "warm" in a new process and
"warm session") and a new process with them on disk ("+ activations on disk") at least 15x;
20x is the limit a pass over 5% of the items could reach; hot unchanged. "estimate s" is
the part of the sample side spent on its accuracy estimate (engine/estimate.py,
``result.timings["estimate"]``), and "without estimate" the ratio with it left out, to show
what the rest of the path reaches. "items through the model" counts what the connection's
queries sent through the model (profile excluded).

The default layers are conv1 (4,704 neurons) and fc1 (120), the narrow layer: the demo's fc2
holds the profile's latent, so both sides answer it exactly from the profile without a pass
and its ratio says nothing about a sample query's speed.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import bigdata

SAMPLERS = ["stratified(0.05)", "maxmargin(0.05)"]
TARGET = 15.0
TARGETED = ("warm", "warm+", "session")  # first-time queries, and a new process's warm one


def timed_query(conn, text):
    items = dict(getattr(conn, "counters", {})).get("items")
    started = time.perf_counter()
    result = conn.query(text)
    seconds = time.perf_counter() - started
    through = None if items is None else conn.counters["items"] - items
    # Cache entries land in the background after the answer: wait for them outside the timed
    # part, so that the next state finds the directory it expects (and no write competes).
    landed = None
    flush = getattr(getattr(conn, "cache", None), "flush", None)
    if flush is not None:
        started = time.perf_counter()
        flush()
        landed = time.perf_counter() - started
    return seconds, result, through, landed


def one_run(X, y, model, sampler, layer, root: Path, estimator: str = "assisted"):
    """Seconds and details of every state for one sampler, in fresh cache directories."""
    sample_q = f"TOPK 10 NEURONS IN {layer} USING SAMPLE {sampler}"
    full_q = f"TOPK 10 NEURONS IN {layer} USING FULL"
    hot_sample_q = f"AVG NEURONS IN {layer} USING SAMPLE {sampler}"
    hot_full_q = f"AVG NEURONS IN {layer} USING FULL"
    import diagql

    def connect(directory):
        conn = diagql.connect(model, (X, y), cache_dir=directory, progress=False)
        conn.execute(f"SET estimator = {estimator}")
        return conn

    out = {}
    sides = (("sample", sample_q, hot_sample_q), ("full", full_q, hot_full_q))
    for side, query, hot_query in sides:
        directory = root / side
        shutil.rmtree(directory, ignore_errors=True)
        out["cold", side] = timed_query(connect(directory), query)
        if side == "sample":
            # What a session that drew the sample but kept no activations would leave behind.
            kept = root / "kept-activations"
            shutil.rmtree(kept, ignore_errors=True)
            if (directory / "activations").exists():
                shutil.move(str(directory / "activations"), kept)
            out["warm", side] = timed_query(connect(directory), query)
            shutil.rmtree(directory / "activations", ignore_errors=True)
            # A running session: profile and sample already in memory, this layer not yet
            # queried (its activations are not on disk either).
            session = connect(directory)
            session.profile, session.catalog, session.sample(sampler)
            out["session", side] = timed_query(session, query)
            shutil.rmtree(directory / "activations", ignore_errors=True)
            if kept.exists():
                shutil.move(str(kept), directory / "activations")
        warm = connect(directory)
        out["warm+", side] = timed_query(warm, query)
        if side == "full":
            out["warm", side] = out["warm+", side]
            session = connect(directory)
            session.profile, session.catalog
            out["session", side] = timed_query(session, query)
        out["hot", side] = timed_query(warm, hot_query)
    return out


def describe(seconds, result, through, landed):
    t = result.timings
    parts = [f"{name} {t.get(name, 0):.3f}" for name in ("bind", "profile", "sample", "query",
                                                          "estimate", "answer")]
    if through is not None:
        parts.append(f"{through:,} items through the model")
    if landed is not None:
        parts.append(f"then {landed:.3f} s until its cache writes landed")
    return ", ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--n", type=int, nargs="+", default=[bigdata.N_DEFAULT],
                        help="items (default 100,000; several: each measured)")
    parser.add_argument("--layer", nargs="+", default=["conv1", "fc1"],
                        help="the queried layers (default conv1 and the narrow fc1)")
    parser.add_argument("--sampler", action="append", default=None,
                        help="a sampler call (repeatable; default stratified(0.05) and "
                             "maxmargin(0.05))")
    parser.add_argument("--repeat", type=int, default=2, help="runs per sampler (default 2)")
    parser.add_argument("--estimator", choices=["assisted", "plain"], default="assisted",
                        help="the sample side's estimator (default assisted; plain: the sample "
                             "mean, whose pass streams no covariate sums)")
    bigdata.add_threads_option(parser)
    args = parser.parse_args(argv)
    bigdata.use_threads(args.threads)
    started = time.perf_counter()
    model = bigdata.demo_model()
    rows, notes = [], []
    states = [("cold", "cold: new connection, empty cache dir"),
              ("warm", "first-time, new process: profile + sample on disk"),
              ("warm+", "new process: + activations on disk"),
              ("session", "first-time, running session: profile + sample in memory"),
              ("hot", "hot: same connection, 2nd query, same layer + sample")]
    for n in args.n:
        X, y = bigdata.big_data(n)
        for layer in args.layer:
            for sampler in args.sampler or SAMPLERS:
                runs = []
                for _ in range(args.repeat):
                    with tempfile.TemporaryDirectory(prefix="diagql-bench-") as tmp:
                        runs.append(one_run(X, y, model, sampler, layer, Path(tmp),
                                            args.estimator))
                for state, label in states:
                    sample_s = statistics.median(r[state, "sample"][0] for r in runs)
                    full_s = statistics.median(r[state, "full"][0] for r in runs)
                    ratio = statistics.median(r[state, "full"][0] / r[state, "sample"][0]
                                              for r in runs)
                    estimate_s = statistics.median(r[state, "sample"][1].timings.get("estimate", 0)
                                                   for r in runs)
                    bare = statistics.median(r[state, "full"][0] / max(
                        r[state, "sample"][0] - r[state, "sample"][1].timings.get("estimate", 0),
                        1e-9) for r in runs)
                    targeted = state in TARGETED
                    rows.append([f"{n:,}", layer, sampler, label, f"{sample_s:.3f}",
                                 f"{estimate_s:.3f}", f"{full_s:.3f}", f"{ratio:.1f}x",
                                 f"{bare:.1f}x",
                                 f">= {TARGET:.0f}x (limit 20x)" if targeted else "",
                                 ("yes" if ratio >= TARGET else "no") if targeted else ""])
                last = runs[-1]
                for state, _ in states:
                    notes.append(f"{n:,} {layer} {sampler}, {state}: sample side "
                                 f"{describe(*last[state, 'sample'])}; FULL side "
                                 f"{describe(*last[state, 'full'])}")
    bigdata.print_table(
        f"TOPK 10 NEURONS IN <layer> on a 5% sample vs USING FULL (seconds: wall time of "
        f"conn.query, medians of {args.repeat}; sample side's estimator: {args.estimator})",
        ["items", "layer", "sampler", "state", "sample s", "estimate s", "FULL s",
         "FULL / sample", "without estimate", "target", "met"], rows,
        ["hot queries are AVG NEURONS IN the same layer (and sample).",
         "Seconds of the last run, from result.timings (bind includes fingerprinting model "
         "and data for the cache keys; profile = loading or computing it; sample = drawing "
         "it; query = the query's pass or cache reads; answer = building the Result, the "
         "accuracy estimate (estimate) within it; cache writes land after the answer, in the "
         "background):"]
        + ["  " + n for n in notes])
    print(f"\nbenchmarks/sample_vs_full.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
