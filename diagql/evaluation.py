"""The paper's workload benchmark: how well a sampler answers every query of the S1, S2 and S3
query sets (DESIGN section 6), measured against the exact answers.

For every layer × true class × {correct, incorrect} combination with at least one matching
item, the top-k neurons (S1, precision), the mean activation vector (S2, cosine distance) and
the distribution of maximally activated neurons (S3, Jensen-Shannon distance) are computed on
the sample and on all items; a query set's score is the mean over the combinations. A sample
with no matching item for a combination scores precision 0 and distances 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics, samplers
from .aggregates import rank
from .data import call_model, to_device
from .hooks import Hooks, evaluation


@dataclass(frozen=True)
class Combination:
    layer: str
    label: int
    correct: bool
    items: np.ndarray  # all matching items of the data set


@dataclass
class LayerTruth:
    """A layer's activations for every item (float32) and their per-item argmax."""

    activations: np.ndarray
    winners: np.ndarray


def default_layers(conn) -> list[str]:
    """The model's top-level blocks that hold parameters (conv1, conv2, fc1, fc2, fc3 in the demo)."""
    names = []
    for name, module in conn.model.named_children():
        if any(True for _ in module.parameters()) and name in conn.catalog and \
                conn.catalog[name].calls == 1:
            names.append(name)
    return names or conn.layers


def layer_truth(conn, layer: str) -> LayerTruth:
    """One pass over every item, keeping the layer's flattened output (float32)."""
    n = len(conn.source)
    shape = conn.catalog[layer].shape
    out = np.empty((n, int(np.prod(shape))), dtype=np.float32)
    position = [0]

    def keep(tensor: torch.Tensor) -> None:
        values = tensor.detach().flatten(1).to("cpu", torch.float32)
        out[position[0]:position[0] + len(values)] = values.numpy()

    with evaluation(conn.model), Hooks(conn.model, {layer: keep}) as hooks:
        for idx, x, _ in conn.source.batches(np.arange(n), conn.settings.batch_size):
            hooks.reset()
            call_model(conn.model, to_device(x, conn.device, conn.dtype))
            position[0] += len(idx)
    return LayerTruth(out, out.argmax(axis=1))


def combinations(conn, layers: list[str]) -> list[Combination]:
    profile = conn.profile
    combos = []
    for layer in layers:
        for label in range(profile.n_classes):
            for correct in (True, False):
                mask = (profile.labels == label) & (profile.correct == correct)
                if mask.any():
                    combos.append(Combination(layer, label, correct, np.flatnonzero(mask)))
    return combos


def score_sample(sample: np.ndarray, combos: list[Combination], truths: dict[str, LayerTruth],
                 exact: dict, k: int) -> dict[str, float]:
    """S1, S2, S3 of one sample: the mean metric over the combinations."""
    in_sample = np.zeros(len(next(iter(truths.values())).activations), dtype=bool)
    in_sample[sample] = True
    s1, s2, s3 = [], [], []
    for combo in combos:
        truth = truths[combo.layer]
        chosen = combo.items[in_sample[combo.items]]
        full_top, full_mean, full_hist = exact[id(combo)]
        if len(chosen) == 0:
            s1.append(0.0), s2.append(1.0), s3.append(1.0)
            continue
        mean = truth.activations[chosen].astype(np.float64).mean(axis=0)
        hist = np.bincount(truth.winners[chosen], minlength=len(mean)).astype(np.float64)
        s1.append(metrics.precision(rank(mean, k), full_top))
        s2.append(metrics.cosine_distance(mean, full_mean))
        s3.append(metrics.js_distance(hist / hist.sum(), full_hist))
    return {"S1": float(np.mean(s1)), "S2": float(np.mean(s2)), "S3": float(np.mean(s3))}


def exact_answers(combos, truths, k: int) -> dict:
    answers = {}
    for combo in combos:
        truth = truths[combo.layer]
        mean = truth.activations[combo.items].astype(np.float64).mean(axis=0)
        hist = np.bincount(truth.winners[combo.items], minlength=len(mean)).astype(np.float64)
        answers[id(combo)] = (rank(mean, k), mean, hist / hist.sum())
    return answers


@dataclass
class Score:
    sampler: str
    size: float | int | None
    S1: float
    S2: float
    S3: float
    S1_sd: float
    S2_sd: float
    S3_sd: float
    items: float  # mean sample size
    correct: float  # mean number of correctly classified items in the sample
    incorrect: float
    seconds: float  # mean time to draw the sample


def evaluate(conn, calls: list[tuple[str, dict]], sizes: list, *, layers: list[str] | None = None,
             k: int = 10, seeds: int = 5) -> list[Score]:
    """Score each sampler call (name, params) at each size, averaged over ``seeds`` seeds."""
    layers = layers or default_layers(conn)
    truths = {layer: layer_truth(conn, layer) for layer in layers}
    combos = combinations(conn, layers)
    exact = exact_answers(combos, truths, k)
    profile = conn.profile
    data = samplers.SampleData(profile.latents, profile.labels, profile.predictions,
                               profile.n_classes)
    scores = []
    for name, params in calls:
        cls = samplers.sampler_class(name)
        has_size = "size" in {p.name for p in cls.params()}
        for size in (sizes if has_size else [None]):
            runs, draws = [], []
            for seed in range(seeds):
                args = {**params, "random_state": seed, **({"size": size} if has_size else {})}
                started = time.perf_counter()
                sample = cls(**args).fit(data).indices_
                seconds = time.perf_counter() - started
                runs.append(score_sample(sample, combos, truths, exact, k))
                draws.append((len(sample), int(profile.correct[sample].sum()), seconds))
            table = {key: np.array([r[key] for r in runs]) for key in ("S1", "S2", "S3")}
            items, correct, seconds = np.mean(draws, axis=0)
            scores.append(Score(name + _params_text(params), size,
                                *(float(table[key].mean()) for key in ("S1", "S2", "S3")),
                                *(float(table[key].std()) for key in ("S1", "S2", "S3")),
                                items, correct, items - correct, seconds))
    return scores


def _params_text(params: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else ""
