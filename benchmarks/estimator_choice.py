"""How the assisted estimator's covariates, ridge and pooling were chosen: S1/S2 of its answers
on the EVALUATE workload (every layer × class × correctness cell, top-10), 3 seeds at 5%.

    python benchmarks/estimator_choice.py demo|resnet

For p ∈ {5, 10, 20} whitened principal components of the latent and an absolute ridge
λ ∈ {1, 3, 10}: the slope fitted on each cell's own sampled items ("cell": what a query of one
cell gets) or pooled over the whole sample with each cell centred ("all": what a query over
many groups gets). Figures in benchmarks/README.md.
"""
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from truth import layer_truth

import diagql
from diagql import samplers
from diagql.engine.groups import cell_codes
from diagql.evaluate.bind import default_layers
from diagql.samplers.space import fit_space

which = sys.argv[1]
if which == "demo":
    db = diagql.demo(progress=False)
else:
    import second_model
    db = second_model.connect(progress=False)
prof = db.profile
layers = default_layers(db)
truths = {l: layer_truth(db, l).activations.astype(np.float64) for l in layers}
cells = cell_codes(prof.labels, prof.correct)
ucells = np.unique(cells)
data = samplers.SampleData(prof.latents, prof.labels, prof.predictions, prof.n_classes)
K = 10
def aux(p):
    Z = fit_space(prof.latents, p)(prof.latents)
    Z = Z[:, :p]
    return Z / Z.std(axis=0)
AUX = {p: aux(p) for p in (5, 10, 20, 40)}
exact = {}
for l in layers:
    A = truths[l]
    exact[l] = {g: A[cells == g].mean(0) for g in ucells}

def cos(a, b):
    return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300)

def score(est):  # est[l][g] -> vector or None
    s1, s2 = {l: [] for l in layers}, {l: [] for l in layers}
    for l in layers:
        for g in ucells:
            e = est[l].get(g)
            t = exact[l][g]
            if e is None:
                s1[l].append(0); s2[l].append(1); continue
            k = min(K, len(t))
            s1[l].append(len(set(np.argsort(-e, kind="stable")[:k]) & set(np.argsort(-t, kind="stable")[:k])) / k)
            s2[l].append(cos(e, t))
    return s1, s2

def estimates(S, p, lam, pool):
    out = {}
    Z = AUX[p] if p else None
    for l in layers:
        Y = truths[l][S]
        cs = cells[S]
        out[l] = {}
        if p and pool == "all":
            Zc = Z[S].copy(); Yc = Y.copy()
            for g in np.unique(cs):
                m = cs == g
                Zc[m] -= Zc[m].mean(0); Yc[m] -= Yc[m].mean(0)
            B = np.linalg.solve(Zc.T @ Zc + lam * np.eye(p), Zc.T @ Yc)
        for g in np.unique(cs):
            m = cs == g
            ybar = Y[m].mean(0)
            if not p:
                out[l][g] = ybar; continue
            zs = Z[S][m]; dz = Z[cells == g].mean(0) - zs.mean(0)
            if pool == "cell":
                if m.sum() < 2:
                    out[l][g] = ybar; continue
                zc = zs - zs.mean(0); yc = Y[m] - ybar
                Bg = np.linalg.solve(zc.T @ zc + lam * np.eye(p), zc.T @ yc)
                out[l][g] = ybar + dz @ Bg
            else:
                out[l][g] = ybar + dz @ B
    return out

configs = [(0, 0, None)] + [(p, lam, pool) for pool in ("all", "cell") for p in (5, 10, 20) for lam in (1.0, 3.0, 10.0)]
for name, params in [("maxmargin", {}), ("stratified", {}), ("gmm", {})]:
    for size in (0.05,):
        samples = [samplers.sampler_class(name)(size=size, random_state=s, **params).fit(data).indices_ for s in range(3)]
        for p, lam, pool in configs:
            S1 = {l: [] for l in layers}; S2 = {l: [] for l in layers}
            for S in samples:
                a, b = score(estimates(S, p, lam, pool))
                for l in layers:
                    S1[l] += a[l]; S2[l] += b[l]
            tot1 = np.mean([np.mean(S1[l]) for l in layers]); tot2 = np.mean([np.mean(S2[l]) for l in layers])
            per = " ".join(f"{l}:{np.mean(S1[l]):.3f}/{np.mean(S2[l]):.4f}" for l in layers)
            print(f"{which} {name}({size}) p={p} lam={lam} pool={pool}: S1 {tot1:.3f} S2 {tot2:.4f} | {per}", flush=True)
