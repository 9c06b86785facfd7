"""The blocks' directions fitted on items spread over the data (docs/ARCHITECTURE.md, "Data
model"; issue 15's leftover), against the first items as before.

    python benchmarks/spread_fit.py cost [--n 2500 50000] [--repeat 3]
    python benchmarks/spread_fit.py gain [--sampler "maxmargin(0.05)"] [--seeds 3]
                                         [--data demo shuffled sorted10000]

``cost``: the profile pass over bigdata.py's first n items (n = 2,500: the demo's data; item i
is digit i % 2500 in shift variant i // 2500, so the first 2,000 are all unshifted), 1 torch
thread, alternately as it was (one pass, the directions fitted on the first items) and as it
is (the spread items' part, then the rest's); then the share of every item's block variance,
Σ‖y − μ‖² − Σ‖z‖² over Σ‖y − ȳ‖², that each fit's 64 directions miss (plain torch hooks).

``gain``: EVALUATE SAMPLERS per block layer on data sorted by label (as the demo's is, as an
ImageFolder or most Hugging Face splits are) and shuffled (``data_set``), with the directions
fitted on the first items (``spread_items`` patched to them) and on the spread items: S1 / S2
of the assisted estimator (the plain ones do not use the directions: the same both ways).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bigdata import big_connection, demo_data, demo_model, machine_line

import diagql
from diagql.model import auxiliaries
from diagql.model.profile_pass import assemble_profile, profile_part
from diagql.model.same_rows import comparisons
from diagql.session import artifacts

LAYERS = ("conv1", "conv2", "fc1")  # the demo's blocks whose rows the profile does not hold


def first_items_profile(model, source, *, latent, latent_is_input, device, dtype, batch_size,
                        progress, view=None, catalog=None):
    """compute_profile as it was: one pass over the items in order, each block's rows held
    for the first items, the directions fitted on them, every later batch projected."""
    n = len(source)
    compare = comparisons(model, catalog, latent, latent_is_input, view, dtype, n)
    views = auxiliaries.blocks(model, catalog)
    project = auxiliaries.BlockProjector(views, n)
    started = time.perf_counter()
    with progress.task("profiling the data", n) as advance:
        part = profile_part(model, source, np.arange(n), latent=latent,
                            latent_is_input=latent_is_input, device=device, dtype=dtype,
                            batch_size=batch_size, advance=advance, view=view, compare=compare,
                            project=project)
        profile = assemble_profile([part], latent, latent_is_input, time.perf_counter() - started,
                                   view=view, dtype=dtype)
        project.finish()
        auxiliaries_ = auxiliaries.joined(views, project.fitted(), project.z,
                                          min(project.fit_items, n),
                                          profile.latent_views + profile.logit_views)
    return dataclasses.replace(profile, auxiliaries=auxiliaries_,
                               seconds=time.perf_counter() - started)


def missed(model, X: torch.Tensor, fits: dict) -> dict:
    """Per layer and fit: Σ‖y − μ‖² − Σ‖z‖² over Σ‖y − ȳ‖², every item's rows from plain
    forward hooks, in batches (50,000 conv1 rows would be 0.9 GB)."""
    sums = {layer: {"yy": 0.0, "y": 0.0, "n": 0, **{f: 0.0 for f in fits}} for layer in LAYERS}
    held = {}
    hooks = [getattr(model, layer).register_forward_hook(
        lambda m, i, out, layer=layer: held.__setitem__(layer, out.flatten(1).double()))
        for layer in LAYERS]
    try:
        with torch.no_grad():
            for start in range(0, len(X), 1000):
                model(X[start:start + 1000])
                for layer, y in held.items():
                    s = sums[layer]
                    s["yy"] += float((y ** 2).sum())
                    s["y"] = s["y"] + y.sum(0)
                    s["n"] += len(y)
                    for f, aux in fits.items():
                        a = aux[layer]
                        centred = y - torch.from_numpy(a.mean).double()
                        z = centred @ torch.from_numpy(a.basis).double()
                        s[f] += float((centred ** 2).sum() - (z ** 2).sum())
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for layer, s in sums.items():
        total = s["yy"] - float((s["y"] ** 2).sum()) / s["n"]
        out[layer] = {f: s[f] / total for f in fits}
    return out


def cost(sizes: list[int], repeat: int) -> None:
    torch.set_num_threads(1)
    now = artifacts.compute_profile
    for n in sizes:
        conn = big_connection(n, progress=False)
        assert conn.catalog is not None  # probed before either pass is timed
        seconds = {"first": [], "spread": []}
        kept = {}
        for _ in range(repeat):
            for way in ("first", "spread"):
                artifacts.compute_profile = first_items_profile if way == "first" else now
                started = time.perf_counter()
                kept[way] = conn.artifacts._compute_profile().auxiliaries
                seconds[way].append(time.perf_counter() - started)
                artifacts.compute_profile = now
        before, after = min(seconds["first"]), min(seconds["spread"])
        print(f"{n:,} items: profile pass {before:.2f} s as it was (first items), {after:.2f} s "
              f"spread ({after - before:+.2f} s, {after / before - 1:+.1%}); best of {repeat}, "
              f"medians {np.median(seconds['first']):.2f} / {np.median(seconds['spread']):.2f} s",
              flush=True)
        fits = {way: {a.layer: a for a in aux} for way, aux in kept.items()}
        shares = missed(conn.model, conn.source._pair[0], fits)
        for layer, share in shares.items():
            print(f"  {layer}: variance missed by the 64 directions: first items "
                  f"{share['first']:.4f}, spread {share['spread']:.4f}", flush=True)
    print(machine_line())


def data_set(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``demo``: the demo's 2,500 digits as shipped (sorted by label: its first 2,000 are
    classes 0-7); ``shuffled``: the same, seeded permutation (its first items are already a
    random draw); ``sortedN``: bigdata.py's first N items sorted by label (the first 2,000 of
    10,000 are classes 0 and 1)."""
    if name in ("demo", "shuffled"):
        X, y = demo_data()
        if name == "demo":
            return X, y
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    else:
        from bigdata import big_data

        X, y = big_data(int(name.removeprefix("sorted")))
        order = torch.argsort(y, stable=True)
    return X[order].clone(), y[order].clone()


