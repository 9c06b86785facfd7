"""Hook and aggregation overhead of full-data queries, against plain inference on the same items.

    python benchmarks/overhead.py [--sizes 2500 100000] [--repeat 2] [--batch-size 256]
                                  [--threads N] [--query TEXT ...] [--no-breakdown]

For each data size (2,500 = the demo's own held-out digits; larger sizes come from
benchmarks/bigdata.py), each query's forward-pass time (``result.timings["query"]``: the
profile is computed beforehand, so its pass is excluded) is measured beside two anchors over
the same items, with the same model object and batch size, in eval mode under
``torch.inference_mode()``:

- plain: ``model(X[i:i + batch])`` for every batch: the whole forward pass, the physical
  limit of a query that needs the last layer;
- prefix: the model's children in order up to and including the queried layer (LeNet-5's
  forward applies them in registration order): the physical limit of a query that may stop
  the forward pass after its layer (DiagQL does, since issue 5).

Each repetition runs plain, prefix and the query back to back, in an order that rotates from
one repetition to the next; a ratio is the median over repetitions of (query / anchor) within
one repetition, so that slow spells of a shared machine hit both sides alike. Seconds are
medians too. Target: overhead (query / plain - 1) at most 10%.

The breakdown (skip it with ``--no-breakdown``) then runs each query once more under
torch.profiler and reports how much of its time goes into the forward hooks' callbacks
(reducing each batch's activations into aggregate states) and which operators take it: where
the overhead goes.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from collections import defaultdict

import bigdata
import torch

QUERIES = [
    "AVG NEURONS IN fc3 USING FULL",
    "AVG NEURONS IN conv1",
    "TOPK 10 NEURONS IN conv2",
    "ARGMAX NEURONS IN fc1",
    "AVG NEURONS IN conv2 GROUP BY class",
    "AVG NEURONS IN fc3 GROUP BY class",
]
TARGET = 0.10


def plain(model, X, batch_size):
    for start in range(0, len(X), batch_size):
        model(X[start:start + batch_size])


def prefix_of(model, layer: str):
    """The model's children in registration order up to and including ``layer``."""
    steps = []
    for name, child in model.named_children():
        steps.append(child)
        if name == layer:
            break
    else:
        raise ValueError(f"{layer!r} is not a child of the model")
    if len(steps) == len(list(model.children())):
        return None  # the whole model: the prefix anchor is plain inference

    def run(X, batch_size):
        for start in range(0, len(X), batch_size):
            x = X[start:start + batch_size]
            for step in steps:
                x = step(x)
    return run


def layer_of(query: str) -> str:
    words = query.split()
    return words[[w.upper() for w in words].index("IN") + 1].strip('"')


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn() under inference mode."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu


def measure(conn, X, queries, reps, batch_size):
    """Per query, one dict per repetition: case -> (wall s, CPU s)."""
    model = conn.model.eval()
    prefixes = {q: prefix_of(model, layer_of(q)) for q in queries}
    samples = {q: [] for q in queries}
    for rep in range(reps):
        for qi, query in enumerate(queries):
            cases = ["plain", "query"] + (["prefix"] if prefixes[query] else [])
            shift = (rep + qi) % len(cases)
            order = cases[shift:] + cases[:shift]
            got = {}
            for case in order:
                if case == "plain":
                    got[case] = timed(lambda: plain(model, X, batch_size))
                elif case == "prefix":
                    got[case] = timed(lambda: prefixes[query](X, batch_size))
                else:
                    passes = dict(getattr(conn, "counters", {}))
                    cpu = time.process_time()
                    result = conn.query(query)
                    # Wall: the query's own forward pass. CPU: the whole call (bind and plan
                    # add well under a millisecond, see latency.py).
                    got[case] = (result.timings["query"], time.process_time() - cpu)
                    if passes and conn.counters.get("passes", 0) <= passes.get("passes", 0):
                        sys.exit(f"{query!r} ran no forward pass (answered from a cache?): "
                                 f"this benchmark measures the pass")
            samples[query].append(got)
    return samples


def rows_for(n, samples):
    def med(runs, case, clock=0):
        return statistics.median(r[case][clock] for r in runs)

    def ratio(runs, case, clock=0):
        return statistics.median(r["query"][clock] / r[case][clock] for r in runs)

    rows = []
    for query, runs in samples.items():
        wall = ratio(runs, "plain")
        if "prefix" in runs[0]:
            prefix_text, vs_prefix = f"{med(runs, 'prefix'):.3f}", f"{ratio(runs, 'prefix'):.2f}x"
        else:
            prefix_text, vs_prefix = "= plain", f"{wall:.2f}x"
        rows.append([f"{n:,}", query, f"{med(runs, 'query'):.3f}", f"{med(runs, 'plain'):.3f}",
                     f"{wall:.3f}x", f"{(wall - 1) * 100:+.1f}%",
                     f"{ratio(runs, 'plain', 1):.3f}x", prefix_text, vs_prefix,
                     f"<= +{TARGET:.0%}", "yes" if wall <= 1 + TARGET else "no"])
    return rows


