"""What the accuracy estimate costs beside the forward pass it comes with, at scale.

    python benchmarks/estimate_overhead.py [--n 100000] [--layers conv1 fc1]
                                           [--samplers 'random(0.05)' 'maxmargin(0.05)']

Over bigdata.py's items (the demo's model), each sample query with each estimator, timed as a
first-time query: the session's activation store is emptied before it, so that its sampled
items really go through the model (the script checks that they did) rather than being read
from rows an earlier query kept. One untimed query per layer comes first, so that what a
session computes once (the covariates, the catalog) is not counted. ``estimate`` is the
Result's timings["estimate"] (the fit, the intervals, the Monte Carlo draws), ``pass`` its
timings["query"] (the sampled items' forward pass and reduction, the covariates' sums with
it), ``total`` the whole statement's; issue 15's target is estimate / pass under 10%.
"""
from __future__ import annotations

import argparse
import time

from bigdata import add_threads_option, big_connection, machine_line, use_threads

QUERIES = ["AVG NEURONS IN {layer} USING SAMPLE {sampler}",
           "TOPK 10 NEURONS IN {layer} USING SAMPLE {sampler}",
           "ARGMAX NEURONS IN {layer} USING SAMPLE {sampler}"]
TARGET = 0.10  # the estimate's share of the pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--layers", nargs="+", default=["conv1", "fc1"])
    parser.add_argument("--samplers", nargs="+", default=["random(0.05)", "maxmargin(0.05)"])
    add_threads_option(parser)
    args = parser.parse_args()
    use_threads(args.threads)
    started = time.perf_counter()
    db = big_connection(args.n, progress=False)
    db.profile  # noqa: B018 - computed here, outside the timed queries
    print(f"{args.n:,} items; profile {time.perf_counter() - started:.0f} s; {machine_line()}")
    print(f"{'query':<52} {'estimator':<9} {'items':>6} {'estimate s':>10} {'pass s':>8} "
          f"{'total s':>8} {'est/pass':>8} {'< 10%':>5}")
    for layer in args.layers:
        for sampler in args.samplers:
            db.sample(sampler)
            db.query(QUERIES[0].format(layer=layer, sampler=sampler))  # untimed: covariates
            for text in QUERIES:
                query = text.format(layer=layer, sampler=sampler)
                for estimator in ("assisted", "plain"):
                    db.execute(f"SET estimator = {estimator}")
                    db.activations.clear()  # first-time: nothing kept from the queries before
                    before = db.counters.get("items", 0)
                    t = db.query(query).timings
                    through = db.counters.get("items", 0) - before
                    if through == 0:
                        raise SystemExit(f"{query}: no item went through the model")
                    share = t["estimate"] / t["query"]
                    print(f"{query[:52]:<52} {estimator:<9} {through:>6,} {t['estimate']:>10.3f} "
                          f"{t['query']:>8.3f} {t['total']:>8.3f} {share:>8.1%} "
                          f"{'yes' if share < TARGET else 'no':>5}", flush=True)
    db.execute("SET estimator = assisted")
    print(f"{time.perf_counter() - started:.0f} s; {machine_line()}")


if __name__ == "__main__":
    main()
