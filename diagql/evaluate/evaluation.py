"""EVALUATE SAMPLERS: the paper's workload benchmark (docs/ARCHITECTURE.md, "Evaluate") as one
statement: draw every sample, one forward pass, score (evaluate/bind.py checks it first).

For every layer × true class × {correct, incorrect} combination with at least one matching
item, the top-k neurons (S1, precision), the mean activation vector (S2, cosine distance) and
the distribution of maximally activated neurons (S3, Jensen-Shannon distance, base 2) are
computed on the sample and on all items; a query set's score is the mean over the combinations.
A sample with no matching item for a combination scores precision 0 and distances 1.

Execution: every sample is drawn first (samplers read only the profile); then one forward pass
over all items, with hooks on every evaluated layer, reduces the exact answers per (class,
correctness) group (a float64 sum vector and an argmax histogram; the full data's activations
are never held) and keeps the float32 activations of the items that some sample holds. Every
sample is then scored from those rows.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from diagql import samplers
from diagql.engine.covariates import for_view
from diagql.engine.estimate import shares
from diagql.engine.groups import cell_codes, n_cells
from diagql.engine.planner import winner_shares
from diagql.engine.regression import corrected_mean
from diagql.errors import DiagQLError, ExecutionError
from diagql.evaluate.bind import BoundEvaluation, Candidate, bind_evaluate
from diagql.language import ast
from diagql.language.binder import NO_LABELS, _error, layers_before
from diagql.model.layers import LayerInfo
from diagql.model.views import View
from diagql.results.metrics import COSINE, JS, METRICS, PRECISION
from diagql.results.result import Result
from diagql.samplers.maxmargin import REUSED_SECONDS

# S1..S3 score the sample's own answers (the paper's); "S1 assisted".. the model-assisted
# estimator's (engine/regression.py), each combination fitted as its own query would be.
COLUMNS = ["sampler", "size", "k", "j", *[c for m in METRICS for c in (m.paper, f"{m.paper} sd")],
           *[f"{m.paper} assisted" for m in METRICS], "items", "correct", "incorrect", "seconds"]

@dataclass
class Draw:
    """One sample: which candidate and seed drew it, its items and the seconds it took."""

    candidate: int
    seed: int
    indices: np.ndarray
    seconds: float


@dataclass
class LayerAnswers:
    """A layer's exact answers per group and the kept rows of the sampled items."""

    sums: np.ndarray  # (groups, neurons) float64: the sum of the activations of each group
    hist: np.ndarray  # (groups, neurons) int64: how often each neuron is an item's maximal one
    kept: np.ndarray  # (kept items, neurons) float32
    winners: np.ndarray  # (kept items,) the maximal neuron of each kept row


def evaluate_statement(conn, statement: ast.Evaluate) -> Result:
    """Bind, draw every sample, run one forward pass, score: the statement's Result."""
    started = time.perf_counter()
    bound = bind_evaluate(statement, conn)
    bound_at = time.perf_counter()
    profile = conn.profile
    if not profile.has_labels:
        raise _error(f"EVALUATE SAMPLERS scores the samples per true class and correctness, but "
                     f"{NO_LABELS}", statement.span)
    profiled_at = time.perf_counter()
    draws = draw_samples(conn, bound)
    drawn_at = time.perf_counter()
    groups = cell_codes(profile.labels, profile.correct)
    n_groups = n_cells(max(profile.n_classes, int(profile.labels.max()) + 1))
    kept_items = np.unique(np.concatenate([d.indices for d in draws]))
    position = np.full(len(profile), -1, dtype=np.int64)  # each item's kept row, -1: none
    position[kept_items] = np.arange(len(kept_items))
    answers = forward_pass(conn, bound.layers, groups, n_groups, position, len(kept_items))
    passed_at = time.perf_counter()
    counts = np.bincount(groups, minlength=n_groups)
    scores = score_draws(conn, bound, draws, answers, counts, groups, position)
    result = build_result(bound, draws, scores, profile, counts)
    result.timings.update({"bind": bound_at - started, "profile": profiled_at - bound_at,
                           "samples": drawn_at - profiled_at, "forward": passed_at - drawn_at,
                           "score": time.perf_counter() - passed_at})
    if bound.plot is not None:
        from diagql.results.plots import write_noted

        plotted = time.perf_counter()
        # A file that fails only as it is written (a folder by that name, no permission):
        # noted, the evaluation, minutes of work, returned all the same.
        write_noted(result, bound.plot)
        result.timings["plot"] = time.perf_counter() - plotted
    result.timings["evaluate"] = time.perf_counter() - started
    return result


