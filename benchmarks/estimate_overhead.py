"""What the accuracy estimate costs beside the pass it comes with, at scale.

    python benchmarks/estimate_overhead.py [--n 100000] [--threads 1]

Over bigdata.py's items (the demo's model), each sample query twice (the second is timed) with
each estimator: ``estimate`` is the Result's timings["estimate"] (the fit, the intervals, the
Monte Carlo draws), ``pass`` its timings["query"] (the sampled items' forward pass and
reduction, the covariates' sums with it), ``total`` the whole statement's.
"""
from __future__ import annotations

import argparse
import time

from bigdata import add_threads_option, big_connection, machine_line, use_threads

QUERIES = ["AVG NEURONS IN {layer} USING SAMPLE {sampler}",
           "TOPK 10 NEURONS IN {layer} USING SAMPLE {sampler}",
           "ARGMAX NEURONS IN {layer} USING SAMPLE {sampler}"]


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
    print(f"{'query':<52} {'estimator':<9} {'estimate s':>10} {'pass s':>8} {'total s':>8} "
          f"{'est/total':>9}")
    for layer in args.layers:
        for sampler in args.samplers:
            for text in QUERIES:
                query = text.format(layer=layer, sampler=sampler)
                for estimator in ("assisted", "plain"):
                    db.execute(f"SET estimator = {estimator}")
                    db.query(query)
                    t = db.query(query).timings
                    print(f"{query[:52]:<52} {estimator:<9} {t['estimate']:>10.3f} "
                          f"{t['query']:>8.3f} {t['total']:>8.3f} {t['estimate'] / t['total']:>9.2f}", flush=True)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
