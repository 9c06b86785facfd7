"""Per-layer workload scores of one sampler: the sample's own answers (plain), the model-
assisted estimator's, and what USING AUTO answers (exact from the profile on the layers whose
rows the profile holds: S1 1, S2 0, S3 0; the assisted answer elsewhere), then the workload's
mean over every layer (the figure issue 15's targets are stated on).

    python benchmarks/per_layer.py [--sampler "maxmargin(0.05)"] [--seeds 3] [--model resnet]

(``resnet``: benchmarks/second_model.py's CNN.)
"""
from __future__ import annotations

import argparse
import os
import time

import diagql
from diagql.evaluate.bind import default_layers
from diagql.model.views import View

TARGETS = "targets (issue 15): S1 >= 0.88, S2 <= 0.013, S3 <= 0.308 on every layer"


def _cells(plain: list, asst: list, auto: list) -> list[str]:
    # S2 with four digits: its target (0.013) sits at the third.
    return [f"{v:>8.4f}" if metric == 1 else f"{v:>8.3f}"
            for metric, trio in enumerate(zip(plain, asst, auto)) for v in trio]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", default="maxmargin(0.05)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", choices=["demo", "resnet"], default="demo")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.model == "demo":
        db = diagql.demo(progress=False)
    else:
        import second_model
        db = second_model.connect(progress=False)
    print(f"{args.sampler}, {args.seeds} seeds, {args.model}\n"
          f"{'layer':<7} {'S1 plain':>8} {'S1 asst':>8} {'S1 auto':>8} {'S2 plain':>9} "
          f"{'S2 asst':>8} {'S2 auto':>8} {'S3 plain':>9} {'S3 asst':>8} {'S3 auto':>8}")
    autos = []
    for layer in default_layers(db):
        r = db.query(f"EVALUATE SAMPLERS {args.sampler} LAYERS {layer} SEEDS {args.seeds}")
        row = dict(zip(r.columns, r.rows[0]))
        exact = db.profile.rows_of(View(db.catalog[layer]).key) is not None
        plain = [row["S1"], row["S2"], row["S3"]]
        asst = [row["S1 assisted"], row["S2 assisted"], row["S3 assisted"]]
        auto = [1.0, 0.0, 0.0] if exact else asst
        cells = _cells(plain, asst, auto)
        print(f"{layer:<7} " + " ".join(cells), flush=True)
        autos.append(auto)
    # The workload's mean from one EVALUATE over every default layer, not the mean of the rows
    # above, so that it is the figure the targets are stated on.
    r = db.query(f"EVALUATE SAMPLERS {args.sampler} SEEDS {args.seeds}")
    row = dict(zip(r.columns, r.rows[0]))
    plain = [row["S1"], row["S2"], row["S3"]]
    asst = [row["S1 assisted"], row["S2 assisted"], row["S3 assisted"]]
    auto = [sum(column) / len(autos) for column in zip(*autos)]  # every layer has the same groups
    cells = _cells(plain, asst, auto)
    print(f"{'mean':<7} " + " ".join(cells))
    print(f"{TARGETS}\n{time.perf_counter() - started:.0f} s, load average "
          + " ".join(f"{load:.1f}" for load in os.getloadavg()))


if __name__ == "__main__":
    main()