def draw_samples(conn, bound: BoundEvaluation) -> list[Draw]:
    profile = conn.profile
    data = samplers.SampleData.of(profile)
    _warm_up(bound.candidates, data)
    draws = []
    total = len(bound.candidates) * len(bound.seeds)
    with conn.progress.task("EVALUATE: drawing samples", total) as advance:
        for number, candidate in enumerate(bound.candidates):
            for seed in bound.seeds:
                sampler = candidate.sampler(seed)
                REUSED_SECONDS[0] = 0.0
                started = time.perf_counter()
                try:
                    indices = sampler.fit(data).indices_
                except DiagQLError as exc:  # placed at its call (maxmargin on one class: SW4)
                    raise exc.at(candidate.span)
                # A draw that reused another's SVM fit (maxmargin's, weighted's) is timed as
                # one alone: its time had been 20x short, and hung on the samplers' order.
                seconds = time.perf_counter() - started + REUSED_SECONDS[0]
                draws.append(Draw(number, seed, indices, seconds))
                advance(1)
    return draws


def _warm_up(candidates: list[Candidate], data: samplers.SampleData) -> None:
    """One untimed draw per sampler class on a few hundred items, so that a sampler's one-off
    costs (its lazy imports of sklearn and scipy: about a second) are not in its timings."""
    subset = np.linspace(0, len(data) - 1, min(len(data), 300)).astype(np.int64)
    small = samplers.SampleData(data.latents[subset], data.labels[subset],
                                data.predictions[subset], data.n_classes)
    for cls in dict.fromkeys(c.cls for c in candidates):
        params = next(c.params for c in candidates if c.cls is cls)
        with contextlib.suppress(Exception):  # the real draw reports any failure
            cls(**{**params, **({"size": 0.5} if "size" in params else {})},
                random_state=0).fit(small)


class _GroupReducer:
    """A consumer of the executor's forward pass (see ``Runner.run``) for one layer's default
    view (a sequence layer's mean over real tokens): the float64 sum and the argmax histogram
    per (class, correctness) group, and the float32 rows of the items that ``position`` gives a
    row (its value)."""

    def __init__(self, layer: LayerInfo, items: np.ndarray, groups: np.ndarray, n_groups: int,
                 position: np.ndarray, n_kept: int, device: torch.device):
        self.layer = layer.name
        self.view = View(layer)
        self.items = self.wanted = items
        self.groups, self.n_groups, self.position, self.device = groups, n_groups, position, device
        self.neurons = layer.neurons
        # A part (below) holds slices of groups and position from item ``base`` on, and the
        # kept rows from row ``offset`` on; the whole reducer holds all of them.
        self.base = self.offset = 0
        self.sums = torch.zeros(n_groups, layer.neurons, dtype=torch.float64, device=device)
        self.hist = torch.zeros(n_groups * layer.neurons, dtype=torch.int64, device=device)
        self.kept = np.empty((n_kept, layer.neurons), dtype=np.float32)
        self.n_kept = n_kept

    def part(self, items: np.ndarray) -> _GroupReducer:
        """An empty reducer fed only ``items``, a run of consecutive items (a shard of the
        pass: engine/shards.py), holding only that run's groups, positions and kept rows."""
        part = copy.copy(self)
        lo, hi = (int(items[0]), int(items[-1]) + 1) if len(items) else (0, 0)
        part.items = part.wanted = items
        part.base, part.groups, part.position = lo, self.groups[lo:hi], self.position[lo:hi]
        kept = part.position[part.position >= 0]  # consecutive rows: the items are sorted
        part.offset = int(kept[0]) if len(kept) else 0
        part.sums, part.hist = torch.zeros_like(self.sums), torch.zeros_like(self.hist)
        part.kept = None  # made where the part is fed: no empty rows travel to a worker
        part.n_kept = len(kept)
        return part

    def merge(self, part: _GroupReducer) -> _GroupReducer:
        self.sums += part.sums.to(self.device)
        self.hist += part.hist.to(self.device)
        if part.kept is not None:
            self.kept[part.offset:part.offset + len(part.kept)] = part.kept
        return self

    def take(self, rows: torch.Tensor, idx: np.ndarray) -> None:
        # Reduced or copied here, inside the hook: a later in-place op may overwrite it.
        values = rows.detach()
        idx = idx - self.base
        gid = torch.from_numpy(self.groups[idx]).to(self.device)
        one_hot = torch.nn.functional.one_hot(gid, self.n_groups).T.to(torch.float64)
        # One product sums every group of the batch (index_add_ is far slower on CPU).
        self.sums += one_hot @ values.to(device=self.device, dtype=torch.float64)
        winners = values.argmax(dim=1).to(self.device)  # the same in any float type
        self.hist += torch.bincount(gid * self.neurons + winners, minlength=self.hist.shape[0])
        where = self.position[idx]
        chosen = np.flatnonzero(where >= 0)
        if len(chosen):
            if self.kept is None:
                self.kept = np.empty((self.n_kept, self.neurons), dtype=np.float32)
            rows = values[torch.from_numpy(chosen).to(values.device)]
            self.kept[where[chosen] - self.offset] = rows.to("cpu", torch.float32).numpy()

    def answers(self) -> "LayerAnswers":
        if not bool(torch.isfinite(self.sums).all()):
            raise ExecutionError(f"layer {self.layer!r} has NaN or infinite activations; "
                                 f"EVALUATE does not average over them")
        rows = self.kept
        return LayerAnswers(self.sums.cpu().numpy(),
                            self.hist.cpu().numpy().reshape(self.n_groups, self.neurons), rows,
                            rows.argmax(axis=1) if len(rows) else np.empty(0, dtype=np.int64))


