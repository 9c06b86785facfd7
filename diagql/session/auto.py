"""USING AUTO: the exact answer when it costs about as little as a sample, else a sample of the
default sampler; the Result says which and why (docs/ARCHITECTURE.md, "Plan and execute")."""
from __future__ import annotations

import dataclasses

import numpy as np

from diagql import samplers
from diagql.language import ast
from diagql.language.binder import BoundQuery, bind_sampler

# Exact costs "about as much" as a sample when it reads at most this many times the sample's
# matching items: the exact answer is then worth its small extra cost.
ABOUT = 1.5
# Matching items no sample is worth drawing from: a sample of fewer gives intervals too wide to
# answer by (on a data set of 2 items AUTO had answered from a 1-item maxmargin draw), and an
# exact pass over so few costs next to nothing.
FEW = 100


def default_sampler(conn, profile) -> samplers.Sampler:
    """The paper's maxmargin at its defaults (5%), or random for data without labels, of one
    class (maxmargin's SVM needs two), or with a NaN or inf latent (which maxmargin, fitting
    on the latents, refuses)."""
    usable = held_classes(profile) >= 2 and bool(np.isfinite(profile.latents).all())
    return bind_sampler(ast.SamplerCall("maxmargin" if usable else "random"), conn.settings.seed,
                        len(profile))


def pass_or_draw(conn, sampler: samplers.Sampler, profile, n_match: int,
                 artifacts, layers: tuple[str, ...] = ()) -> tuple[str | None, str]:
    """Whether a pass over the ``n_match`` matching items costs less than drawing
    ``sampler``'s sample, not drawn yet: (why exact, where it does, else None; the costs
    weighed where they were, for a sample's reason, else ""). Drawing may cost more than the
    exact pass (maxmargin's SVM has a classifier per class: 1,000 classes over 3,000 items
    took 18 s beside a 0.2 s exact answer). The pass's model time, as the profile pass
    measured it: on Ray without the workers' start, which a sample's pass would pay as well
    (docs/ARCHITECTURE.md, "Plan and execute"), until the last of ``layers`` (``pass_layers``)."""
    if artifacts.has_sample(sampler):
        return None, ""
    draw = draw_seconds(sampler, profile)
    if draw is None:
        return None, ""
    exact = n_match * profile.seconds_per_item(layers)
    shown = _digits(exact, draw)
    pass_cost = f"≈ {exact:.{shown}g} s of model time" + \
        (", the Ray workers' start not counted" if conn.engine is not None else "")
    if exact <= draw:
        return (f"a pass over the {n_match:,} matching items ({pass_cost}) costs less than "
                f"drawing a {sampler.spec()} sample (≈ {draw:.{shown}g} s)"), ""
    return None, (f"; a pass over them all ({pass_cost}) costs more than the draw "
                  f"(≈ {draw:.{shown}g} s)")


def _digits(a: float, b: float) -> int:
    """Significant digits that tell two costs apart (2 at least, 6 at most): '≈ 0.21 s costs
    more than ≈ 0.21 s' had read as a contradiction (sweep MM2)."""
    for digits in range(2, 7):
        if f"{a:.{digits}g}" != f"{b:.{digits}g}":
            return digits
    return 6


def draw_seconds(sampler: samplers.Sampler, profile) -> float | None:
    """What drawing ``sampler``'s sample from ``profile`` is priced at (None: nothing worth
    weighing). Its classifiers are fitted on the classes the labels hold (maxmargin's SVM has
    one per class present; a model scoring 1,000 classes over data holding 10 had its draw
    priced at 14 s where it took 0.08 s, and AUTO chose a 1.2 s exact pass). A fit kept from
    an earlier draw of the same latents (maxmargin's SVM, at another size or seed) is not
    priced again: 0.33 s had been weighed against a 6 ms draw."""
    kept = sampler.fit_kept(samplers.SampleData.of(profile))
    return sampler.draw_seconds(len(profile), held_classes(profile) or profile.n_classes,
                                profile.latents.shape[1], kept)


