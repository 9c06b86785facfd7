"""The paper's headline on the demo: S1/S2/S3 of every sampler at 5%, 10% and 20%.

    python benchmarks/paper_workload.py [--sizes 0.05 0.1 0.2] [--seeds 5] [--k 10] [--plot FILE]

One EVALUATE SAMPLERS statement does the work (this script only builds it and prints the
table): S1 = mean top-k precision, S2 = mean cosine distance, S3 = mean Jensen-Shannon distance
over every layer (conv1, conv2, fc1, fc2, fc3) × class × {correct, incorrect} combination with a
matching item (docs/ARCHITECTURE.md, "Evaluate"), each sampler averaged over the seeds (spread beside it), with
Table IV's counts (correctly / incorrectly classified items in the sample) and the time to draw
a sample. The statement it runs is printed first, to paste into ``diagql --demo -e``.
"""
from __future__ import annotations

import argparse

import diagql
from diagql.results.render import to_text

# Each sampler with the parameters the paper evaluates (j = 0.7 for the two-ended ones).
CALLS = ["random", "stratified", "latentgrid", "vas", "ebtree", "weighted",
         "gmm(covariance='spherical')", "gmm(covariance='full')", "maxmargin(method='paper')",
         "maxmargin"]


def statement(calls: list[str], sizes: list[float], k: list[int], seeds: int,
              plot: str | None = None) -> str:
    text = (f"EVALUATE SAMPLERS {', '.join(calls)} AT {', '.join(f'{s:g}' for s in sizes)} "
            f"K {', '.join(map(str, k))} SEEDS {seeds}")
    return text + (f" PLOT '{plot}'" if plot else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--k", type=int, nargs="+", default=[10])
    parser.add_argument("--only", nargs="*", help="sampler names to run (default: all)")
    parser.add_argument("--plot", metavar="FILE", help="also draw the figure to FILE")
    args = parser.parse_args()
    calls = [c for c in CALLS if not args.only or c.split("(")[0] in args.only]
    text = statement(calls, args.sizes, args.k, args.seeds, args.plot)
    print(text)
    db = diagql.demo(progress=False)
    result = db.query(text)
    print(to_text(result, width=160))
    print(f"\nthe whole evaluation took {result.timings['evaluate']:.1f} s")


if __name__ == "__main__":
    main()