def forward_pass(conn, layers: list[LayerInfo], groups: np.ndarray, n_groups: int,
                 position: np.ndarray, n_kept: int) -> dict[str, LayerAnswers]:
    """One pass over every item through the executor (hooks on the evaluated layers only,
    stopped once the deepest has run): per layer and group the float64 sum and the argmax
    histogram, plus the float32 rows of the items that ``position`` gives a row."""
    items = np.arange(len(conn.source))
    # MPS has no float64; the sums are made there on the CPU instead.
    device = conn.device if conn.device.type != "mps" else torch.device("cpu")
    reducers = [_GroupReducer(layer, items, groups, n_groups, position, n_kept, device)
                for layer in layers]
    conn.runner().run(reducers, "EVALUATE: forward pass")
    return {reducer.layer: reducer.answers() for reducer in reducers}


@dataclass
class SampleScore:
    S1: dict[int, float]  # k -> mean precision
    S2: float
    S3: float
    assisted: SampleScore | None = None  # the same scores of the assisted estimator's answers


def score_draws(conn, bound: BoundEvaluation, draws: list[Draw], answers, counts: np.ndarray,
                groups: np.ndarray, position: np.ndarray) -> list[SampleScore]:
    valid = np.flatnonzero(counts > 0)  # the (class, correctness) groups with a matching item
    exact = {}
    for layer in bound.layers:
        a = answers[layer.name]
        mean = a.sums[valid] / counts[valid, None]
        order = np.argsort(-mean, axis=1, kind="stable")  # ties: the lower neuron index
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(layer.neurons)[None, :].repeat(len(valid), 0),
                          axis=1)
        exact[layer.name] = (mean, rank, a.hist[valid])
    # Per layer, as its queries have them (engine/covariates.py): the covariates, each valid
    # group's mean of them over its matching items (what a query of that (class, correctness)
    # cell corrects its sample toward) and the block prediction, if any.
    context = {}
    for layer in bound.layers:
        chosen = for_view(conn.profile, View(layer).key,
                          before=layers_before(conn.catalog, layer.name),
                          upstream=conn.catalog.upstream(layer.name))
        prediction = chosen.prediction()
        means = chosen.z.means(np.arange(len(groups)), groups, set(valid.tolist()))
        # Every item's winner known (model/winners.py): an ARGMAX's exact shares.
        shares_of = winner_shares(conn.profile.winners_of(View(layer)), np.arange(len(groups)),
                                  groups, set(valid.tolist()), layer.neurons)
        context[layer.name] = (chosen.z, np.stack([means[g] for g in valid.tolist()]),
                               prediction, chosen.latent_dims,
                               None if shares_of is None else
                               np.stack([shares_of[g] for g in valid.tolist()]))
    scores: list[SampleScore] = []
    memo: dict[bytes, SampleScore] = {}  # a sampler that ignores its seed draws the same sample
    with conn.progress.task("EVALUATE: scoring samples", len(draws)) as advance:
        for draw in draws:
            key = draw.indices.tobytes()
            if key not in memo:
                memo[key] = _score(bound, draw.indices, answers, exact, valid, groups, position,
                                   context)
            scores.append(memo[key])
            advance(1)
    return scores