def held_classes(profile) -> int:
    """How many classes the items' known labels hold (0: data without labels): maxmargin's
    SVM needs two, and fits a classifier for each."""
    known = profile.labels[profile.labels >= 0] if profile.has_labels else profile.labels[:0]
    return int(np.count_nonzero(np.bincount(known))) if len(known) else 0


def pass_layers(bound: BoundQuery, own: bool) -> tuple[str, ...]:
    """The layers whose share of the profile pass a query's exact pass costs
    (``Profile.seconds_per_item``), where the profile is its model's (``own``)."""
    from diagql.engine.planner import pass_layers as hooked

    return hooked(bound) if own else ()


def matching(query: ast.Query, profile) -> np.ndarray:
    from diagql.engine.planner import predicate_mask

    return predicate_mask(query.where, profile)


def choose(conn, bound: BoundQuery, profile, src) -> tuple[BoundQuery, str, float]:
    """The bound query with AUTO's sampler (None: exact), why, and the seconds spent drawing
    the sampler's sample to choose (0 when it was drawn before). ``src``: the statement's
    models (``statements.Sources``)."""
    from diagql.engine.planner import answered_from_profile, rebuilt_from_profile

    reason = answered_from_profile(bound, profile) if src.own else None
    if reason is not None:
        return bound, f"AUTO chose exact: {reason}, so the exact answer needs no forward pass", 0.0
    rebuilt = rebuilt_from_profile(bound, profile) \
        if src.own and conn.settings.estimator == "assisted" else None
    if rebuilt is not None:  # a sample's answer is exact: only the draw costs, if not drawn
        sampler = default_sampler(conn, profile)
        artifacts = src.sampling.artifacts
        cheaper, weighed = pass_or_draw(conn, sampler, profile,
                                        int(matching(bound.query, profile).sum()), artifacts,
                                        pass_layers(bound, src.own))
        if cheaper is not None:
            return bound, f"AUTO chose exact: {cheaper}", 0.0
        sample, fresh = artifacts.get_sample(sampler)
        return dataclasses.replace(bound, sampler=sampler), (
            f"AUTO chose a sample: {rebuilt}, so the {sampler.spec()} sample's answer is "
            f"exact and needs no forward pass{weighed}"), (sample.seconds if fresh else 0.0)
    if bound.query.aggregate == "topk" and bound.query.order == "max":
        # A sample's maximum is biased low and carries no estimate (engine/answers.py): a
        # sample was chosen here with no word of its accuracy (a sweep: precision 0.2 against
        # the exact answer, to save 0.03 s), where UNTIL refuses it and WITHIN grows to all.
        return bound, ("AUTO chose exact: a sample's maximum is biased low and has no "
                       "estimate of its accuracy"), 0.0
    mask = matching(bound.query, profile)
    n_match = int(mask.sum())
    sampler = default_sampler(conn, profile)
    n_sample = samplers.resolve_size(sampler.size, len(profile))
    if n_match <= n_sample:
        return bound, (f"AUTO chose exact: {n_match:,} matching "
                       f"item{'s' if n_match != 1 else ''}, no more than the "
                       f"{n_sample:,} of a {sampler.spec()} sample"), 0.0
    if n_match <= FEW:
        return bound, (f"AUTO chose exact: {n_match:,} matching "
                       f"item{'s' if n_match != 1 else ''}, too few to sample "
                       f"(a sample of at most {n_sample:,} would estimate little)"), 0.0
    artifacts = src.sampling.artifacts
    cheaper, weighed = pass_or_draw(conn, sampler, profile, n_match, artifacts,
                                    pass_layers(bound, src.own))
    if cheaper is not None:
        return bound, f"AUTO chose exact: {cheaper}", 0.0
    avoided, seconds = shunned(conn, sampler, profile, mask, artifacts)
    if avoided:
        sampler = bind_sampler(ast.SamplerCall("random"), conn.settings.seed, len(profile))
    sample, fresh = artifacts.get_sample(sampler)
    seconds += sample.seconds if fresh else 0.0
    held = int(mask[sample.indices].sum())
    if n_match <= ABOUT * held:
        return bound, (f"AUTO chose exact: the {sampler.spec()} sample holds {held:,} of the "
                       f"{n_match:,} matching items, so exact costs about as much"
                       f"{avoided}"), seconds
    sparse = _sparse_groups(bound.query, profile, mask, sample.indices)
    if sparse:
        return bound, f"AUTO chose exact: {sparse}{avoided}", seconds
    return dataclasses.replace(bound, sampler=sampler), (
        f"AUTO chose a sample: the data has {n_match:,} matching items, and the "
        f"{sampler.spec()} sample holds {held:,} of them ({n_match / max(held, 1):.0f}× fewer "
        f"to run){avoided}{weighed}"), seconds


