"""Are the accuracy estimates honest? Estimated error against actual error on the demo.

    python benchmarks/calibration.py [--sizes 0.05 0.1 0.2] [--seeds 3]

For every layer × class × {correct, incorrect} combination with at least 2 matching sampled
items, each sampler and size: the AVG query's 95% intervals (coverage = share of neurons whose
exact mean lies inside), the TOPK-10 query's expected precision against its actual precision
(mean of each, and their correlation over queries), and the expected against the actual cosine
and JS distances. The estimates are computed by diagql.engine.estimate from the same aggregate states
the engine builds; the exact answers come from all matching items.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import diagql
from diagql import samplers
from diagql.engine import estimate
from diagql.engine.aggregates import ArgmaxState, MeanState, rank
from diagql.evaluate.bind import default_layers
from diagql.results import metrics
from truth import combinations, exact_answers, layer_truth

K = 10


def run(db, name: str, params: dict, sizes, seeds: int) -> list[dict]:
    layers = default_layers(db)
    truths = {layer: layer_truth(db, layer) for layer in layers}
    combos = combinations(db, layers)
    exact = exact_answers(combos, truths, K)  # once: the same for every size and seed
    profile = db.profile
    data = samplers.SampleData(profile.latents, profile.labels, profile.predictions,
                               profile.n_classes)
    cls = samplers.sampler_class(name)
    rows = []
    for size in sizes:
        for seed in range(seeds):
            sample = cls(size=size, random_state=seed, **params).fit(data).indices_
            in_sample = np.zeros(len(profile), dtype=bool)
            in_sample[sample] = True
            for combo in combos:
                chosen = combo.items[in_sample[combo.items]]
                if len(chosen) < 2:
                    continue
                truth = truths[combo.layer]
                values = torch.from_numpy(truth.activations[chosen].astype(np.float64))
                mean_state, hist_state = MeanState(values.shape[1]), ArgmaxState(values.shape[1])
                mean_state.update(values)
                hist_state.update(values)
                population = len(combo.items)
                exact_top, exact_mean, exact_hist = exact[id(combo)]
                avg = estimate.for_mean(mean_state, population, np.arange(len(exact_mean)), None, True)
                top = rank(mean_state.finalize(), K)
                topk = estimate.for_mean(mean_state, population, top, K, True)
                arg = estimate.for_argmax(hist_state, population, True)
                inside = (avg.ci_low <= exact_mean) & (exact_mean <= avg.ci_high)
                rows.append({
                    "size": size, "n": len(chosen), "population": population,
                    "coverage": float(np.mean(inside)),
                    "est_precision": topk.expected,
                    "precision": metrics.PRECISION.score(top, exact_top),
                    "est_cosine": avg.expected,
                    "cosine": metrics.COSINE.score(mean_state.finalize(), exact_mean),
                    "est_js": arg.expected,
                    "js": metrics.JS.score(hist_state.finalize(), exact_hist)})
    return rows


def summarize(label: str, rows: list[dict]) -> None:
    if not rows:
        print(f"{label:<30} no query with 2+ matching items")
        return
    col = {key: np.array([r[key] for r in rows]) for key in rows[0]}
    corr = np.corrcoef(col["est_precision"], col["precision"])[0, 1]
    print(f"{label:<30} {len(rows):>6} {col['coverage'].mean():>9.3f} "
          f"{col['est_precision'].mean():>9.3f} {col['precision'].mean():>9.3f} {corr:>7.2f} "
          f"{col['est_cosine'].mean():>9.4f} {col['cosine'].mean():>9.4f} "
          f"{col['est_js'].mean():>8.3f} {col['js'].mean():>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=["random", "stratified", "maxmargin"])
    args = parser.parse_args()
    db = diagql.demo(progress=False)
    print(f"{'sampler':<30} {'queries':>6} {'coverage':>9} {'est prec':>9} {'precision':>9} "
          f"{'corr':>7} {'est cos':>9} {'cosine':>9} {'est JS':>8} {'JS':>8}")
    for name in args.samplers:
        if name not in samplers.REGISTRY:
            continue
        params = {"j": 0.7} if name in ("maxmargin", "gmm") else {}
        uniform = samplers.REGISTRY[name].uniform
        rows = run(db, name, params, args.sizes, args.seeds)
        for size in args.sizes:
            tag = "" if uniform else " *"
            summarize(f"{name}({size:g}){tag}", [r for r in rows if r["size"] == size])
    print("\ncoverage: share of neurons whose exact mean lies in the 95% interval (AVG);\n"
          "est prec / precision: expected vs actual top-10 precision, corr: their correlation\n"
          "over queries; est cos / cosine, est JS / JS: expected vs actual distances.\n"
          "* non-uniform sampler: DiagQL shows no estimate for it; the row shows why.")


if __name__ == "__main__":
    main()