def _score(bound, indices, answers, exact, valid, groups, position, context) -> SampleScore:
    """The mean metric over every (layer, group) combination; a group the sample misses scores
    precision 0 and distances 1. The assisted scores fit each combination on its own sampled
    items, as the query of that one (class, correctness) cell does."""
    gid = groups[indices]
    order = np.argsort(gid, kind="stable")
    rows_at = position[indices][order]  # the sample's kept rows, grouped
    gid = gid[order]
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    sizes = np.diff(np.r_[starts, len(gid)])
    slot = np.full(int(max(valid.max(), gid.max())) + 1, -1)
    slot[gid[starts]] = np.arange(len(starts))
    where = slot[valid]  # each valid group's slot among the sample's groups, -1: missed
    hit = where >= 0
    member = np.repeat(np.arange(len(starts)), sizes)
    plain, fitted = _Tally(bound.ks), _Tally(bound.ks)
    for layer in bound.layers:
        a = answers[layer.name]
        z_all, z_means, prediction, p, exact_shares = context[layer.name]
        z_rows = z_all.rows(indices[order])
        sums = np.add.reduceat(a.kept[rows_at], starts, axis=0, dtype=np.float64)[where[hit]]
        mean = sums / sizes[where[hit], None]
        hist = np.bincount(member * layer.neurons + a.winners[rows_at],
                           minlength=len(starts) * layer.neurons)
        hist = hist.reshape(len(starts), layer.neurons)[where[hit]]
        plain.add(layer, exact[layer.name], hit, mean, hist)
        fit_mean, fit_share = np.empty_like(mean), np.empty(hist.shape)
        for row, (v, s) in enumerate(zip(np.flatnonzero(hit), where[hit])):
            part = slice(starts[s], starts[s] + sizes[s])
            rows = a.kept[rows_at[part]]
            z = z_rows[part]
            fit_mean[row] = corrected_mean(rows, z, z_means[v]) if prediction is None else \
                prediction.corrected_mean(rows, z, z_means[v])
            if exact_shares is not None:  # every item's winner known: counted, not fitted
                fit_share[row] = exact_shares[v]
                continue
            onehot = np.zeros(rows.shape)
            onehot[np.arange(len(rows)), a.winners[rows_at[part]]] = 1.0
            fit_share[row] = shares(corrected_mean(onehot, z[:, :p], z_means[v][:p]))
        # A group the sample misses, whose query the profile answers all the same: a view it
        # holds (the latent, the logits, a spanned block: every item's own row) exactly, an
        # ARGMAX from every item's winner. Scored as the worst, they had set a sampler that
        # misses a group below one that hits it where both answer exactly (S3 0.300 against 0).
        held = prediction is not None and prediction.own_rows
        fit_mean = _with_missed(fit_mean, hit, exact[layer.name][0] if held else None)
        fit_share = _with_missed(fit_share, hit, exact_shares)
        fitted.add(layer, exact[layer.name], hit | held, fit_mean, fit_share,
                   hist_hit=hit | (exact_shares is not None))
    score = plain.score()
    score.assisted = fitted.score()
    return score


def _with_missed(answer: np.ndarray, hit: np.ndarray, known: np.ndarray | None) -> np.ndarray:
    """The hit groups' answers (rows of ``answer``), with every valid group's row of ``known``
    in place of those missed: the answers of all valid groups, or ``answer`` as it is."""
    if known is None:
        return answer
    whole = np.array(known, dtype=np.float64, copy=True)
    whole[hit] = answer
    return whole


