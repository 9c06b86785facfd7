"""Is a sample's CKA honest? Plain against debiased CKA, and the jackknife interval's coverage,
on the demo.

    python benchmarks/calibration_similarity.py [--sizes 0.05 0.1 0.2] [--seeds 10]
                                                [--samplers random stratified maxmargin]

Every layer's output is collected once for all 2,500 digits (plain torch hooks); the exact
linear CKA of every pair of the demo's five blocks (conv1, conv2, fc1, fc2, fc3: ten pairs)
comes from all of them. For each sampler, size and seed, the sampled items' rows give, per
pair: the plain CKA of the sample, the debiased CKA that SIMILARITY ... USING SAMPLE answers
(diagql.engine.cka.debiased_matrix: Song et al.'s unbiased HSIC) and its 95% delete-one
jackknife interval (finite-population corrected). Reported: the mean absolute error of each
estimator, the debiased one's mean signed error (its bias), the share of intervals that hold
the exact CKA (coverage; 0.95 is calibrated) and the mean interval width. A sampler that does
not draw uniformly (maxmargin) is scored too: its interval is not shown by DiagQL, and this is
why.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import diagql
from diagql import samplers
from diagql.engine.cka import MomentState, debiased_matrix, plain_matrix

LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def layer_rows(db) -> list[np.ndarray]:
    """Every item's output of each layer, flattened, float64."""
    modules = dict(db.model.named_modules())
    got = {name: [] for name in LAYERS}
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: got[name].append(out.flatten(1).double().numpy()))
        for name in LAYERS]
    X = torch.as_tensor(db.data[0])  # the demo's data is the pair (X, y)
    try:
        with torch.inference_mode():
            db.model.eval()
            for start in range(0, len(X), 500):
                db.model(X[start:start + 500])
    finally:
        for handle in handles:
            handle.remove()
    return [np.concatenate(got[name]) for name in LAYERS]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--samplers", nargs="+", default=["random", "stratified", "maxmargin"])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    db = diagql.demo(progress=False, cache_dir=False)
    rows = layer_rows(db)
    n = len(rows[0])
    exact_state = MomentState([r.shape[1] for r in rows])
    for start in range(0, n, 500):
        exact_state.update(*(torch.from_numpy(r[start:start + 500]) for r in rows))
    exact = exact_state.matrix()
    upper = np.triu_indices(len(LAYERS), 1)
    profile = db.profile
    data = samplers.SampleData(profile.latents, profile.labels, profile.predictions,
                               profile.n_classes)
    table = []
    for name in args.samplers:
        cls = samplers.sampler_class(name)
        for size in args.sizes:
            plain_err, debiased_err, signed, covered, widths = [], [], [], [], []
            for seed in range(args.seeds):
                items = cls(size=size, random_state=seed).fit(data).indices_
                sample = [r[items] - r[items].mean(axis=0) for r in rows]
                value, low, high = debiased_matrix(sample, population=n)
                plain = plain_matrix(sample)
                truth = exact[upper]
                plain_err += list(np.abs(plain[upper] - truth))
                debiased_err += list(np.abs(value[upper] - truth))
                signed += list(value[upper] - truth)
                covered += list((low[upper] <= truth) & (truth <= high[upper]))
                widths += list(high[upper] - low[upper])
            table.append([name, f"{size:.0%}", f"{len(items):,}", len(plain_err),
                          f"{np.mean(plain_err):.4f}", f"{np.mean(debiased_err):.4f}",
                          f"{np.mean(signed):+.4f}", f"{np.mean(covered):.2f}",
                          f"{np.mean(widths):.4f}"])
            print(" | ".join(map(str, table[-1])), flush=True)
    print("\nSampled CKA against the exact CKA of the ten pairs of conv1, conv2, fc1, fc2, fc3 "
          f"over the demo's {n:,} digits\n")
    columns = ["sampler", "size", "items", "pairs x seeds", "plain abs err", "debiased abs err",
               "debiased bias", "95% coverage", "mean width"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in table:
        print("| " + " | ".join(map(str, row)) + " |")
    exact_text = ", ".join(f"{LAYERS[i]}-{LAYERS[j]} {exact[i, j]:.3f}" for i, j in zip(*upper))
    print(f"\nexact CKA: {exact_text}")
    print(f"\nbenchmarks/calibration_similarity.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