def _sparse_groups(query, profile, mask: np.ndarray, sampled: np.ndarray) -> str:
    """Why a GROUP BY is answered exactly where the sample would leave most of its groups
    without an estimate, fewer than 2 of their items sampled (else ""): 998 classes of 2-10
    items over a 250-item sample had left 755 unanswered, where the exact pass took 0.08 s
    (sweep SX12)."""
    from diagql.engine.groups import group_values

    values = group_values(getattr(query, "group_by", None), profile)
    if values is None:
        return ""
    groups = np.unique(values[mask])
    chosen = np.zeros(len(mask), dtype=bool)
    chosen[sampled] = True
    _, counts = np.unique(values[mask & chosen], return_counts=True)
    answered = int((counts >= 2).sum())
    if answered >= len(groups) / 2:
        return ""
    return (f"GROUP BY {query.group_by} has {len(groups):,} groups, and the sample holds 2 "
            f"or more items of only {answered:,} of them (fewer give no estimate)")


def shunned(conn, sampler: samplers.Sampler, profile, mask: np.ndarray,
            artifacts) -> tuple[str, float]:
    """Why a uniform sample answers instead of ``sampler``'s (``_avoided``; "" where it does
    not), from its sample at its size, drawn here if not yet (the seconds that took): the
    default sampler shuns the items ``mask`` matches (maxmargin's boundary and exemplars,
    under WHERE confidence > 0.9976: 13 of 4,000 where a uniform sample holds 200). USING
    AUTO and UNTIL / WITHIN without a sampler ask it alike (the growth had grown maxmargin
    where AUTO took random: sweep SX7)."""
    if type(sampler).uniform:
        return "", 0.0
    sample, fresh = artifacts.get_sample(sampler)
    n_sample = samplers.resolve_size(sampler.size, len(profile))
    held = int(mask[sample.indices].sum())
    return (_avoided(sampler, held, int(mask.sum()), n_sample, len(profile)),
            sample.seconds if fresh else 0.0)


# A non-uniform sample that holds fewer than this share of the matching items a uniform one of
# its size would hold is said to shun them (``_avoided``).
SHUNNED = 0.5


def _avoided(sampler: samplers.Sampler, held: int, n_match: int, n_sample: int,
             n_items: int) -> str:
    """Why a uniform sample answers instead of ``sampler``'s, where that holds fewer than
    SHUNNED of the matching items a uniform sample of its size would (else ""): a predicate
    on what the sampler avoids (confidence far from every boundary, for maxmargin) had been
    answered from 0 of 1,003 matching items, or from 13 of 4,000 at expected precision 0.50
    where random(0.05)'s 173 reached 0.94."""
    expected = n_match * n_sample / max(n_items, 1)
    if type(sampler).uniform or held >= SHUNNED * expected:
        return ""
    return (f"; the default {sampler.spec()} sample holds only {held:,} of them where a "
            f"uniform one of its size holds about {expected:,.0f}, so a uniform one answers")
