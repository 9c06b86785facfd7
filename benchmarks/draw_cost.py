"""What a maxmargin draw costs against the estimate USING AUTO weighs it by.

    python benchmarks/draw_cost.py

Draws ``maxmargin(0.05)`` from synthetic latents of several shapes (classes k, items n,
dimensions d; one thread) and prints the draw's seconds beside ``MaxMarginSampler
.draw_seconds`` (samplers/maxmargin.py: k·n·(DRAW_ITEM_WORK + DRAW_WORK·(d + 1)²) multiply-adds
at the measured product rate, plus a process's first draw's import). A ratio under 1 is an
over-estimate, which makes AUTO answer exactly (docs/ARCHITECTURE.md, "Plan and execute").
The first row is a process's first draw, which pays for importing scipy.special.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from diagql.samplers.base import SampleData
from diagql.samplers.maxmargin import MaxMarginSampler
from diagql.samplers.space import product_rate

SHAPES = [(10, 2000, 16), (10, 2000, 16), (10, 8000, 16), (10, 8000, 32), (10, 20000, 32),
          (10, 2500, 84), (10, 8000, 84), (4, 8000, 32), (24, 6000, 32), (100, 3000, 64),
          (10, 5000, 128), (2, 20000, 64)]


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    print(f"product rate {product_rate():.3g} multiply-adds/s (one thread)")
    print("| classes | items | dims | draw | estimate | draw / estimate |")
    print("|---:|---:|---:|---:|---:|---:|")
    with threadpool_limits(limits=1):
        for k, n, d in SHAPES:
            Z = rng.standard_normal((n, d)).astype(np.float32)
            W = rng.standard_normal((d, k))
            labels = (Z @ W + 3 * rng.standard_normal((n, k))).argmax(axis=1)
            sampler = MaxMarginSampler(0.05, random_state=0)
            estimate = sampler.draw_seconds(n, k, d)  # before the draw: its import counts
            started = time.perf_counter()
            sampler.fit(SampleData(Z, labels, (Z @ W).argmax(axis=1), k))
            seconds = time.perf_counter() - started
            print(f"| {k} | {n:,} | {d} | {seconds:.3f} s | {estimate:.3f} s |"
                  f" {seconds / estimate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