class _Tally:
    """The per-combination metrics of one set of answers, over every layer."""

    def __init__(self, ks):
        self.ks = ks
        self.s1: dict[int, list] = {k: [] for k in ks}
        self.s2: list = []
        self.s3: list = []

    def add(self, layer, exact, hit, mean, hist, hist_hit=None) -> None:
        """``mean``: the answers of the groups ``hit`` marks, ``hist`` of those ``hist_hit``
        marks (``hit`` unless given); every other valid group scores the worst."""
        full_mean, full_rank, full_hist = exact
        valid = len(hit)
        hist_hit = hit if hist_hit is None else hist_hit
        cos, js = np.full(valid, COSINE.worst), np.full(valid, JS.worst)
        cos[hit] = COSINE.rows(mean, full_mean[hit])
        js[hist_hit] = JS.rows(hist, full_hist[hist_hit])
        self.s2.append(cos)
        self.s3.append(js)
        top = np.argsort(-mean, axis=1, kind="stable")  # ties: the lower neuron index
        for k in self.ks:
            if k > layer.neurons:
                continue  # a layer of fewer than k neurons has no top-k to get right
            precision = np.zeros(valid)
            ranks = np.take_along_axis(full_rank[hit], top[:, :k], axis=1)
            precision[hit] = (ranks < k).sum(axis=1) / k
            self.s1[k].append(precision)

    def score(self) -> SampleScore:
        return SampleScore({k: float(np.mean(np.concatenate(v))) for k, v in self.s1.items()},
                           float(np.mean(np.concatenate(self.s2))),
                           float(np.mean(np.concatenate(self.s3))))


def build_result(bound: BoundEvaluation, draws: list[Draw], scores: list[SampleScore], profile,
                 counts: np.ndarray) -> Result:
    rows = []
    by_candidate: dict[int, list[int]] = {}
    for i, draw in enumerate(draws):
        by_candidate.setdefault(draw.candidate, []).append(i)
    correct = profile.correct
    for number, candidate in enumerate(bound.candidates):
        mine = by_candidate[number]
        items = np.array([len(draws[i].indices) for i in mine], dtype=np.float64)
        right = np.array([int(correct[draws[i].indices].sum()) for i in mine], dtype=np.float64)
        seconds = float(np.median([draws[i].seconds for i in mine]))
        s2 = np.array([scores[i].S2 for i in mine])
        s3 = np.array([scores[i].S3 for i in mine])
        a2 = float(np.mean([scores[i].assisted.S2 for i in mine]))
        a3 = float(np.mean([scores[i].assisted.S3 for i in mine]))
        for k in bound.ks:
            s1 = np.array([scores[i].S1[k] for i in mine])
            a1 = float(np.mean([scores[i].assisted.S1[k] for i in mine]))
            rows.append((candidate.label, candidate.size, k, candidate.j,
                         *_mean_sd(s1), *_mean_sd(s2), *_mean_sd(s3), a1, a2, a3,
                         float(items.mean()), float(right.mean()), float((items - right).mean()),
                         seconds))
    n_groups = int((counts > 0).sum())
    layers = [layer.name for layer in bound.layers]
    result = Result(kind="evaluation", statement=bound.statement.text, columns=list(COLUMNS),
                    rows=rows, n_items=len(profile))
    top = f"top-{bound.ks[0]}" if len(bound.ks) == 1 else "top-k"
    first, last = bound.seeds[0], bound.seeds[-1]
    seeds = (f"{len(bound.seeds)} seeds ({first}..{last}), ± the seeds' population sd (ddof 0)"
             if last > first else f"1 seed ({first})")
    names = ", ".join(f"{m.paper} = {top + ' ' if m is PRECISION else ''}{m.label} {m.arrow}"
                      for m in METRICS)
    result.title = (f"{names}: the mean "
                    f"over {len(layers) * n_groups} combinations of {len(layers)} "
                    f"layer{'' if len(layers) == 1 else 's'} "
                    f"({', '.join(layers)}) × {n_groups} (class, correct/incorrect) groups; "
                    f"{seeds}; {len(profile):,} items, {int((~correct).sum()):,} misclassified; "
                    f"asst: the scores of the model-assisted estimator's answers (SET "
                    f"estimator), each combination fitted on its own sampled items")
    for k in bound.ks:
        left_out = [layer.name for layer in bound.layers if layer.neurons < k]
        if left_out:
            result.notes.append(f"S1 at k = {k} leaves out {', '.join(left_out)} (fewer than "
                                f"{k} neurons)")
        # Counted, as the paper's workload counts the logits at k = 10 (the reproduction's
        # figures keep them), but said: their precision is 1 whatever the sample.
        whole = [layer.name for layer in bound.layers if layer.neurons == k]
        if whole:
            result.notes.append(f"S1 at k = {k} counts {', '.join(whole)} at precision 1 "
                                f"in every group a sample holds ({k} neurons: every one is in "
                                f"the top {k}; a group it misses scores 0, as everywhere)")
    result.plan = bound
    return result


def _mean_sd(values: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0: with two seeds, half their range) over
    the seeds, exactly 0 when every seed agrees."""
    return float(values.mean()), float(values.std()) if np.ptp(values) > 0 else 0.0