@contextlib.contextmanager
def quiet_stderr():
    """Kineto prints a line to fd 2 at every profiler start and stop: silence them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def labelled_hooks(label: str):
    """Run every callback that diagql.model.hooks.Hooks installs inside ``record_function(label)``
    (a monkeypatch of Hooks.__init__, undone after): the profiler then attributes the
    operators of the forward hooks, the reduction of activations included, to ``label``."""
    from diagql.model.hooks import Hooks

    original = Hooks.__init__

    def wrap(callback):
        @functools.wraps(callback)
        def labelled(*args, **kwargs):
            with torch.profiler.record_function(label):
                return callback(*args, **kwargs)
        return labelled

    @functools.wraps(original)
    def init(self, model, callbacks, *args, **kwargs):
        original(self, model, {name: wrap(fn) for name, fn in callbacks.items()}, *args, **kwargs)
    Hooks.__init__ = init
    try:
        yield
    finally:
        Hooks.__init__ = original


def breakdown(conn, queries, top):
    """Per query: wall time, the share spent in the forward hooks (reducing activations and
    bookkeeping), and the operators that take it."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    label = "diagql hook"
    for query in queries:
        with quiet_stderr(), labelled_hooks(label), \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            result = conn.query(query)
        events = prof.events()
        hook_ms = sum(e.cpu_time_total for e in events if e.name == label) / 1e3
        children = defaultdict(float)
        for e in events:
            if e.cpu_parent is not None and e.cpu_parent.name == label:
                children[e.name] += e.cpu_time_total / 1e3
        wall_ms = result.timings["query"] * 1e3
        ops = sorted(children.items(), key=lambda kv: -kv[1])[:top]
        rows.append([query, f"{wall_ms:.0f}", f"{hook_ms:.0f}", f"{hook_ms / wall_ms:.0%}",
                     ", ".join(f"{name.removeprefix('aten::')} {ms:.0f}" for name, ms in ops
                               if ms >= 0.5)])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_500, 100_000],
                        help="data set sizes (default 2500 100000)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="repetitions at 100,000 items; smaller sets get proportionally "
                             "more, up to 15 (default 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="items per batch (default 256)")
    bigdata.add_threads_option(parser)
    parser.add_argument("--query", action="append", default=None,
                        help="a query to measure (repeatable; default: six representative ones)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the torch.profiler breakdown")
    parser.add_argument("--breakdown-size", type=int, default=20_000,
                        help="items for the breakdown (default 20000)")
    args = parser.parse_args(argv)
    bigdata.use_threads(args.threads)
    queries = args.query or QUERIES

    import diagql

    started = time.perf_counter()
    rows, notes = [], []
    for n in args.sizes:
        X, y = bigdata.big_data(n)
        conn = diagql.connect(bigdata.demo_model(), (X, y), batch_size=args.batch_size,
                              cache_dir=False, progress=False)
        profiled = time.perf_counter()
        conn.profile
        reps = max(args.repeat, min(15, round(args.repeat * 100_000 / n)))
        notes.append(f"{n:,} items: profile pass {time.perf_counter() - profiled:.2f} s "
                     f"(excluded), {reps} repetitions")
        if n == args.sizes[0]:
            for query in queries:  # warm-up: bind, first calls of each code path
                conn.query(query)
        rows += rows_for(n, measure(conn, X, queries, reps, args.batch_size))
    bigdata.print_table(
        "Full-data queries against plain inference (seconds: medians; ratios: medians of "
        "per-repetition ratios)",
        ["items", "query", "DiagQL s", "plain s", "DiagQL / plain", "overhead", "CPU-time ratio",
         "prefix s",
         "DiagQL / prefix", "target", "met"], rows,
        notes + [f"batch size {args.batch_size}; plain = model(X[i:i+batch]) over every batch; "
                 f"prefix = the model's children up to the queried layer"])
    if args.breakdown:
        X, y = bigdata.big_data(args.breakdown_size)
        conn = diagql.connect(bigdata.demo_model(), (X, y), batch_size=args.batch_size,
                              cache_dir=False, progress=False)
        conn.profile
        for query in queries:
            conn.query(query)
        bigdata.print_table(
            f"Where the time goes: one run of each query over {args.breakdown_size:,} items "
            f"under torch.profiler (its overhead included)",
            ["query", "query ms", "in the hooks ms", "share", "operators in the hooks (ms, "
                                                              "children included)"],
            breakdown(conn, queries, top=6),
            ["in the hooks = inside the callbacks of diagql.model.hooks.Hooks (reducing each batch's "
             "activations, and bookkeeping); the rest is the forward pass (up to the queried "
             "layer) and batching"])
    print(f"\nbenchmarks/overhead.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
