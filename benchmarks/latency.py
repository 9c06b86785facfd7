"""Statement latency (parse + bind + plan) and the command line's start-up time.

    python benchmarks/latency.py [--sizes 2500 100000] [--repeat 200] [--cli-repeat 10]

Part 1, per query: ``diagql.language.parser.parse(text)``, then the connection's ``_plan(statement)``
(binding layer and sampler to the model, evaluating the predicate on the profile, picking the
sample's matching items, grouping), after the profile is computed and each sample drawn once
(a warm-up call): the work a query does before its forward pass. ``--repeat`` calls per query,
interleaved across queries; median and 95th percentile in milliseconds. Target: under 5 ms.

Part 2: ``diagql --version`` and ``diagql --help`` as subprocesses (the console script, and
``python -m diagql``), median wall time of ``--cli-repeat`` runs, beside a bare interpreter
(``python -c pass``, the anchor) and ``python -c "import torch"``. Then, in a fresh
interpreter, ``diagql.shell.cli.main(["--help"])`` and ``["--version"]`` run with their SystemExit
caught, and the heavy modules in ``sys.modules`` are listed: torch must not be among them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import bigdata
import numpy as np

QUERIES = [
    "TOPK 10 NEURONS IN conv2 WHERE class = 3 AND incorrect USING SAMPLE stratified(0.05) "
    "WITH BASELINE",
    "AVG NEURONS IN fc3 USING FULL",
    "AVG NEURONS IN conv1",
    "TOPK 3 CHANNELS IN conv2 BY MAX WHERE predicted = 8 AND NOT class = 8",
    "AVG NEURONS IN fc2 WHERE incorrect GROUP BY class",
    "ARGMAX CHANNELS IN conv1 WHERE confidence < 0.9",
    "ARGMAX NEURONS IN fc1 WHERE class IN (4, 9) GROUP BY correct USING SAMPLE random(0.2) "
    "WITH BASELINE",
    "TOPK 10 NEURONS IN conv1 USING SAMPLE maxmargin(0.05)",
    "AVG NEURONS IN fc1 WHERE (class = 3 OR class = 5) AND confidence >= 0.5 AND predicted "
    "NOT IN (3, 5) USING SAMPLE random(100)",
    "TOPK 5 CHANNELS IN conv2 WHERE class NOT IN (1, 7) GROUP BY predicted",
]
TARGET_MS = 5.0
HEAVY = ["torch", "numpy", "scipy", "sklearn", "rich", "lark", "prompt_toolkit", "pandas"]


def plan_latency(conn, queries, repeat):
    from diagql.language.parser import parse

    for text in queries:  # warm-up: profile, catalog, samples
        conn.plan(parse(text))
    times = {text: {"parse": [], "plan": [], "total": []} for text in queries}
    for _ in range(repeat):
        for text in queries:
            started = time.perf_counter()
            statement = parse(text)
            parsed = time.perf_counter()
            conn.plan(statement)
            done = time.perf_counter()
            times[text]["parse"].append((parsed - started) * 1e3)
            times[text]["plan"].append((done - parsed) * 1e3)
            times[text]["total"].append((done - started) * 1e3)
    return times


def p95(values):
    return float(np.percentile(values, 95))


def wall(command, repeat):
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1e3


PROBE = """
import json, sys
from diagql.shell import cli
for argv in (["--help"], ["--version"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_500, 100_000],
                        help="data set sizes (default 2500 100000)")
    parser.add_argument("--repeat", type=int, default=200, help="calls per query (default 200)")
    parser.add_argument("--cli-repeat", type=int, default=10,
                        help="runs per command line (default 10)")
    bigdata.add_threads_option(parser, "torch threads for the profile pass")
    args = parser.parse_args(argv)
    bigdata.use_threads(args.threads)
    import diagql

    started = time.perf_counter()
    rows, summary = [], []
    for n in args.sizes:
        X, y = bigdata.big_data(n)
        conn = diagql.connect(bigdata.demo_model(), (X, y), cache_dir=False, progress=False)
        conn.profile
        times = plan_latency(conn, QUERIES, args.repeat)
        every = [t for q in times.values() for t in q["total"]]
        for text, t in times.items():
            rows.append([f"{n:,}", text, f"{statistics.median(t['parse']):.2f}",
                         f"{statistics.median(t['plan']):.2f}",
                         f"{statistics.median(t['total']):.2f}", f"{p95(t['total']):.2f}",
                         f"< {TARGET_MS:g}", "yes" if p95(t["total"]) < TARGET_MS else "no"])
        summary.append([f"{n:,}", f"all {len(QUERIES)} queries", "", "",
                        f"{statistics.median(every):.2f}", f"{p95(every):.2f}",
                        f"< {TARGET_MS:g}", "yes" if p95(every) < TARGET_MS else "no"])
    bigdata.print_table(
        f"Parse + bind + plan per query (ms; {args.repeat} calls each, profile computed and "
        f"samples drawn beforehand)",
        ["items", "query", "parse median", "bind + plan median", "total median", "total p95",
         "target ms", "met"], rows + summary)

    py = sys.executable
    script = shutil.which("diagql", path=os.path.dirname(py)) or shutil.which("diagql")
    commands = [("python -c pass (anchor)", [py, "-c", "pass"]),
                ('python -c "import torch"', [py, "-c", "import torch"])]
    if script:
        commands += [("diagql --version", [script, "--version"]),
                     ("diagql --help", [script, "--help"])]
    commands += [("python -m diagql --version", [py, "-m", "diagql", "--version"]),
                 ("python -m diagql --help", [py, "-m", "diagql", "--help"])]
    anchor = None
    cli_rows = []
    for label, command in commands:
        ms = wall(command, args.cli_repeat)
        anchor = anchor or ms
        cli_rows.append([label, f"{ms:.0f}", f"{ms / anchor:.2f}x"])
    probe = subprocess.run([py, "-c", PROBE.format(heavy=HEAVY)], capture_output=True, text=True)
    heavy = json.loads(probe.stderr.strip().splitlines()[-1])
    bigdata.print_table(
        f"Command line start-up (ms, median of {args.cli_repeat} runs)",
        ["command", "wall ms", "vs bare interpreter"], cli_rows,
        [f"heavy modules imported by cli.main(['--help']) and (['--version']): "
         f"{', '.join(heavy) or 'none'} (checked: {', '.join(HEAVY)}); torch imported: "
         f"{'YES' if 'torch' in heavy else 'no'}"])
    print(f"\nbenchmarks/latency.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
