"""Issue 15's block auxiliaries, measured before they were built: S1/S2/S3 per layer of the
EVALUATE workload (every layer × class × correctness cell, top-10) with auxiliaries nearer the
queried layer than the latent.

    python benchmarks/block_auxiliaries.py demo|resnet [--seeds 1] [--samplers maxmargin stratified]
    python benchmarks/block_auxiliaries.py cost [--n 100000]   # the profile pass with and without

Each layer's auxiliary is its own top-k principal directions V (fitted on the first 2,000
items, as a profile pass would) and every item's projection z = Vᵀ(y − μ). Estimators of one
cell's mean, fitted on that cell's sampled items as its query is:

- ``plain``: the sample mean.
- ``latent``: today's assisted estimator (10 whitened latent PCs, ridge 10).
- ``fit k``: the k block PCs, whitened, as the covariates of the same ridge fit.
- ``diff k``: the known-coefficient difference estimator ȳ_s + V(z̄_U − z̄_s): no slope is
  fitted; for ARGMAX the same with each item's predicted winner argmax(μ + V z)
  (histogram_U(predicted) + histogram_s(actual) − histogram_s(predicted)).
- ``inner``: a layer inside a block (not one itself) fitted on its enclosing block's k=16 PCs.

``cost``: the profile pass over bigdata.py's items (the demo's model, 1 torch thread) with and
without the block projections, alternately, and the bytes per item they add.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from truth import layer_truth

import diagql
from diagql import samplers
from diagql.engine.covariates import covariates
from diagql.engine.estimate import shares
from diagql.engine.groups import cell_codes
from diagql.engine.regression import corrected_mean
from diagql.evaluate.bind import default_layers
from diagql.model import auxiliaries
from diagql.results.metrics import COSINE, JS

K = 10
FIT_ITEMS = 2000
INNER = {"demo": {"conv1.0": "conv1", "conv2.0": "conv2"},
         "resnet": {"block1.body.2": "block1", "block2.body.2": "block2",
                    "stem.0": "stem"}}


def principal(rows: np.ndarray, k: int):
    """μ, V (d × k) from the first FIT_ITEMS rows; z (N × k) for every row."""
    mu, v = (t.numpy() for t in auxiliaries.principal(torch.from_numpy(rows[:FIT_ITEMS]), k))
    return mu, v, (rows - mu) @ v


def top(vector, k):
    return set(np.argsort(-vector, kind="stable")[:k].tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["demo", "resnet", "cost"])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--samplers", nargs="+", default=["maxmargin", "stratified"])
    parser.add_argument("--ks", nargs="+", type=int, default=[8, 16, 32, 64])
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.model == "cost":
        return cost(args.n)
    if args.model == "demo":
        db = diagql.demo(progress=False)
    else:
        import second_model
        db = second_model.connect(progress=False)
    prof = db.profile
    layers = default_layers(db)
    inner = INNER[args.model]
    rows = {name: layer_truth(db, name).activations.astype(np.float64)
            for name in [*layers, *inner]}
    cells = cell_codes(prof.labels, prof.correct)
    valid = np.unique(cells)
    zl = covariates(prof)
    aux = {}
    for name in layers:
        started = time.perf_counter()
        mu, v, z = principal(rows[name], max(args.ks))
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        (rows[name] - mu) @ v
        proj_s = time.perf_counter() - started
        aux[name] = (mu, v, z)
        width = rows[name].shape[1]
        share = {k: 1 - ((rows[name] - mu - z[:, :k] @ v[:, :k].T) ** 2).sum()
                 / ((rows[name] - mu) ** 2).sum() for k in args.ks}
        print(f"{name}: {width} neurons; PCA of {FIT_ITEMS} items {fit_s:.2f} s; projection "
              f"{proj_s / len(prof) * 1e6:.1f} µs/item (k={max(args.ks)}); variance explained "
              + ", ".join(f"k={k} {s:.3f}" for k, s in share.items()), flush=True)
    data = samplers.SampleData(prof.latents, prof.labels, prof.predictions, prof.n_classes)
    for sampler in args.samplers:
        samples = [samplers.sampler_class(sampler)(size=0.05, random_state=s).fit(data).indices_
                   for s in range(args.seeds)]
        print(f"\n{args.model} {sampler}(0.05), {args.seeds} seed(s): S1 / S2 / S3 per layer")
        for name in [*layers, *inner]:
            y = rows[name]
            winners = y.argmax(axis=1)
            n_neurons = y.shape[1]
            block = inner.get(name, name)
            mu, v, zb = aux[block]
            methods = ["plain", "latent"] + [f"fit {k}" for k in args.ks]
            if name in layers:
                methods += [f"diff {k}" for k in args.ks] + [f"diff {k}+latent" for k in args.ks]
            pred_win = {}
            if name in layers:
                for k in args.ks:
                    pred_win[k] = np.concatenate([
                        (mu + zb[a:a + 5000, :k] @ v[:, :k].T).argmax(axis=1)
                        for a in range(0, len(y), 5000)])
            tallies = {m: ([], [], []) for m in methods}
            for sample in samples:
                for g in valid:
                    pop = np.flatnonzero(cells == g)
                    s = sample[cells[sample] == g]
                    exact = y[pop].mean(axis=0)
                    exact_h = np.bincount(winners[pop], minlength=n_neurons) / len(pop)
                    kk = min(K, n_neurons)
                    for m in methods:
                        if len(s) == 0:
                            est, hist = None, None
                        else:
                            est, hist = estimate(m, y, winners, s, pop, zl, zb, v, mu, pred_win,
                                                 n_neurons)
                        t1, t2, t3 = tallies[m]
                        if est is None:
                            t1.append(0.0); t2.append(1.0); t3.append(1.0)
                            continue
                        t1.append(len(top(est, kk) & top(exact, kk)) / kk)
                        t2.append(float(COSINE.rows(est[None], exact[None])[0]))
                        t3.append(float(JS.rows(hist[None], exact_h[None])[0]))
            print(f"  {name:<14}" + "  ".join(
                f"{m}: {np.mean(t[0]):.3f}/{np.mean(t[1]):.4f}/{np.mean(t[2]):.3f}"
                for m, t in tallies.items()), flush=True)


def cost(n: int) -> None:
    """Seconds of the profile pass with and without the projections, best of 2 each."""
    from bigdata import big_connection

    torch.set_num_threads(1)
    conn = big_connection(n, progress=False)
    assert conn.catalog is not None  # probed before either pass is timed
    found = auxiliaries.blocks
    seconds = {True: [], False: []}
    for _ in range(2):
        for keep in (False, True):
            auxiliaries.blocks = found if keep else (lambda model, catalog: [])
            started = time.perf_counter()
            profile = conn.artifacts._compute_profile()
            seconds[keep].append(time.perf_counter() - started)
            if keep:
                kept = profile.auxiliaries
    auxiliaries.blocks = found
    on, off = min(seconds[True]), min(seconds[False])
    z_bytes = sum(a.z.nbytes for a in kept)
    fixed = sum(a.basis.nbytes + a.mean.nbytes for a in kept)
    print(f"{n:,} items, blocks {', '.join(a.layer for a in kept)}: profile pass {off:.2f} s "
          f"without, {on:.2f} s with the projections (+{on - off:.2f} s, "
          f"{(on - off) / off:+.0%}; {(on - off) / n * 1e6:.1f} µs/item); "
          f"{z_bytes / n:.0f} bytes/item ({z_bytes / 2 ** 20:.0f} MiB) + {fixed / 2 ** 20:.1f} MiB "
          f"of bases; latents {profile.latents.nbytes / n:.0f} bytes/item")
    # A first-time 5% sample query (new seed each: its rows go through the model) with the
    # block prediction and without it (the latent alone), alternately.
    from diagql.model.profile import Profile

    conn.artifacts.profile = profile
    held = Profile.auxiliary
    for layer in ("conv1", "fc1"):
        totals = {True: [], False: []}
        for seed in range(2):
            for keep in (False, True):
                Profile.auxiliary = held if keep else (lambda self, key: None)
                started = time.perf_counter()
                r = conn.query(f"AVG NEURONS IN {layer} USING SAMPLE "
                               f"random(0.05, random_state={100 + 2 * seed + keep})")
                totals[keep].append((time.perf_counter() - started,
                                     r.timings.get("estimate", 0.0)))
        Profile.auxiliary = held
        on, off = min(totals[True]), min(totals[False])
        print(f"AVG NEURONS IN {layer} USING SAMPLE random(0.05), first time: {off[0]:.3f} s "
              f"with the latent's covariates, {on[0]:.3f} s with the block prediction "
              f"(+{on[0] - off[0]:.3f} s; estimate {off[1]:.3f} -> {on[1]:.3f} s)")
    print(f"load average {os.getloadavg()[0]:.1f}")


def estimate(method, y, winners, s, pop, zl, zb, v, mu, pred_win, n_neurons):
    rows = y[s]
    onehot = np.zeros((len(s), n_neurons))
    onehot[np.arange(len(s)), winners[s]] = 1.0
    if method == "plain" or (len(s) < 2 and not method.startswith("diff")):
        return rows.mean(axis=0), onehot.mean(axis=0)
    if method == "latent":
        z, zu = zl[s], zl[pop].mean(axis=0)
        return corrected_mean(rows, z, zu), shares(corrected_mean(onehot, z, zu))
    k = int(method.split()[1].split("+")[0])
    if method.startswith("fit"):
        spread = zb[:, :k].std(axis=0)
        z, zu = zb[s, :k] / spread, zb[pop, :k].mean(axis=0) / spread
        return corrected_mean(rows, z, zu), shares(corrected_mean(onehot, z, zu))
    vk = v[:, :k]
    mean = rows.mean(axis=0) + vk @ (zb[pop, :k].mean(axis=0) - zb[s, :k].mean(axis=0))
    pw = pred_win[k]
    hist = (np.bincount(pw[pop], minlength=n_neurons) / len(pop) + onehot.mean(axis=0)
            - np.bincount(pw[s], minlength=n_neurons) / len(s))
    if method.endswith("+latent") and len(s) >= 2:
        resid = rows - (mu + zb[s, :k] @ vk.T)
        z, zu = zl[s], zl[pop].mean(axis=0)
        fitted = corrected_mean(resid, z, zu)
        mean = mu + vk @ zb[pop, :k].mean(axis=0) + fitted
        pred_onehot = np.zeros_like(onehot)
        pred_onehot[np.arange(len(s)), pw[s]] = 1.0
        hist = np.bincount(pw[pop], minlength=n_neurons) / len(pop) + corrected_mean(
            onehot - pred_onehot, z, zu)
    return mean, shares(hist)


if __name__ == "__main__":
    main()
