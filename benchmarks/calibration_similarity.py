"""Is a sample's CKA honest? Plain against estimated CKA, and the jackknife interval's
coverage, on the demo.

    python benchmarks/calibration_similarity.py [--sizes 0.05 0.1 0.2] [--seeds 10]
                                                [--samplers random stratified maxmargin]
                                                [--where-class C]

Every layer's output is collected once for all 2,500 digits (plain torch hooks); the exact
linear CKA of every pair of the demo's five blocks (conv1, conv2, fc1, fc2, fc3: ten pairs)
comes from all of them (or, with ``--where-class C``, from the digits labelled C, as
``SIMILARITY ... WHERE class = C`` answers). For each sampler, size and seed, the sampled
matching items' rows give, per pair: the plain CKA of the sample; Song et al.'s unbiased-HSIC
CKA, which targets an infinite population, with its interval; and the estimate that
SIMILARITY ... USING SAMPLE answers (diagql.engine.cka.debiased_matrix with the matching items'
count: each HSIC unbiased for those items) and its 95% delete-one jackknife interval
(finite-population corrected). Reported: each estimator's mean absolute error, the answer's
mean signed error (its bias), the share of intervals that hold the exact CKA (coverage; 0.95
is calibrated) and the answer's mean interval width. A sampler that does not draw uniformly
(maxmargin) is scored too: its interval is not shown by DiagQL, and this is why.
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
    parser.add_argument("--where-class", type=int, default=None,
                        help="the matching items: the digits of this class (default: all)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    db = diagql.demo(progress=False, cache_dir=False)
    profile = db.profile
    matching = np.arange(len(profile.labels)) if args.where_class is None else \
        np.flatnonzero(profile.labels == args.where_class)
    rows = [r[matching] for r in layer_rows(db)]
    n = len(rows[0])
    exact_state = MomentState([r.shape[1] for r in rows])
    for start in range(0, n, 500):
        exact_state.update(*(torch.from_numpy(r[start:start + 500]) for r in rows))
    exact = exact_state.matrix()
    upper = np.triu_indices(len(LAYERS), 1)
    data = samplers.SampleData(profile.latents, profile.labels, profile.predictions,
                               profile.n_classes)
    table = []
    for name in args.samplers:
        cls = samplers.sampler_class(name)
        for size in args.sizes:
            plain_err, song_err, song_covered = [], [], []
            debiased_err, signed, covered, widths = [], [], [], []
            for seed in range(args.seeds):
                drawn = cls(size=size, random_state=seed).fit(data).indices_
                items = np.flatnonzero(np.isin(matching, drawn))  # positions among matching
                sample = [r[items] - r[items].mean(axis=0) for r in rows]
                value, low, high = debiased_matrix(sample, population=n)
                song, song_low, song_high = debiased_matrix(sample, population=None)
                plain = plain_matrix(sample)
                truth = exact[upper]
                plain_err += list(np.abs(plain[upper] - truth))
                song_err += list(np.abs(song[upper] - truth))
                song_covered += list((song_low[upper] <= truth) & (truth <= song_high[upper]))
                debiased_err += list(np.abs(value[upper] - truth))
                signed += list(value[upper] - truth)
                covered += list((low[upper] <= truth) & (truth <= high[upper]))
                widths += list(high[upper] - low[upper])
            table.append([name, f"{size:.0%}", f"{len(items):,}", len(plain_err),
                          f"{np.mean(plain_err):.4f}", f"{np.mean(song_err):.4f}",
                          f"{np.mean(song_covered):.2f}", f"{np.mean(debiased_err):.4f}",
                          f"{np.mean(signed):+.4f}", f"{np.mean(covered):.2f}",
                          f"{np.mean(widths):.4f}"])
            print(" | ".join(map(str, table[-1])), flush=True)
    over = f"the demo's {n:,} digits" if args.where_class is None else \
        f"the demo's {n:,} digits of class {args.where_class}"
    print("\nSampled CKA against the exact CKA of the ten pairs of conv1, conv2, fc1, fc2, fc3 "
          f"over {over}\n")
    columns = ["sampler", "size", "items", "pairs x seeds", "plain abs err", "Song abs err",
               "Song coverage", "answer abs err", "answer bias", "95% coverage", "mean width"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in table:
        print("| " + " | ".join(map(str, row)) + " |")
    exact_text = ", ".join(f"{LAYERS[i]}-{LAYERS[j]} {exact[i, j]:.3f}" for i, j in zip(*upper))
    print(f"\nexact CKA: {exact_text}")
    print(f"\nbenchmarks/calibration_similarity.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
