"""Peak memory of a full-data query, against materialising the layer's activations with torch.

    python benchmarks/memory.py [--n 100000] [--layer conv1] [--batch-size 256] [--threads 1]

Each case runs in its own subprocess, so that peaks do not mix, and reports the peak resident
set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) twice: once after the imports, the
model and benchmarks/bigdata.py's data set are loaded (the baseline, the same in every case)
and once at the end. Cases:

- diagql: ``diagql.connect(model, (X, y), cache_dir=False)`` and
  ``AVG NEURONS IN <layer> USING FULL``; the profile pass (every item's prediction,
  confidence and latent vector) is part of it;
- diagql, cache dir: the same with a temporary cache directory (fingerprinting the data and
  writing the profile);
- torch, materialised: every item's ``<layer>`` output, gathered with a forward hook into
  one float32 tensor (n x neurons, e.g. 100,000 x 4,704 for conv1: 1.9 GB), then its
  mean (summed in float64 a block at a time):
  what answering the query without streaming takes.

Target: DiagQL's peak above the baseline under 1 GB. The mean of the materialised activations
is checked against DiagQL's answer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import bigdata

CASES = ["baseline", "diagql", "diagql, cache dir", "torch, materialised"]
TARGET_MB = 1024


def peak_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def run_case(case: str, n: int, layer: str, batch_size: int, threads: int) -> dict:
    """In the child process: load, note the baseline, run the case, report."""
    import torch

    bigdata.use_threads(threads)
    import diagql

    X, y = bigdata.big_data(n)
    model = bigdata.demo_model()
    baseline = peak_mb()
    started = time.perf_counter()
    out = {"case": case, "baseline_mb": baseline}
    if case.startswith("diagql"):
        with tempfile.TemporaryDirectory(prefix="diagql-bench-") as tmp:
            conn = diagql.connect(model, (X, y), batch_size=batch_size, progress=False,
                                  cache_dir=tmp if case == "diagql, cache dir" else False)
            result = conn.query(f"AVG NEURONS IN {layer} USING FULL")
        out["values"] = result.values.astype(float).tolist()
    elif case == "torch, materialised":
        module = dict(model.named_modules())[layer]
        outputs = []
        handle = module.register_forward_hook(
            lambda _module, _inputs, output: outputs.append(output.flatten(1).clone()))
        model.eval()
        try:
            with torch.inference_mode():
                model(X[:1])
                acts = torch.empty((n, outputs.pop().shape[1]), dtype=torch.float32)
                for start in range(0, n, batch_size):
                    model(X[start:start + batch_size])
                    acts[start:start + batch_size] = outputs.pop()
                # Summed in float64 a block at a time: sum(dtype=float64) over the whole
                # tensor would first make a float64 copy of it (3.6 GB for conv1).
                total = torch.zeros(acts.shape[1], dtype=torch.float64)
                for start in range(0, n, 4096):
                    total += acts[start:start + 4096].sum(dim=0, dtype=torch.float64)
                out["values"] = (total / n).tolist()
        finally:
            handle.remove()
        out["materialised_mb"] = acts.numel() * acts.element_size() / 2**20
    out["seconds"] = time.perf_counter() - started
    out["peak_mb"] = peak_mb()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--n", type=int, default=100_000, help="items (default 100,000)")
    parser.add_argument("--layer", default="conv1", help="queried layer (default conv1)")
    parser.add_argument("--batch-size", type=int, default=256, help="items per batch (default 256)")
    bigdata.add_threads_option(parser)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child's work
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.layer, args.batch_size, args.threads)))
        return

    bigdata.use_threads(args.threads)
    started = time.perf_counter()
    results = {}
    for case in CASES:
        command = [sys.executable, os.path.abspath(__file__), "--case", case, "--n", str(args.n),
                   "--layer", args.layer, "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"case {case!r} failed:\n{done.stderr}")
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    import numpy as np

    diag = np.array(results["diagql"]["values"])
    plain = np.array(results["torch, materialised"]["values"])
    agree = float(np.abs(diag - plain).max())
    materialised = results["torch, materialised"]
    rows = []
    for case in CASES:
        r = results[case]
        above = r["peak_mb"] - r["baseline_mb"]
        target = met = ""
        if case.startswith("diagql"):
            target = f"< {TARGET_MB} MB above baseline"
            met = "yes" if above < TARGET_MB else "no"
        ratio = ""
        if case != "baseline" and case != "torch, materialised":
            mat_above = materialised["peak_mb"] - materialised["baseline_mb"]
            ratio = f"{mat_above / max(above, 1):.1f}x less"
        rows.append([case, f"{r['baseline_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{above:.0f}",
                     ratio, f"{r['seconds']:.1f}", target, met])
    bigdata.print_table(
        f"Peak resident memory (MB), AVG NEURONS IN {args.layer} USING FULL over {args.n:,} "
        f"items, each case in its own process",
        ["case", "baseline MB", "peak MB", "peak - baseline", "vs materialised", "seconds",
         "target", "met"], rows,
        [f"baseline = ru_maxrss after imports, model and data ({args.n:,} x 784 float32 = "
         f"{args.n * 784 * 4 / 2**20:.0f} MiB) are loaded; the materialised activations alone "
         f"are {materialised['materialised_mb']:.0f} MiB",
         f"DiagQL's means and the materialised activations' means differ by at most {agree:.2e}",
         f"batch size {args.batch_size}"])
    print(f"\nbenchmarks/memory.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
