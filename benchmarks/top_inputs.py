"""TOPK k INPUTS: the first query on a layer (a pass over every item that also builds the
layer's inputs index) against the queries after it, answered from the index.

    python benchmarks/top_inputs.py [--n 50000] [--layer conv2] [--threads 1]

On benchmarks/bigdata.py's data set (default 50,000 demo-sized items), with the profile
computed beforehand (it is paid once per model and data, by any statement):

- "TOPK 10 NEURONS" is a plain full-data query over the layer: what one streamed pass costs;
- the first TOPK 10 INPUTS query on the layer: the pass, plus building the index;
- later queries on other neurons, k and WHERE clauses, answered from the index in memory;
  each is checked against the same query answered by a streamed pass over its items;
- a new session over the same cache directory: the index read back from disk.

"read" counts the items a query sent through the model; the speed-up is the first query's
seconds over each later one's.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import bigdata
import numpy as np

LATER = [
    "TOPK 10 INPUTS FOR {layer}[{a}]",
    "TOPK 10 INPUTS FOR {layer}[{b}] WHERE class = 3",
    "TOPK 10 INPUTS FOR {layer}[{b}] WHERE class = 3 AND incorrect",
    "TOPK 10 INPUTS FOR {layer}[{a}] WHERE confidence < 0.6",
    "TOPK 500 INPUTS FOR {layer}[{a}]",
    "BOTTOMK 10 INPUTS FOR {layer}[{b}] WHERE predicted = 7",
]


def timed(conn, text):
    before = conn.counters["items"]
    started = time.perf_counter()
    result = conn.query(text)
    return time.perf_counter() - started, result, conn.counters["items"] - before


def streamed(conn, text):
    """The same query answered by a pass over its items, without any index (the truth)."""
    from diagql.engine.planner import predicate_mask
    from diagql.engine.top_inputs import top_inputs
    from diagql.language.binder import bind_inputs
    from diagql.language.parser import parse

    query = parse(text)
    bound = bind_inputs(query, conn.catalog, n_classes=conn.n_classes, seed=0,
                        n_items=len(conn.source))
    allowed = predicate_mask(query.where, conn.profile)
    return top_inputs(conn.runner(), bound, allowed, None, build_index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--layer", default="conv2")
    bigdata.add_threads_option(parser)
    args = parser.parse_args()
    bigdata.use_threads(args.threads)
    print(bigdata.machine_line())
    root = tempfile.mkdtemp(prefix="diagql-top-inputs-")
    conn = bigdata.big_connection(args.n, cache_dir=root, progress=False)
    started = time.perf_counter()
    conn.profile
    print(f"profile: {time.perf_counter() - started:.2f} s (once per model and data)")
    shape = conn.catalog.by_name[args.layer].shape
    a = ",".join(str(s // 3) for s in shape)
    b = ",".join(str(s // 2) for s in shape)
    rows = []
    seconds, _, read = timed(conn, f"TOPK 10 NEURONS IN {args.layer}")
    rows.append((f"TOPK 10 NEURONS IN {args.layer} (a plain full pass)", seconds, read, ""))
    first_text = f"TOPK 10 INPUTS FOR {args.layer}[{b}]"
    first, result, read = timed(conn, first_text)
    rows.append((first_text + " (first: pass + index)", first, read, ""))
    conn.cache.flush()
    entry = next(e for e in conn.cache.entries() if e.kind == "index")
    for template in LATER:
        text = template.format(layer=args.layer, a=a, b=b)
        seconds, result, read = timed(conn, text)
        truth = streamed(conn, text)
        same = np.array_equal(truth.items, result.items) and np.allclose(truth.values,
                                                                          result.values)
        rows.append((text, seconds, read, "yes" if same else "NO"))
    again = bigdata.big_connection(args.n, cache_dir=root, progress=False)
    again.profile
    text = LATER[1].format(layer=args.layer, a=a, b=b)
    seconds, _, read = timed(again, text)
    rows.append((text + " (new session: index from disk)", seconds, read, ""))
    print(f"{args.n:,} items, layer {args.layer} {shape}; index on disk "
          f"{entry.bytes / 2**20:.1f} MB\n")
    print("| query | seconds | read | speed-up vs first | same as a pass |")
    print("|---|---:|---:|---:|---|")
    for text, seconds, read, same in rows:
        print(f"| `{text}` | {seconds:.3f} | {read:,} | {first / seconds:.1f}x | {same} |")


if __name__ == "__main__":
    main()
