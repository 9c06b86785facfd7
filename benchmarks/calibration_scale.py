"""Do the 95% intervals hold when the sample is large? Coverage of AVG over big groups.

    python benchmarks/calibration_scale.py [--n 50000] [--model demo|resnet] [--layers ...]
                                           [--samplers random stratified maxmargin gmm vas weighted]
                                           [--size 0.05] [--estimator assisted]

calibration.py scores one (class, correctness) cell at a time on the demo's 2,500 digits, where
a 5% sample gives a cell 1-20 items and the intervals are wide. Here the matching items are
many: on bigdata.py's data (the demo's model over shifted digits), for each layer and sampler,
``AVG NEURONS IN <layer> USING SAMPLE <sampler>(<size>)`` (one group: the whole sample) and the
same ``GROUP BY class`` (ten groups), each against its exact answer ``USING FULL``
(``--model resnet``: second_model.py's CNN over the same items; layers stem block1 block2).
Printed per row: the sampled items, coverage (share of neurons whose exact mean lies inside the interval),
the root mean square of error / standard error (1.0 for honest normal intervals), and the
expected against the actual cosine distance. A bias that does not shrink with the sample (a
linear model of the residual extrapolated by a sampler that draws far from the population)
shows here and not in calibration.py.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import bigdata
from diagql.results import metrics

LEVEL_Z = 1.959964  # for the printed error / se only: the intervals are DiagQL's own (t)


def score(result, exact: np.ndarray) -> tuple[float, float, float, float]:
    """(coverage, rms of error / se, expected cosine, actual cosine) of one group."""
    estimate = result.estimate
    inside = (estimate.ci_low <= exact) & (exact <= estimate.ci_high)
    se = (estimate.ci_high - estimate.ci_low) / (2 * LEVEL_Z)
    error = result.values - exact
    used = se > 0
    ratio = float(np.sqrt(np.mean(error[used] ** 2) / np.mean(se[used] ** 2)))
    actual = float(metrics.cosine_distances(result.values, exact)[0])
    return float(inside.mean()), ratio, float(estimate.expected), actual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--model", choices=["demo", "resnet"], default="demo")
    parser.add_argument("--layers", nargs="+",
                        help="default: conv1 conv2 fc1 (demo), stem block1 block2 (resnet)")
    parser.add_argument("--samplers", nargs="+",
                        default=["random", "stratified", "maxmargin", "gmm", "vas", "weighted"])
    parser.add_argument("--size", type=float, default=0.05)
    parser.add_argument("--estimator", default="assisted", choices=["assisted", "plain"])
    parser.add_argument("--bias-share", type=float, default=None,
                        help="engine/extrapolation.py's MINOR_SHARE and WHOLE_SHARE "
                             "(0: no widening)")
    parser.add_argument("--fit-rows", type=int, default=None,
                        help="engine/prediction.py's FIT_ROWS: the rows σ² is fitted on")
    parser.add_argument("--fit-floor", type=int, default=None,
                        help="engine/prediction.py's FIT_FLOOR: each group's least share")
    parser.add_argument("--prior-checks", type=float, default=None,
                        help="engine/extrapolation.py's PRIOR_CHECKS (1e12: one widening for "
                             "all of a query's groups, as before each group had its own)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.bias_share is not None:
        from diagql.engine import extrapolation

        extrapolation.MINOR_SHARE = extrapolation.WHOLE_SHARE = args.bias_share
    if args.fit_rows is not None:
        from diagql.engine import prediction

        prediction.FIT_ROWS = args.fit_rows
    if args.prior_checks is not None:
        from diagql.engine import extrapolation

        extrapolation.PRIOR_CHECKS = args.prior_checks
    if args.fit_floor is not None:
        from diagql.engine import prediction

        prediction.FIT_FLOOR = args.fit_floor
    started = time.perf_counter()
    conn = bigdata.big_connection(args.n, model=args.model)
    layers = args.layers or (["stem", "block1", "block2"] if args.model == "resnet"
                             else ["conv1", "conv2", "fc1"])
    conn.execute(f"SET estimator = {args.estimator}")
    print(f"{args.model}, {args.n:,} items, {args.estimator} estimator, bias share "
          f"{args.bias_share if args.bias_share is not None else 'default'}, fit rows "
          f"{args.fit_rows or 'default'} (floor {args.fit_floor or 'default'}), prior checks "
          f"{args.prior_checks or 'default'}, "
          f"samplers at {args.size:g}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| layer | sampler | query | sampled | coverage (worst group) | rms error/se |"
          " expected cosine | actual cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in layers:
        whole = conn.query(f"AVG NEURONS IN {layer} USING FULL").values
        by_class = conn.query(f"AVG NEURONS IN {layer} GROUP BY class USING FULL").groups
        for name in args.samplers:
            params = ", j=0.7" if name in ("maxmargin", "gmm") else ""
            using = f"USING SAMPLE {name}({args.size:g}{params})"
            one = conn.query(f"AVG NEURONS IN {layer} {using}")
            cover, ratio, expected, actual = score(one, whole)
            print(f"| {layer} | {name} | whole | {one.estimate.n:,} | {cover:.3f} | {ratio:.2f} |"
                  f" {expected:.2e} | {actual:.2e} |")
            grouped = conn.query(f"AVG NEURONS IN {layer} GROUP BY class {using}")
            scores = np.array([score(group, by_class[key].values)
                               for key, group in grouped.groups.items()])
            sampled = sum(group.estimate.n for group in grouped.groups.values())
            print(f"| {layer} | {name} | by class (mean of {len(scores)}) | {sampled:,} |"
                  f" {scores[:, 0].mean():.3f} ({scores[:, 0].min():.2f}) |"
                  f" {scores[:, 1].mean():.2f} |"
                  f" {scores[:, 2].mean():.2e} | {scores[:, 3].mean():.2e} |")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
