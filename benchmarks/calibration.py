"""Are the accuracy estimates honest? Estimated against actual error, for every sampler.
(SIMILARITY's sampled CKA and its interval: benchmarks/calibration_similarity.py.)

    python benchmarks/calibration.py [--model demo|resnet|bottleneck] [--sizes 0.05 0.1 0.2]
                                     [--seeds 2] [--samplers random maxmargin ...]
                                     [--layers conv1 ...]

For every layer × class × {correct, incorrect} combination with at least 2 matching sampled
items, each sampler, size and seed, and each estimator (assisted: the default, engine/
regression.py; plain: the sample mean), the query of that one cell as DiagQL answers it: the
AVG query's 95% intervals (coverage = share of neurons whose exact mean lies inside), the
TOPK-10 query's expected precision against its actual precision (mean of each, and their
correlation over queries), and the expected against the actual cosine and JS distances. The
estimates come from diagql.engine.estimate on the same aggregate states the engine builds (with
the covariates' sums); the exact answers from all matching items. ``resnet`` is
benchmarks/second_model.py's CNN; ``bottleneck`` benchmarks/bottleneck_model.py's untrained MLP
(its body layers by default).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diagql import samplers
from diagql.engine import estimate, extrapolation, planner
from diagql.engine.aggregates import ArgmaxState, MeanState, rank
from diagql.engine.covariates import for_view
from diagql.engine.leverage import row_weights
from diagql.engine.regression import RIDGE
from diagql.evaluate.bind import default_layers
from diagql.language.binder import layers_before
from diagql.model.views import View
from diagql.results import metrics
from truth import combinations, exact_answers, layer_truth

K = 10
DRAWS = 200  # Monte Carlo draws of the truth for a query's precision noise (ceiling below)
ESTIMATORS = ("assisted", "plain")
# Each sampler as the paper evaluates it (j = 0.7 for the two-ended ones).
PARAMS = {"maxmargin": {"j": 0.7}, "gmm": {"j": 0.7}}


def connect(model: str):
    if model == "demo":
        import diagql

        return diagql.demo(progress=False)
    if model == "bottleneck":
        import bottleneck_model

        return bottleneck_model.connect(progress=False)
    import second_model

    return second_model.connect(progress=False)


def bottleneck_layers() -> list:
    import bottleneck_model

    return bottleneck_model.LAYERS


def run(db, name: str, sizes, seeds: int, layers) -> list[dict]:
    truths = {layer: layer_truth(db, layer) for layer in layers}
    combos = combinations(db, layers)
    exact = exact_answers(combos, truths, K)  # once: the same for every size and seed
    profile = db.profile
    # Each layer's covariates and block prediction, as its queries have them.
    per_layer = {layer: for_view(profile, View(db.catalog[layer]).key,
                                 before=layers_before(db.catalog, layer),
                                 upstream=db.catalog.upstream(layer)) for layer in layers}
    # And what each layer's fit is checked on (engine/extrapolation.py), as the planner does.
    checks = {layer: extrapolation.check_for(profile, layer, cov)
              for layer, cov in per_layer.items()}
    data = samplers.SampleData(profile.latents, profile.labels, profile.predictions,
                               profile.n_classes)
    cls = samplers.sampler_class(name)
    uniform = cls.uniform
    rows = []
    rng = np.random.default_rng(0)
    for size in sizes:
        for seed in range(seeds):
            params = dict(PARAMS.get(name, {}))
            if "size" in {p.name for p in cls.params()}:
                params["size"] = size
            sample = cls(random_state=seed, **params).fit(data).indices_
            in_sample = np.zeros(len(profile), dtype=bool)
            in_sample[sample] = True
            for combo in combos:
                chosen = combo.items[in_sample[combo.items]]
                if len(chosen) < 2:
                    continue
                truth = truths[combo.layer]
                cov = per_layer[combo.layer]
                z = cov.z
                prediction = cov.prediction()
                values = torch.from_numpy(truth.activations[chosen].astype(np.float64))
                zc = torch.from_numpy(z.rows(chosen))
                mean_state = MeanState(values.shape[1], covariates=z.width,
                                       prediction=prediction)
                hist_state = ArgmaxState(values.shape[1], covariates=z.width,
                                         prediction=prediction)
                population = len(combo.items)
                z_pop = z.means(combo.items, None, {None: population})
                # Each row's leverage weights, as the engine's Reducer gives them.
                p = z.width if prediction is None else prediction.p
                weights = row_weights(z.rows(chosen, p), None, [z_pop[None][:p]], None, RIDGE)
                mean_state.update(values, z=zc, weights=torch.from_numpy(weights))
                hist_state.update(values, z=zc)
                winner_shares = planner.winner_shares(
                    profile.winners_of(View(db.catalog[combo.layer])), combo.items, None,
                    {None: population}, values.shape[1])
                exact_top, exact_mean, exact_hist = exact[id(combo)]
                check = checks[combo.layer]
                widened = None if check is None else extrapolation.widening(
                    check, z, chosen, None, combo.items, {None: population}, z_pop)
                fit_mean = estimate.fit({None: mean_state}, {None: population}, z_pop,
                                        prediction, widened=widened)
                if uniform and estimate.refused(fit_mean, {None: mean_state}, {None: population}):
                    fit_mean = {None: None}  # the sample mean answers (answers.build_result)
                fits = {"assisted": (fit_mean[None],
                                     estimate.fit({None: hist_state}, {None: population}, z_pop,
                                                  prediction, winner_shares)[None]),
                        "plain": (None, None)}
                for which, (fit_mean, fit_hist) in fits.items():
                    answer = mean_state.finalize() if fit_mean is None else fit_mean.mean
                    share = hist_state.finalize() if fit_hist is None else estimate.shares(
                        fit_hist)
                    avg = estimate.for_mean(mean_state, population, np.arange(len(answer)),
                                            None, uniform, fit_mean)
                    k = min(K, len(answer))  # TOPK 3 of a 3-wide bottleneck, as DiagQL asks
                    top = rank(answer, k)
                    topk = estimate.for_mean(mean_state, population, top, k, uniform, fit_mean)
                    arg = estimate.for_argmax(hist_state, population, uniform, fit_hist)
                    inside = (avg.ci_low <= exact_mean) & (exact_mean <= avg.ci_high)
                    # The reported top-k's own intervals, which their selection biases.
                    held = np.nan if topk.ci_low is None else float(np.mean(
                        (topk.ci_low <= exact_mean[top]) & (exact_mean[top] <= topk.ci_high)))
                    se = (estimate._plain_se(mean_state, population) if fit_mean is None
                          else fit_mean.se)
                    rows.append({
                        "size": size, "seed": seed, "estimator": which, "layer": combo.layer,
                        "label": combo.label, "correct": combo.correct, "n": len(chosen),
                        "population": population, "reliable": avg.reliable,
                        # The assisted answers of a view the profile holds are exact
                        # (engine/covariates.py: _held), and so is an ARGMAX wherever the
                        # profile knows every item's winner: no estimate to calibrate.
                        "exact": which == "assisted" and cov.exact,
                        "exact_argmax": which == "assisted" and winner_shares is not None,
                        "coverage": float(np.mean(inside)),
                        "topk_coverage": held,
                        "est_precision": topk.expected,
                        "precision": metrics.PRECISION.score(top, exact_top),
                        "precision_noise": precision_noise(
                            answer, estimate._constant_floor(se, len(chosen)), top, rng),
                        "est_cosine": avg.expected,
                        "cosine": metrics.COSINE.score(answer, exact_mean),
                        "est_js": arg.expected,
                        "js": metrics.JS.score(share, exact_hist)})
    return rows


def precision_noise(mean: np.ndarray, se: np.ndarray, top: np.ndarray,
                    rng: np.random.Generator) -> float:
    """The variance of a query's actual top-k precision if the truth were drawn as its
    estimate says (each neuron's true mean from N(mean, se²)): the part of the actual precision
    that no estimate made before seeing the truth can predict."""
    k = len(top)  # K, or every neuron of a layer narrower than K
    draws = mean + rng.standard_normal((DRAWS, len(mean))) * se
    truth_top = np.argpartition(-draws, k - 1, axis=1)[:, :k]
    reported = np.zeros(len(mean), dtype=bool)
    reported[top] = True
    return float((reported[truth_top].sum(axis=1) / k).var())


def ceiling(est: np.ndarray, noise: np.ndarray) -> float:
    """The correlation a perfectly calibrated expected precision reaches over these queries:
    actual = expected + noise of the given variances, so corr = sd(expected) / sd(actual). Where
    the queries' expected precisions spread little (most near 1), even an honest estimate
    correlates weakly with the 0.1-step actual precision."""
    spread = est.var()
    return float(np.sqrt(spread / (spread + noise.mean()))) if spread > 0 else float("nan")


HEADER = (f"{'sampler':<22} {'estimator':<9} {'queries':>7} {'exact':>5} {'coverage':>8} "
          f"{'top cov':>7} {'est prec':>8} "
          f"{'precision':>9} {'corr':>5} {'ceil':>5} {'est cos':>8} {'cosine':>8} {'est JS':>7} "
          f"{'JS':>7}")


def summarize(label: str, rows: list[dict]) -> dict | None:
    if not rows:
        print(f"{label:<22} no query with 2+ matching items")
        return None
    every = {key: np.array([r[key] for r in rows]) for key in rows[0]}
    exact = every["exact"]
    # The figures of the queries with an estimate to calibrate.
    col = {key: values[~exact] for key, values in every.items()} if not exact.all() else every
    spread = col["est_precision"].std() > 0 and col["precision"].std() > 0
    corr = np.corrcoef(col["est_precision"], col["precision"])[0, 1] if spread else float("nan")
    flag = "" if rows[0]["reliable"] else " *"
    # ARGMAX's columns leave out the queries whose shares are exact (every winner known).
    js_rows = ~every["exact_argmax"]
    out = {"queries": len(rows), "exact": int(exact.sum()), "coverage": col["coverage"].mean(),
           "topk_coverage": np.nanmean(col["topk_coverage"]) if
           np.isfinite(col["topk_coverage"]).any() else float("nan"),
           "est_precision": col["est_precision"].mean(), "precision": col["precision"].mean(),
           "corr": corr, "ceiling": ceiling(col["est_precision"], col["precision_noise"]),
           "est_cosine": col["est_cosine"].mean(), "cosine": col["cosine"].mean(),
           "est_js": every["est_js"][js_rows].mean() if js_rows.any() else float("nan"),
           "js": every["js"][js_rows].mean() if js_rows.any() else float("nan")}
    print(f"{label:<22} {rows[0]['estimator'] + flag:<9} {out['queries']:>7} {out['exact']:>5} "
          f"{out['coverage']:>8.3f} {out['topk_coverage']:>7.3f} {out['est_precision']:>8.3f} "
          f"{out['precision']:>9.3f} "
          f"{corr:>5.2f} {out['ceiling']:>5.2f} {out['est_cosine']:>8.4f} {out['cosine']:>8.4f} {out['est_js']:>7.3f} "
          f"{out['js']:>7.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo", "resnet", "bottleneck"], default="demo")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--samplers", nargs="+", default=list(samplers.REGISTRY))
    parser.add_argument("--layers", nargs="+", help="default: the model's top-level blocks")
    parser.add_argument("--dump", help="also write every query's row to this pickle file")
    args = parser.parse_args()
    started = time.perf_counter()
    db = connect(args.model)
    layers = args.layers or (bottleneck_layers() if args.model == "bottleneck" else
                             default_layers(db))
    print(f"{args.model}: layers {', '.join(layers)}; {args.seeds} seeds\n{HEADER}")
    verdicts, dumped = [], {}
    for name in args.samplers:
        rows = run(db, name, args.sizes, args.seeds, layers)
        dumped[name] = rows
        sizes = args.sizes if name != "ebtree" else args.sizes[:1]  # its size is its own
        for size in sizes:
            for which in ESTIMATORS:
                label = f"{name}({size:g})" if name != "ebtree" else "ebtree"
                out = summarize(label, [r for r in rows
                                        if r["size"] == size and r["estimator"] == which])
                if out is not None and which == "assisted":
                    verdicts.append((label, out))
    print("\ncoverage: share of neurons whose exact mean lies in the 95% interval (AVG);\n"
          "top cov: the same of the reported top-10's intervals (TOPK);\n"
          "est prec / precision: expected vs actual top-10 precision, corr: their correlation\n"
          "over queries; ceil: the correlation a perfectly calibrated estimate would reach over\n"
          "the same queries (their precision's own noise, drawn as the estimate models it);\n"
          "est cos / cosine, est JS / JS: expected vs actual distances.\n"
          "exact: queries answered exactly (assisted, on a view the profile holds: the latent,\n"
          "the logits, a block its directions span), left out of the other columns; est JS /\n"
          "JS also leave out the ARGMAX queries whose every winner the profile knows (exact;\n"
          "nan: all of them were).\n"
          "* the plain estimator of a non-uniform sampler: DiagQL shows no estimate for it.")
    print("\ntargets (assisted): coverage 0.90-0.98, |est prec - precision| <= 0.03, "
          "corr >= 0.85, est cos and est JS within 25% of the actual")
    for label, out in verdicts:
        misses = []
        for key in ("coverage", "topk_coverage"):
            if not np.isnan(out[key]) and not 0.90 <= out[key] <= 0.98:
                misses.append(f"{key.replace('_', ' ')} {out[key]:.3f}")
        if abs(out["est_precision"] - out["precision"]) > 0.03:
            misses.append(f"precision off by {out['est_precision'] - out['precision']:+.3f}")
        if not out["corr"] >= 0.85:
            misses.append(f"corr {out['corr']:.2f} (ceiling {out['ceiling']:.2f})")
        for key in ("cosine", "js"):
            if np.isnan(out[f"est_{key}"]):
                continue  # every such query was exact
            if abs(out[f"est_{key}"] / max(out[key], 1e-12) - 1) > 0.25:
                misses.append(f"est {key} {out[f'est_{key}'] / max(out[key], 1e-12):.2f}x")
        print(f"  {label:<22} {'met' if not misses else 'missed: ' + ', '.join(misses)}")
    if args.dump:
        import pickle

        with open(args.dump, "wb") as f:
            pickle.dump(dumped, f)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