def gain(sets: list[str], sampler: str, seeds: int) -> None:
    spread = auxiliaries.spread_items
    print(f"EVALUATE SAMPLERS {sampler} LAYERS <layer> SEEDS {seeds}: S1 / S2, plain | "
          f"assisted with the first items' fit | assisted with the spread fit")
    for name in sets:
        data = data_set(name)
        scores = {}
        for way in ("first", "spread"):
            auxiliaries.spread_items = spread if way == "spread" else \
                (lambda n, count, seed=0: np.arange(min(n, count)))
            try:  # no cache: both ways' profiles have the same key
                db = diagql.connect(demo_model(), data, cache_dir=False, progress=False)
                db.profile  # noqa: B018 - computed under the patch
            finally:
                auxiliaries.spread_items = spread
            for layer in LAYERS:
                r = db.query(f"EVALUATE SAMPLERS {sampler} LAYERS {layer} SEEDS {seeds}")
                scores[way, layer] = dict(zip(r.columns, r.rows[0]))
        for layer in LAYERS:
            first, after = scores["first", layer], scores["spread", layer]
            assert (first["S1"], first["S2"]) == (after["S1"], after["S2"])  # no directions
            print(f"{name:<11} {layer:<6} {first['S1']:.3f} / {first['S2']:.4f} | "
                  f"{first['S1 assisted']:.3f} / {first['S2 assisted']:.4f} | "
                  f"{after['S1 assisted']:.3f} / {after['S2 assisted']:.4f}", flush=True)
    print(machine_line())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cost", "gain"])
    parser.add_argument("--n", type=int, nargs="+", default=[2500, 50_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sampler", default="maxmargin(0.05)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", nargs="+", default=["demo", "shuffled", "sorted10000"],
                        help="gain's data sets: demo, shuffled, sortedN (see data_set)")
    args = parser.parse_args()
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    started = time.perf_counter()
    if args.what == "cost":
        cost(args.n, args.repeat)
    else:
        gain(args.data, args.sampler, args.seeds)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
