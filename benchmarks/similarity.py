"""Exact CKA over many items: peak memory against materialising the layers, time against the
forward pass.

    python benchmarks/similarity.py [--n 100000] [--layers conv2 fc3] [--batch-size 256]
                                    [--threads 1]

Each case runs in its own subprocess (peaks do not mix) over benchmarks/bigdata.py's data set
and reports the peak resident set size above a baseline taken after imports, model and data:

- forward: plain ``model(x)`` over every batch under ``inference_mode``, no hooks: what one
  pass costs;
- diagql: ``diagql.connect(model, (X, y), cache_dir=False)`` and ``SIMILARITY <layers> USING
  FULL``: its profile pass (predictions and latents, once per connection) and the statement's
  own pass, which feeds feature-space moments (float64, batch by batch);
- materialised: every item's output of each layer gathered with forward hooks into float32
  tensors (n × width), then the same CKA from them (centred in float64, in blocks): what
  answering without streaming takes.

The two CKA values are checked against each other.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import bigdata

CASES = ["baseline", "forward", "diagql", "materialised"]


def peak_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def materialised_cka(acts) -> list[list[float]]:
    """Linear CKA of every pair from materialised activations (float32, n × width each)."""
    import torch

    n = acts[0].shape[0]
    means = [a.sum(dim=0, dtype=torch.float64) / n for a in acts]
    moments = {}
    for start in range(0, n, 4096):
        block = [a[start:start + 4096].double() - m for a, m in zip(acts, means)]
        for i in range(len(acts)):
            for j in range(i, len(acts)):
                product = block[i].T @ block[j]
                moments[i, j] = moments[i, j] + product if (i, j) in moments else product
    norms = [float(torch.linalg.matrix_norm(moments[i, i])) for i in range(len(acts))]
    return [[float(torch.linalg.matrix_norm(moments[min(i, j), max(i, j)])) ** 2
             / (norms[i] * norms[j]) for j in range(len(acts))] for i in range(len(acts))]


def run_case(case: str, n: int, layers: list[str], batch_size: int, threads: int) -> dict:
    import torch

    bigdata.use_threads(threads)
    import diagql

    X, y = bigdata.big_data(n)
    model = bigdata.demo_model().eval()
    out = {"case": case, "baseline_mb": peak_mb()}
    started = time.perf_counter()
    if case == "forward":
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                model(X[start:start + batch_size])
    elif case == "diagql":
        conn = diagql.connect(model, (X, y), batch_size=batch_size, progress=False,
                              cache_dir=False)
        result = conn.query(f"SIMILARITY {', '.join(layers)} USING FULL")
        out["matrix"] = result.matrix.tolist()
        out["statement_s"] = result.timings["query"]
        out["profile_s"] = result.timings.get("profile", 0.0)
    elif case == "materialised":
        modules = dict(model.named_modules())
        got = {}
        handles = [modules[name].register_forward_hook(
            lambda _m, _i, output, name=name: got.__setitem__(name, output.flatten(1).clone()))
            for name in layers]
        try:
            with torch.inference_mode():
                model(X[:1])
                acts = [torch.empty((n, got[name].shape[1])) for name in layers]
                for start in range(0, n, batch_size):
                    model(X[start:start + batch_size])
                    for a, name in zip(acts, layers):
                        a[start:start + batch_size] = got[name]
                out["matrix"] = materialised_cka(acts)
        finally:
            for handle in handles:
                handle.remove()
        out["materialised_mb"] = sum(a.numel() * 4 for a in acts) / 2**20
    out["seconds"] = time.perf_counter() - started
    out["peak_mb"] = peak_mb()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--n", type=int, default=100_000, help="items (default 100,000)")
    parser.add_argument("--layers", nargs="+", default=["conv2", "fc3"],
                        help="the layers compared (default conv2 fc3)")
    parser.add_argument("--batch-size", type=int, default=256)
    bigdata.add_threads_option(parser)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.layers, args.batch_size,
                                  args.threads)))
        return
    bigdata.use_threads(args.threads)
    started = time.perf_counter()
    results = {}
    for case in CASES:
        command = [sys.executable, os.path.abspath(__file__), "--case", case, "--n", str(args.n),
                   "--layers", *args.layers, "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"case {case!r} failed:\n{done.stderr}")
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    import numpy as np

    agree = float(np.abs(np.array(results["diagql"]["matrix"])
                         - np.array(results["materialised"]["matrix"])).max())
    forward_s = results["forward"]["seconds"]
    rows = []
    for case in CASES:
        r = results[case]
        above = r["peak_mb"] - r["baseline_mb"]
        seconds = r["seconds"]
        note = ""
        if case == "diagql":
            note = (f"statement {r['statement_s']:.1f} s = {r['statement_s'] / forward_s:.1f}x "
                    f"the forward pass; profile {r['profile_s']:.1f} s")
        elif case == "materialised":
            note = f"activations alone {r['materialised_mb']:.0f} MiB"
        rows.append([case, f"{above:.0f}", f"{seconds:.1f}",
                     f"{seconds / forward_s:.1f}x" if case != "baseline" else "", note])
    diag_above = results["diagql"]["peak_mb"] - results["diagql"]["baseline_mb"]
    mat_above = results["materialised"]["peak_mb"] - results["materialised"]["baseline_mb"]
    bigdata.print_table(
        f"SIMILARITY {', '.join(args.layers)} USING FULL over {args.n:,} items: peak memory "
        f"above baseline (MB) and time, each case in its own process",
        ["case", "peak - baseline MB", "seconds", "vs forward", "note"], rows,
        [f"diagql {mat_above / max(diag_above, 1):.1f}x less memory than materialising",
         f"the CKA matrices differ by at most {agree:.2e}", f"batch size {args.batch_size}"])
    print(f"\nbenchmarks/similarity.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
