"""What keeping every layer's winners costs the profile pass (docs/ARCHITECTURE.md, "Data
model": model/winners.py), and what an ARGMAX then costs.

    python benchmarks/winners_cost.py [--n 2500 50000] [--repeat 3]

The profile pass over bigdata.py's first n items (the demo's LeNet-5, 1 torch thread, no disk
cache), alternately without the winners (``winners.views`` patched to none) and with them, best
of ``repeat``; then an ARGMAX on conv1 (a block) and conv1.2 (a ReLU inside it) over a 5%
sample and over every item, counted from the winners, against the same queries run through the
model (``Plan.profile_winners`` patched away), in one connection.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bigdata import big_connection, machine_line

import torch

from diagql.engine import planner
from diagql.model import winners

QUERIES = ("ARGMAX NEURONS IN {layer} USING SAMPLE random(0.05)",
           "ARGMAX NEURONS IN {layer} USING FULL")


def profile_cost(n: int, repeat: int) -> None:
    conn = big_connection(n, progress=False)
    assert conn.catalog is not None  # probed before either pass is timed
    kept = winners.views
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(repeat):
        for way in ("without", "with"):
            winners.views = kept if way == "with" else (lambda catalog, n: [])
            started = time.perf_counter()
            profile = conn.artifacts._compute_profile()
            seconds[way].append(time.perf_counter() - started)
            winners.views = kept
    before, after = min(seconds["without"]), min(seconds["with"])
    size = sum(w.nbytes for w in profile.winners.values())
    print(f"{n:,} items: profile pass {before:.3f} s without the winners, {after:.3f} s with "
          f"them ({after / before - 1:+.1%}); {len(profile.winners)} layers, "
          f"{size / n:.0f} bytes per item", flush=True)


def argmax_cost(n: int, repeat: int) -> None:
    conn = big_connection(n, progress=False)
    conn.profile
    kept = planner.profile_winners
    for layer in ("conv1", "conv1.2"):
        for text in QUERIES:
            query = text.format(layer=layer)
            conn.query(query)  # the sample drawn, the block's auxiliary read
            times = {}
            for way in ("pass", "winners"):
                planner.profile_winners = kept if way == "winners" else (lambda b, p: None)
                best = float("inf")
                for _ in range(repeat):
                    conn.activations.clear()  # a first-time query: no rows kept
                    started = time.perf_counter()
                    conn.query(query)
                    best = min(best, time.perf_counter() - started)
                times[way] = best
                planner.profile_winners = kept
            print(f"  {query}: {times['pass']:.4f} s through the model, {times['winners']:.4f} s "
                  f"from the winners ({times['pass'] / times['winners']:.0f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2500, 50_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in args.n:
        profile_cost(n, args.repeat)
        argmax_cost(n, args.repeat)
    print(machine_line())


if __name__ == "__main__":
    main()
