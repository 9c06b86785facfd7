"""The paper's headline on the demo: S1/S2/S3 of every sampler at 5%, 10% and 20%.

    python benchmarks/paper_workload.py [--sizes 0.05 0.1 0.2] [--seeds 5] [--k 10]

S1 = mean top-k precision, S2 = mean cosine distance, S3 = mean Jensen-Shannon distance over
every layer (conv1, conv2, fc1, fc2, fc3) × class × {correct, incorrect} combination with a
matching item (DESIGN section 6). Each sampler is averaged over the seeds (spread in
brackets). Also prints Table IV's counts: correctly / incorrectly classified items in the
sample, and the time to draw it.
"""
from __future__ import annotations

import argparse
import time

import diagql
from diagql.evaluation import evaluate

# Each sampler with the parameters the paper evaluates (j = 0.7 for the two-ended ones).
CALLS = [("random", {}), ("stratified", {}), ("latentgrid", {}), ("vas", {}),
         ("ebtree", {}), ("weighted", {}), ("gmm", {"j": 0.7, "covariance": "spherical"}),
         ("gmm", {"j": 0.7, "covariance": "full"}), ("maxmargin", {"j": 0.7, "method": "paper"}),
         ("maxmargin", {"j": 0.7})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="sampler names to run (default: all)")
    args = parser.parse_args()
    from diagql.samplers import REGISTRY

    calls = [(n, p) for n, p in CALLS if n in REGISTRY and (not args.only or n in args.only)]
    db = diagql.demo(progress=False)
    started = time.perf_counter()
    scores = evaluate(db, calls, args.sizes, k=args.k, seeds=args.seeds)
    print(f"demo: {len(db.source):,} items, accuracy {db.profile.correct.mean():.1%}; "
          f"k = {args.k}; {args.seeds} seeds; {time.perf_counter() - started:.1f} s in all\n")
    print(f"{'sampler':<34} {'size':>5} {'S1 (prec)':>15} {'S2 (cos)':>15} {'S3 (JS)':>15} "
          f"{'items':>6} {'correct':>8} {'incorrect':>9} {'draw s':>8}")
    for s in scores:
        size = "tree" if s.size is None else f"{s.size:g}"
        print(f"{s.sampler:<34} {size:>5} {s.S1:>7.3f} ({s.S1_sd:.3f}) {s.S2:>7.3f} ({s.S2_sd:.3f}) "
              f"{s.S3:>7.3f} ({s.S3_sd:.3f}) {s.items:>6.0f} {s.correct:>8.1f} {s.incorrect:>9.1f} "
              f"{s.seconds:>8.3f}")


if __name__ == "__main__":
    main()
