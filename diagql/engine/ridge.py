"""The assisted fit's ridge, chosen from the sample's own rows (docs/ARCHITECTURE.md,
"Estimates").

The fit's slope is shrunk by a ridge of RIDGE in whitened covariate units: about the
information of 10 items per component, chosen by measurement on the demo, where the latent
predicts each layer loosely. Where the covariates predict a layer almost exactly (a linear
layer inside a small transformer's block, fitted on the block's leading directions), the
same ridge leaves a slope partly shrunk along the directions the sample barely spans, and a
sampler that draws far from the matching items (gmm's and vas's outliers, maxmargin's
boundaries) leaves that part of its bias in the answer: on a tiny BERT's inner layers the
answers' mean cosine distance to the exact ones was 0.042, in some cells worse than the plain
sample mean's (0.52 against 0.036), where the same rows at a ridge of 0.001 missed by 0.0005.

So the fit's rows choose among RIDGES the one whose estimated mean squared error of the
groups' corrections, δᵀB, is least (``chosen``): the variance σ²·Σₖ sₖdₖ²/(sₖ + λ)² plus the
squared bias (λ·Σₖ dₖβₖ/(sₖ + λ))², β by least squares and its square unbiased (less
σ²·Σₖ λ²dₖ²/((sₖ + λ)²sₖ)), in the eigenbasis (sₖ) of the fit rows' centred covariates,
dₖ = eₖᵀδ. It is taken only where it promises less than MARGIN of RIDGE's error, averaged
over the groups and the neurons (each by its own spread): a choice made from the rows it is
judged on, which the standard errors do not carry, has to be clear. At half, a heavy-tailed
latent's heteroscedastic rows (tests/test_leverage.py) had covered 0.875 where RIDGE's
0.917, for 2% less error; at a tenth they take RIDGE, while the tiny BERT's inner layers'
answers came 27% nearer the exact ones (docs/ARCHITECTURE.md, "Estimates";
benchmarks/README.md, "twenty-fourth session").
"""
from __future__ import annotations

import numpy as np

# Chosen with the covariates' DIMS (engine/covariates.py): in whitened units, about the
# information of 10 items per component, which keeps a slope fitted on a handful of items
# near zero (the plain mean) and lets a slope fitted on hundreds speak.
RIDGE = 10.0
# The ridges a fit may take, RIDGE first; below it only (a larger one did not help the demo).
RIDGES = (RIDGE, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
# The share of RIDGE's estimated error another ridge has to promise (the docstring).
MARGIN = 0.1
# Rows beyond the covariates that least squares needs for its σ² (the criterion's).
SPARE_ROWS = 3
# The neurons the criterion averages over, at most: evenly spaced (a 150,528-wide layer's
# average is not worth 150,528 columns of products per ridge).
JUDGED = 2048


def chosen(szz: np.ndarray, szv: np.ndarray, svv: np.ndarray, free: int,
           deltas: list) -> float:
    """The ridge of a pooled fit (the module's docstring): ``szz`` (p × p), ``szv`` (p ×
    neurons) and ``svv`` (neurons) its fit rows' cross-products, each group centred; ``free``
    their count less one per group; ``deltas`` each group's δ = z̄_U − z̄_s (p)."""
    p = szz.shape[0]
    if p == 0 or free <= p + SPARE_ROWS or not deltas:
        return RIDGE
    if szv.shape[1] > JUDGED:
        columns = np.linspace(0, szv.shape[1] - 1, JUDGED).astype(np.int64)
        szv, svv = szv[:, columns], svv[columns]
    s, e = np.linalg.eigh(szz)
    if s.max(initial=0.0) <= 0:
        return RIDGE
    s = np.maximum(s, 1e-12 * s.max())
    projected = e.T @ szv  # p × neurons
    beta = projected / s[:, None]  # least squares, along each eigendirection
    rss = np.maximum(svv - (projected ** 2 / s[:, None]).sum(axis=0), 0.0)
    sigma2 = rss / (free - p)
    live = svv > 1e-12 * max(float(svv.max(initial=0.0)), 1e-300)
    if not live.any():
        return RIDGE
    spread = svv[live] / free
    d = np.stack([e.T @ np.asarray(delta, dtype=np.float64) for delta in deltas])  # G × p
    scores = []
    for ridge in RIDGES:
        shrunk = s + ridge
        variance = np.outer((d ** 2) @ (s / shrunk ** 2), sigma2)  # G × neurons
        bias = (ridge * d / shrunk) @ beta
        noise = np.outer((d ** 2) @ (ridge ** 2 / (shrunk ** 2 * s)), sigma2)
        error = variance + np.maximum(bias ** 2 - noise, 0.0)
        scores.append(float((error[:, live] / spread).mean()))
    best = int(np.argmin(scores))
    return RIDGES[best] if scores[best] < MARGIN * scores[0] else RIDGE
